"""Reading user tables (a Parquet/CSV file or a folder of partitions) with errors a user can
act on, atomic Parquet writes, input fingerprints. Never lets a pandas/pyarrow traceback reach the user."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from common.errors import UserError
from common.files import atomic_path

SOURCE_FILE = "source_file"
SOURCE_ROW = "source_row"
TEXT_SUFFIXES = (".csv", ".csv.gz", ".tsv")  # read with every column as text
TABLE_SUFFIXES = (".parquet", ".pq", *TEXT_SUFFIXES)


def _table_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and p.name.lower().endswith(TABLE_SUFFIXES) and not p.name.startswith(".")
        )
        if not files:
            raise UserError(
                f"{path}: folder holds no .parquet or .csv files; point at a file or a folder of partitions"
            )
        return files
    return [path]


def read_as_text(path: str | Path) -> bool:
    """Whether `read_table` reads `path` (a file, or every table file of a folder) with every
    column as text, so its numbers and booleans come as text too."""
    return all(f.name.lower().endswith(TEXT_SUFFIXES) for f in _table_files(Path(path)))


def _read_one(path: Path) -> pa.Table:
    name = path.name.lower()
    try:
        if name.endswith((".parquet", ".pq")):
            return pq.read_table(path)
        if name.endswith(TEXT_SUFFIXES):
            # Every column as text: types are normalised by validation, which reports bad values
            # instead of failing the whole read.
            if path.stat().st_size == 0:
                raise UserError(f"{path}: file is empty; nothing to do")
            parse = pacsv.ParseOptions(delimiter="\t" if name.endswith(".tsv") else ",")
            names = pacsv.open_csv(path, parse_options=parse).schema.names  # header only
            return pacsv.read_csv(
                path,
                parse_options=parse,
                convert_options=pacsv.ConvertOptions(
                    column_types={n: pa.string() for n in names},
                    strings_can_be_null=True,
                ),
            )
    except (pa.ArrowInvalid, pa.ArrowException, OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: unreadable ({first}); is it really Parquet/CSV?") from None
    raise UserError(
        f"{path}: not a table file (expected .parquet or .csv); convert it or point at a folder of them"
    )


def read_table(path: str | Path, what: str = "events", provenance: bool = False) -> pd.DataFrame:
    """Read a Parquet/CSV file or a folder of partitions into one DataFrame.

    Partitions are concatenated in file-name order; schemas may differ between partitions
    (missing columns become null). With `provenance`, adds `source_file` and `source_row`
    (0-based row within its file) so a rejected row can be traced back."""
    path = Path(path)
    if not str(path):
        raise UserError(f"no {what} path given; set data.{what}=PATH or pass --{what} PATH")
    if not path.exists():
        raise UserError(f"{path}: {what} path does not exist; check data.{what} or --{what}")
    files = _table_files(path)
    tables = [_read_one(p) for p in files]
    if provenance:
        tables = [
            t.append_column(SOURCE_FILE, pa.array([str(f)] * t.num_rows, pa.string()).dictionary_encode())
            .append_column(SOURCE_ROW, pa.array(range(t.num_rows), pa.int64()))
            for f, t in zip(files, tables)
        ]
    try:
        table = pa.concat_tables(_as_text_where_types_differ(tables), promote_options="permissive")
    except pa.ArrowException as e:
        raise UserError(f"{path}: partitions have incompatible schemas ({e}); align their column types") from None
    if table.num_rows == 0:
        raise UserError(f"{path}: {what} table is empty; nothing to do")
    df = table.to_pandas(types_mapper=_types_mapper)
    return df


def _as_text_where_types_differ(tables: list[pa.Table]) -> list[pa.Table]:
    """Partitions of one table may disagree on a column's type (a Parquet timestamp, a CSV
    string): such columns become text, which validation parses like any CSV column."""
    types: dict[str, set] = {}
    for t in tables:
        for f in t.schema:
            if not pa.types.is_null(f.type):
                types.setdefault(f.name, set()).add(f.type)
    mixed = {name for name, ts in types.items() if len(ts) > 1}
    out = []
    for t in tables:
        for name in mixed & set(t.column_names):
            col = t[name]
            if pa.types.is_list(col.type):  # [1, 2] -> "1|2", the contract's text form
                col = pc.binary_join(pc.cast(col, pa.list_(pa.string())), "|")
            t = t.set_column(t.schema.get_field_index(name), name, pc.cast(col, pa.string()))
        out.append(t)
    return out


def _types_mapper(t: pa.DataType):
    # Strings as pandas' arrow-backed string dtype; lists (food_ids) stay Arrow lists so they
    # are parsed without a Python loop per row; everything else the pandas default.
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return pd.StringDtype("pyarrow")
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return pd.ArrowDtype(t)
    return None


def require_columns(df: pd.DataFrame, columns: Iterable[str], path: str | Path, what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise UserError(
            f"{path}: {what} table lacks required column(s) {', '.join(missing)} "
            f"(has: {', '.join(map(str, df.columns))}); rename or add them, see docs/contract.md"
        )


def write_parquet_atomic(df: pd.DataFrame | pa.Table, path: str | Path, schema: pa.Schema | None = None,
                         **options) -> Path:
    """`options`: pyarrow.parquet.write_table's."""
    table = df if isinstance(df, pa.Table) else pa.Table.from_pandas(df, schema=schema, preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **options)
    return Path(path)


def fingerprint(paths: Iterable[str | Path | None]) -> str:
    """sha256 over the names, sizes and bytes of every file under `paths`: the identity of
    a build's inputs, logged to MLflow and compared to decide whether to rebuild."""
    h = hashlib.sha256()
    for p in paths:
        if not p:
            continue
        for f in _table_files(Path(p)) if Path(p).exists() else []:
            h.update(f"{f.name}:{f.stat().st_size}".encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
    return h.hexdigest()[:16]
