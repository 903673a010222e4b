"""Vectorised parsers that turn raw columns into the contract's normalised types.

Each returns the parsed values plus a boolean array of rows that could not be parsed,
so validation can quarantine them with a reason instead of failing the whole file."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from common.errors import UserError

EARLIEST_TS = pd.Timestamp("1990-01-01", tz="UTC")
# Epoch numbers at or above this are not seconds (they would fall after the year 5000):
# milliseconds, microseconds or nanoseconds. They are rejected with their own reason
# rather than read as a date thousands of years ahead.
MAX_EPOCH_SECONDS = 1e11
_DIGITS_RE = r"^[0-9]+$"
_INT64_MAX = str(np.iinfo(np.int64).max)  # 19 digits


def to_utc(value, what: str = "") -> pd.Timestamp:
    """One instant from a config string/datetime: naive means UTC, aware is converted.
    `what`: the setting it comes from, named in the one-line error when it is no instant."""
    try:
        t = pd.Timestamp(value)
    except (ValueError, TypeError):
        raise UserError(f"{what or 'time'}={value!r} is not a date or time; e.g. 2026-03-02 or "
                        "2026-03-02T06:00:00Z (naive means UTC)") from None
    return t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")


def clean_strings(col: pd.Series, lower: bool = False) -> pd.Series:
    """Any column -> arrow-backed strings, stripped, with "" turned into missing."""
    if isinstance(col.dtype, pd.StringDtype):
        s = col if col.dtype == pd.StringDtype("pyarrow") else col.astype(pd.StringDtype("pyarrow"))
    else:
        # Integer-valued floats (CSV/parquet ids like 42.0) print as "42", not "42.0".
        if pd.api.types.is_float_dtype(col):
            as_int = col.where(col.isna() | (col % 1 != 0), col.round().astype("Int64").astype(object))
            col = as_int
        s = col.astype(object).where(col.notna(), None).astype(pd.StringDtype("pyarrow"))
    arr = as_arrow(s)
    if not _clean_already(arr, lower):  # most columns of most logs are: a look at the bytes, no copy
        # In Arrow: pandas' str.strip / mask on these arrays cost several times more.
        arr = pc.utf8_trim_whitespace(arr)
        if lower:
            arr = pc.utf8_lower(arr)
        empty = pc.equal(arr, "")
        if pc.any(empty).as_py():  # if_else copies every string: only when there is one to null
            arr = pc.if_else(empty, pa.scalar(None, arr.type), arr)
    return pd.Series(pd.arrays.ArrowStringArray(arr), index=col.index, name=col.name)


def _clean_already(arr: pa.Array, lower: bool) -> bool:
    """Whether `clean_strings` would leave these strings as they are, from their UTF-8 bytes: no
    value is empty or starts or ends with a byte that may belong to whitespace (ASCII up to the
    space, or any byte of a multi-byte character), and with `lower` none holds an uppercase ASCII
    letter or a multi-byte character. False when unsure: the full cleaning then decides."""
    if not pa.types.is_string(arr.type) and not pa.types.is_large_string(arr.type):
        return False
    n = len(arr) - arr.null_count
    if n == 0:
        return True
    _, offset_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offset_buf, np.int64 if pa.types.is_large_string(arr.type) else np.int32)
    offsets = offsets[arr.offset: arr.offset + len(arr) + 1]
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    starts, ends = offsets[:-1], offsets[1:]
    if arr.null_count:
        valid = arr.is_valid().to_numpy(zero_copy_only=False)
        starts, ends = starts[valid], ends[valid]
    if (ends <= starts).any():
        return False
    # (uint8 arithmetic wraps: b - 0x21 >= 0x5F is b outside 0x21..0x7F, b - 0x41 < 26 is A-Z)
    if ((data[starts] - np.uint8(0x21)) >= 0x5F).any() or ((data[ends - 1] - np.uint8(0x21)) >= 0x5F).any():
        return False
    if lower:
        body = data[offsets[0]: offsets[-1]]  # (null slots may hold bytes too: unsure is fine)
        if body.max() >= 0x80 or ((body - np.uint8(0x41)) < 26).any():
            return False
    return True


def as_arrow(values: pd.Series) -> pa.Array:
    """A column's values as one Arrow array (pandas' missing values and NaN as null)."""
    arr = pa.array(values.array, from_pandas=True)
    return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr


def parse_timestamps(col: pd.Series) -> tuple[pd.Series, np.ndarray]:
    """ISO-8601 strings (any offset; naive means UTC), epoch seconds, or datetimes -> UTC.

    Returns (datetime64[us, UTC] series with NaT where unparseable, bad mask). Rows that were
    missing to begin with are NaT and flagged bad too."""
    out, bad, _ = parse_timestamps_and_units(col)
    return out, bad


def parse_timestamps_and_units(col: pd.Series) -> tuple[pd.Series, np.ndarray, np.ndarray]:
    """`parse_timestamps` plus a mask of the bad rows that are epoch numbers too large to be
    seconds (>= MAX_EPOCH_SECONDS: most likely milliseconds), so validation can say so."""
    not_seconds = np.zeros(len(col), dtype=bool)
    if isinstance(col.dtype, pd.DatetimeTZDtype):
        out = col.dt.tz_convert("UTC")
    elif pd.api.types.is_datetime64_dtype(col):
        out = col.dt.tz_localize("UTC")
    elif pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
        out, not_seconds = _from_epoch(col.astype("float64"))
    else:
        s = clean_strings(col)
        numeric = pd.to_numeric(s, errors="coerce")
        is_num = numeric.notna().to_numpy()
        out = pd.Series(pd.NaT, index=col.index, dtype="datetime64[us, UTC]")
        if is_num.any():
            out[is_num], not_seconds[is_num] = _from_epoch(numeric[is_num].astype("float64"))
        rest = ~is_num & s.notna().to_numpy()
        if rest.any():
            parsed = pd.to_datetime(s[rest], format="ISO8601", utc=True, errors="coerce")
            out[rest] = parsed.astype("datetime64[us, UTC]")
    out = out.astype("datetime64[us, UTC]")
    bad = out.isna().to_numpy() | (out < EARLIEST_TS).to_numpy()
    return out, bad, not_seconds


def _from_epoch(seconds: pd.Series) -> tuple[pd.Series, np.ndarray]:
    """Epoch seconds -> UTC instants, NaT where not finite or too large to be seconds."""
    v = seconds.to_numpy()
    not_seconds = np.isfinite(v) & (np.abs(v) >= MAX_EPOCH_SECONDS)
    micro = (seconds.where(np.isfinite(v) & ~not_seconds) * 1e6).round()
    return pd.to_datetime(micro, unit="us", utc=True), not_seconds


def parse_food_ids(col: pd.Series) -> tuple[pa.ListArray, np.ndarray, np.ndarray]:
    """list[int] per row or a "12|55|9" string -> list<int64>.

    Returns (lists, empty mask: no foods at all, bad mask: some id is not a non-negative
    integer). Null rows count as empty."""
    n = len(col)
    if isinstance(col.dtype, pd.ArrowDtype) and pa.types.is_list(col.dtype.pyarrow_dtype):
        arr = pa.chunked_array(pa.array(col.array)).combine_chunks()
    elif isinstance(col.dtype, pd.StringDtype) or (col.dtype == object and _mostly_strings(col)):
        strings = clean_strings(col)
        arr = pc.split_pattern(pa.array(strings, type=pa.string(), from_pandas=True), "|")
    else:
        values = col.astype(object).where(col.notna(), None)
        values = [v if v is None or isinstance(v, (list, np.ndarray)) else [v] for v in values]
        arr = pa.array(values, from_pandas=True)
        if not pa.types.is_list(arr.type):  # a column of scalars or all nulls
            arr = pa.array([None] * n, pa.list_(pa.int64()))
    arr = arr.cast(pa.list_(arr.type.value_type)) if pa.types.is_large_list(arr.type) else arr
    lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False)
    flat = pc.list_flatten(arr)
    parents = pc.list_parent_indices(arr).to_numpy(zero_copy_only=False)
    ints, bad_item = _as_non_negative_ints(flat)
    bad = np.zeros(n, dtype=bool)
    if bad_item.any():
        bad[np.unique(parents[bad_item])] = True
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    lists = pa.ListArray.from_arrays(pa.array(offsets), pa.array(ints, pa.int64()))
    return lists, lengths == 0, bad


def _mostly_strings(col: pd.Series) -> bool:
    first = col.dropna().head(100)
    return len(first) > 0 and all(isinstance(v, str) for v in first)


def _as_non_negative_ints(flat: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Food ids -> (int64 values, bad mask: not an integer in [0, 2**63)). Never raises: an
    id too large for int64 is a bad id like any other, not a crash."""
    t = flat.type
    if pa.types.is_integer(t):  # uint64 beyond int64 wraps negative, so it is flagged too
        v = pc.fill_null(flat, -1).to_numpy(zero_copy_only=False).astype(np.int64)
        return np.where(v < 0, 0, v), v < 0
    if pa.types.is_floating(t):
        v = pc.fill_null(flat, np.nan).to_numpy(zero_copy_only=False)
        ok = np.isfinite(v) & (v >= 0) & (v < 2.0**63) & (np.floor(v) == v)
        return np.where(ok, v, 0).astype(np.int64), ~ok
    s = pc.cast(flat, pa.string()) if not pa.types.is_string(t) else flat
    # Digits only, leading zeros dropped ("0" stays "0"), then at most int64's 19 digits
    # compared as text: the cast below can then never overflow.
    digits = pc.utf8_ltrim(pc.utf8_trim_whitespace(s), characters="0")
    digits = pc.if_else(pc.equal(digits, ""), pc.utf8_trim_whitespace(s), digits)
    n = pc.utf8_length(digits)
    fits = pc.or_(pc.less(n, len(_INT64_MAX)), pc.and_(pc.equal(n, len(_INT64_MAX)), pc.less_equal(digits, _INT64_MAX)))
    ok = pc.fill_null(pc.and_(pc.match_substring_regex(digits, _DIGITS_RE), fits), False)
    ok = ok.to_numpy(zero_copy_only=False)
    v = np.zeros(len(s), dtype=np.int64)
    if ok.any():
        v[ok] = pc.cast(digits.filter(pa.array(ok)), pa.int64()).to_numpy()
    return v, ~ok


def parse_numbers(col: pd.Series) -> tuple[pd.Series, np.ndarray, np.ndarray]:
    """Any column -> float64. Returns (values, present mask, bad mask: present but not a
    finite number)."""
    if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
        values = col.astype("float64")
        present = col.notna().to_numpy()
    else:
        s = clean_strings(col)
        present = s.notna().to_numpy()
        values = pd.to_numeric(s, errors="coerce").astype("float64")
    v = values.to_numpy(dtype=np.float64, na_value=np.nan)
    bad = present & ~np.isfinite(v)
    return pd.Series(np.where(bad, np.nan, v), index=col.index), present, bad
