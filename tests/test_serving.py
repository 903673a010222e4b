"""The trained model as an MLflow pyfunc model (issue 16): logged with a signature, registered
as the run's logged model, loaded by alias in a fresh process, scoring raw events exactly as
the nightly job does, and served over HTTP by `mlflow models serve`."""

import json
import re
import subprocess
import sys
import time
import urllib.request

import mlflow
import numpy as np
import pandas as pd
import pytest

from pipeline.evaluation import registry
from pipeline.evaluation.score import score
from pipeline.serving import LOGGED_MODEL_TAG, LOGGED_NAME, OUTPUT
from pipeline.training.train import train
from tests.test_train import _free_port

AS_OF = "2026-02-02"  # a Monday inside the test simulator's weeks


@pytest.fixture(scope="module")
def champion(sim_store_files, tiny_encoder_dir, tmp_path_factory):
    """A tiny trained model registered as the champion: (config, run id, version)."""
    import copy

    _, cfg = sim_store_files
    cfg = copy.deepcopy(cfg)
    tmp = tmp_path_factory.mktemp("serving")
    cfg.train.init, cfg.train.epochs = "scratch", 1
    cfg.features.text_encoder = str(tiny_encoder_dir)  # what the store was built with: the bundle names it
    cfg.tracking.uri, cfg.tracking.experiment = f"sqlite:///{tmp}/mlflow.db", "serving"
    cfg.workdir = str(tmp / "w")  # its own runs and scores; the features are the shared store's
    import shutil

    # Not the runs other modules trained in the shared workdir: the tests below read "the" run's
    # predictions, and a copied one of another test could be found first.
    shutil.copytree(sim_store_files[0].parent.parent, tmp / "w", ignore=shutil.ignore_patterns("runs"))
    result = train(cfg)
    mv = registry.register(cfg, result.run_id)
    registry.set_champion(cfg, mv.version)
    return cfg, result.run_id, mv.version


def test_the_run_logs_a_model_with_signature_and_the_version_is_that_logged_model(champion):
    cfg, run_id, version = champion
    client = registry.tracking.client(cfg)
    model_id = client.get_run(run_id).data.tags[LOGGED_MODEL_TAG]
    logged = client.get_logged_model(model_id)
    assert logged.name == LOGGED_NAME and logged.source_run_id == run_id
    mv = client.get_model_version_by_alias(cfg.tracking.model_name, "champion")
    assert mv.version == version and mv.source == f"models:/{model_id}" and mv.run_id == run_id
    assert json.loads(client.get_logged_model(model_id).tags["mlflow.modelVersions"]) == [
        {"name": cfg.tracking.model_name, "version": version}]
    info = mlflow.models.get_model_info(f"models:/{cfg.tracking.model_name}@champion")
    inputs = {c["name"]: c for c in info.signature.inputs.to_dict()}
    assert {n for n, c in inputs.items() if c["required"]} == {"user_id", "ts", "event_type"}
    assert inputs["food_ids"]["type"] == inputs["ts"]["type"] == "any"
    assert [c["name"] for c in info.signature.outputs.to_dict()] == OUTPUT
    assert {p.name for p in info.signature.params.params} == {"as_of", "user_ids"}
    pyfunc = info.flavors["python_function"]  # models from code: the file, nothing pickled
    assert pyfunc["model_code_path"].endswith("serving_model.py") and "python_model" not in pyfunc


def test_the_champion_loaded_by_alias_scores_raw_events_as_the_nightly_job(champion, tmp_path, caplog):
    cfg, _, _ = champion
    events = pd.read_parquet(cfg.data.events)
    # The users table's columns ride along on the event rows (program_start here).
    events = events.merge(pd.read_parquet(cfg.data.users), on="user_id", how="left")
    # Plus an exact copy of a row and a row without a user: neither changes a score, both are counted.
    clean = events.dropna(subset=["user_id"]).drop_duplicates(subset=["user_id", "ts", "event_type", "text"])
    events = pd.concat([events, clean.iloc[:1], clean.iloc[1:2].assign(user_id=None)], ignore_index=True)
    with caplog.at_level("WARNING", logger="pipeline.serving"):
        pyfunc = registry.load_champion(cfg).predict(events, params={"as_of": AS_OF})
    counts = re.search(r"scoring: (\d+) rows in = (\d+) accepted \+ (\d+) exact duplicates \+ (\d+) rejected",
                       caplog.text)
    rows_in, accepted, dups, rejected = map(int, counts.groups())
    assert rows_in == len(events) == accepted + dups + rejected and dups >= 1 and rejected >= 1
    assert list(pyfunc.columns) == OUTPUT and pyfunc.user_id.is_unique
    assert np.allclose(pyfunc.risk, 1 - pyfunc.p_engaged) and (pyfunc.as_of == pd.Timestamp(AS_OF, tz="UTC")).all()
    nightly = pd.read_parquet(score(cfg, AS_OF, tmp_path / "nightly.parquet"))
    merged = nightly.merge(pyfunc, on="user_id", how="outer", indicator=True)
    assert (merged["_merge"] == "both").all() and len(merged) > 20  # the same users
    assert np.allclose(merged.risk_x, merged.risk_y, atol=1e-5)  # the same scores
    assert set(pyfunc.user_id) <= set(events.user_id.dropna())  # raw ids back, as given


def test_the_served_model_needs_no_file_of_the_training_machine(champion, tmp_path):
    # The logged config names the training run's foods catalog (data.foods); a notebook or
    # server elsewhere does not have it, and the model's vocabulary already holds its foods.
    from pathlib import Path

    cfg, _, _ = champion
    events = pd.read_parquet(cfg.data.events).merge(pd.read_parquet(cfg.data.users), on="user_id", how="left")
    model = registry.load_champion(cfg)
    foods = Path(cfg.data.foods)
    assert foods.exists()
    foods.rename(tmp_path / "elsewhere.parquet")
    try:
        away = model.predict(events, params={"as_of": AS_OF})
    finally:
        (tmp_path / "elsewhere.parquet").rename(foods)
    here = model.predict(events, params={"as_of": AS_OF})
    pd.testing.assert_frame_equal(away, here)
    assert len(here) > 20


@pytest.mark.slow  # a fresh interpreter imports torch and mlflow (~10 s): `make test-full`
def test_a_fresh_process_loads_the_champion_by_alias_with_only_the_project_installed(champion, tmp_path):
    cfg, _, _ = champion
    out = tmp_path / "pyfunc.parquet"
    code = (
        "import mlflow, pandas as pd, sys\n"
        f"mlflow.set_tracking_uri({cfg.tracking.uri!r})\n"
        f"model = mlflow.pyfunc.load_model('models:/{cfg.tracking.model_name}@champion')\n"
        f"events = pd.read_parquet({cfg.data.events!r})\n"
        # The users table's columns ride along on the event rows (program_start here).
        f"events = events.merge(pd.read_parquet({cfg.data.users!r}), on='user_id', how='left')\n"
        f"model.predict(events, params={{'as_of': '{AS_OF}'}}).to_parquet({str(out)!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    fresh = pd.read_parquet(out)
    nightly = pd.read_parquet(score(cfg, AS_OF, tmp_path / "nightly.parquet"))
    merged = nightly.merge(fresh, on="user_id", how="outer", indicator=True)
    assert (merged["_merge"] == "both").all() and len(merged) > 20
    assert np.allclose(merged.risk_x, merged.risk_y, atol=1e-5)


def test_predict_takes_as_of_as_a_column_and_pseudonyms_on_request(champion):
    cfg, _, _ = champion
    model = registry.load_champion(cfg)
    events = pd.read_parquet(cfg.data.events)
    events = events[events.user_id.isin(events.user_id.dropna().unique()[:5])]
    by_param = model.predict(events, params={"as_of": AS_OF})
    by_column = model.predict(events.assign(as_of=AS_OF))
    pd.testing.assert_frame_equal(by_param, by_column)
    hidden = model.predict(events, params={"as_of": AS_OF, "user_ids": "pseudonym"})
    assert not set(hidden.user_id) & set(by_param.user_id) and hidden.user_id.str.len().eq(16).all()
    with pytest.raises(Exception, match="no as_of"):
        model.predict(events)


@pytest.mark.slow  # starts `mlflow models serve` (~30 s): `make test-full`
def test_mlflow_models_serve_answers_invocations_with_the_same_scores(champion, tmp_path):
    cfg, _, _ = champion
    port = _free_port()
    from pipeline.serving import serve_command

    cmd, env = serve_command(cfg, "127.0.0.1", port)  # what `make serve` runs
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):
            assert proc.poll() is None, "the server exited"
            try:
                urllib.request.urlopen(f"{url}/ping", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        events = pd.read_parquet(cfg.data.events)
        events = events[events.user_id.isin(events.user_id.dropna().unique()[:6])]
        payload = {"dataframe_split": json.loads(events.assign(ts=events.ts.astype(str)).to_json(orient="split",
                                                                                                  index=False)),
                   "params": {"as_of": AS_OF}}
        request = urllib.request.Request(f"{url}/invocations", data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=120).read())
        served = pd.DataFrame(answer["predictions"])
        local = registry.load_champion(cfg).predict(events, params={"as_of": AS_OF})
        assert served.user_id.tolist() == local.user_id.tolist()
        assert np.allclose(served.risk, local.risk, atol=1e-6)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow  # starts `mlflow server` (~15 s): `make test-full`
def test_the_rest_api_shows_the_alias_the_logged_model_and_its_signature(champion, tmp_path):
    cfg, run_id, version = champion
    port = _free_port()
    db = cfg.tracking.uri.removeprefix("sqlite:///")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{db}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        api = f"http://127.0.0.1:{port}/api/2.0/mlflow"

        def get(path: str) -> dict:
            return json.loads(urllib.request.urlopen(f"{api}/{path}", timeout=10).read())

        for _ in range(120):
            assert proc.poll() is None, "the server exited"
            try:
                get("experiments/search?max_results=1")
                break
            except OSError:
                time.sleep(0.5)
        mv = get(f"registered-models/alias?name={cfg.tracking.model_name}&alias=champion")["model_version"]
        assert mv["version"] == str(version) and mv["run_id"] == run_id
        model_id = mv["source"].removeprefix("models:/")
        logged = get(f"logged-models/{model_id}")["model"]["info"]
        assert logged["name"] == "engagement" and logged["source_run_id"] == run_id
        # The signature, as the UI reads it: the MLmodel file of the logged model, over HTTP.
        mlflow.set_tracking_uri(f"http://127.0.0.1:{port}")
        try:
            sig = mlflow.models.get_model_info(f"models:/{cfg.tracking.model_name}@champion").signature
        finally:
            mlflow.set_tracking_uri(cfg.tracking.uri)
        assert {c["name"] for c in sig.inputs.to_dict()} >= {"user_id", "ts", "event_type", "food_ids"}
        assert {p.name for p in sig.params.params} == {"as_of", "user_ids"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _evaluated_with(champion, flag: str):
    """evaluate() of the fixture's run with `eval.<flag>` on: (config, result, MLflow client,
    experiment id, the raw events with the users table's columns)."""
    import copy

    from pipeline.evaluation.evaluate import evaluate

    cfg = copy.deepcopy(champion[0])
    setattr(cfg.eval, flag, True)
    result = evaluate(cfg)  # the run the fixture trained; logs the baselines and the blend with their models
    client = registry.tracking.client(cfg)
    exp = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    events = pd.read_parquet(cfg.data.events).merge(pd.read_parquet(cfg.data.users), on="user_id", how="left")
    return cfg, result, client, exp, events


def _as_champion_the_nightly_job_scores_like_its_model(cfg, version, model, events, path):
    registry.set_champion(cfg, version)
    nightly = pd.read_parquet(score(cfg, AS_OF, path))
    assert (nightly.model_version == str(version)).all()
    raw = model.predict(events, params={"as_of": AS_OF}).set_index("user_id")["risk"]
    assert np.allclose(nightly.set_index("user_id")["risk"], raw.reindex(nightly.user_id), atol=1e-9)


@pytest.mark.slow  # a whole evaluate (~6 s): `make test-full`
def test_gradient_boosting_is_a_model_too_and_can_be_the_champion(champion, tmp_path):
    from features.dataset import load_examples
    from features.store import feature_files
    from pipeline.evaluation.evaluate import baselines_cache
    from pipeline.paths import Paths

    _, run_id, version = champion
    cfg, result, client, exp, events = _evaluated_with(champion, "champion_hgb")  # gradient boosting competes too
    try:
        files = feature_files(Paths.of(cfg).features)
        examples, user_key, _ = load_examples(files)
        cached = pd.read_parquet(baselines_cache(cfg, files))
        at = examples["as_of"] == int(pd.Timestamp(AS_OF, tz="UTC").timestamp())
        runs, models = {"model": run_id}, {}
        for name in ("hgb", "hgb_text"):  # on aggregates; with message scores (reads the messages' text)
            runs[name] = (found := client.search_runs([exp], f"tags.baseline = '{name}'")[0]).info.run_id
            models[name] = mlflow.pyfunc.load_model(f"models:/{found.data.tags[LOGGED_MODEL_TAG]}")
            scored = models[name].predict(events, params={"as_of": AS_OF, "user_ids": "pseudonym"})
            # The evaluation's own predictions of the same users at the same cutoff.
            expected = pd.Series(cached[name].to_numpy()[at], index=user_key[at].astype(str)).dropna()
            assert len(expected) > 20
            assert np.allclose(scored.set_index("user_id")["p_engaged"].reindex(expected.index), expected, atol=1e-9), name
        assert models["hgb_text"].unwrap_python_model().scorer.estimator.scorer is not None  # it learned from text

        # The alias went to the best on validation (a later candidate only when strictly better),
        # and the nightly job scores with it.
        val = {name: result.metrics[name]["val"]["roc_auc"] for name in runs}
        best = max(val.values())
        champ = client.get_model_version_by_alias(cfg.tracking.model_name, "champion")
        assert champ.run_id == runs[next(name for name in runs if val[name] == best)]
        nightly = pd.read_parquet(score(cfg, AS_OF, tmp_path / "nightly.parquet"))
        by_champion = registry.load_champion(cfg).predict(events, params={"as_of": AS_OF})
        merged = nightly.merge(by_champion, on="user_id")
        assert len(merged) == len(nightly) > 20 and np.allclose(merged.risk_x, merged.risk_y, atol=1e-5)

        # With either gradient boosting as the champion: the nightly job scores with it, and the
        # gate re-scores it on the candidate's examples (its val ROC-AUC, as evaluate measured it).
        rows = {"val": np.flatnonzero((examples["split"] == 1) & (examples["label"] >= 0))}
        for name in ("hgb", "hgb_text"):
            gbm_version = registry.register(cfg, runs[name]).version
            _as_champion_the_nightly_job_scores_like_its_model(cfg, gbm_version, models[name], events,
                                                               tmp_path / f"{name}.parquet")
            decision = registry.gate(cfg, run_id, files, rows, examples["label"], {"val": np.full(len(rows["val"]), 0.5)})
            assert decision.champion == pytest.approx(val[name]) and not decision.promoted
    finally:
        registry.set_champion(cfg, version)  # the other tests of this module expect the sequence model


@pytest.mark.slow  # a whole evaluate (~6 s): `make test-full`
def test_the_blend_is_a_model_too_and_can_be_the_champion(champion, tmp_path):
    from features.dataset import load_examples
    from features.store import feature_files
    from pipeline.evaluation.blend import blend, crossfit_blend
    from pipeline.evaluation.evaluate import baselines_cache
    from pipeline.evaluation.metrics import binary_metrics
    from pipeline.paths import Paths
    from pipeline.training.train import PREDICTIONS

    _, run_id, version = champion
    cfg, result, client, exp, events = _evaluated_with(champion, "champion_blend")  # the blend competes too
    try:
        run = client.search_runs([exp], f"tags.blend_of = '{run_id}'")[0]
        model = mlflow.pyfunc.load_model(f"models:/{run.data.tags[LOGGED_MODEL_TAG]}")
        bundle = model.unwrap_python_model().scorer
        assert bundle.model is not None and bundle.estimator is not None and len(bundle.blend) == 3
        scored = model.predict(events, params={"as_of": AS_OF, "user_ids": "pseudonym"})
        # Equal to blending the evaluation's own predictions of both models with the bundle's numbers.
        files = feature_files(Paths.of(cfg).features)
        examples, user_key, _ = load_examples(files)
        # The blend's gradient boosting (eval.blend_with: with message scores, by default).
        hgb = pd.read_parquet(baselines_cache(cfg, files))[cfg.eval.blend_with].to_numpy()
        preds = pd.read_parquet(next(Paths.of(cfg).runs.glob(f"*/{PREDICTIONS}")))
        p_model = pd.Series(preds.p_engaged.to_numpy(), index=preds.example.to_numpy()).reindex(np.arange(len(hgb)))
        at = (examples["as_of"] == int(pd.Timestamp(AS_OF, tz="UTC").timestamp())) & p_model.notna().to_numpy()
        expected = pd.Series(blend(p_model.to_numpy()[at], hgb[at], *bundle.blend), index=user_key[at].astype(str))
        assert len(expected) > 20
        assert np.allclose(scored.set_index("user_id")["p_engaged"].reindex(expected.index), expected, atol=1e-5)

        # The gate saw the blend's out-of-fold validation figure; with the blend as the champion the
        # nightly job scores with it, and the gate re-scores it through its bundle.
        assert run.data.metrics["val_roc_auc"] == pytest.approx(result.metrics["blend"]["val"]["roc_auc"])
        blend_version = registry.register(cfg, run.info.run_id).version
        _as_champion_the_nightly_job_scores_like_its_model(cfg, blend_version, model, events, tmp_path / "blend.parquet")
        rows = {"val": np.flatnonzero((examples["split"] == 1) & (examples["label"] >= 0))}
        decision = registry.gate(cfg, run_id, files, rows, examples["label"], {"val": np.full(len(rows["val"]), 0.5)})
        # Re-scored out of fold, as the blend candidate is: the bundle's own numbers were fitted
        # on this very validation split, so with them it would read high (in-sample).
        val, y = rows["val"], examples["label"][rows["val"]]
        out_of_fold = crossfit_blend(p_model.to_numpy()[val], hgb[val], y, user_key[val])
        in_sample = blend(p_model.to_numpy()[val], hgb[val], *bundle.blend)
        assert decision.champion == pytest.approx(binary_metrics(y, out_of_fold)["roc_auc"], abs=1e-6)
        assert decision.champion != pytest.approx(binary_metrics(y, in_sample)["roc_auc"], abs=1e-6)
        assert decision.champion == pytest.approx(run.data.metrics["val_roc_auc"], abs=1e-6)  # its own gate figure
        assert not decision.promoted
    finally:
        registry.set_champion(cfg, version)  # the other tests of this module expect the sequence model


def test_a_model_without_the_conversation_stream_scores_events_that_include_messages(sim_store, tiny_encoder_dir,
                                                                                      tmp_path):
    """A model trained on a log without messages (text_dim 0, e.g. KDD Cup's events only) needs no
    text encoder to score: messages in the scored events are read as events, never encoded."""
    from dataclasses import replace

    from features.store import read_meta
    from models.checkpoint import save_model
    from models.engagement import EngagementModel
    from pipeline.config import to_dict
    from pipeline.serving import Scorer

    path, cfg, mcfg = sim_store
    cfg.features.text_encoder = str(tiny_encoder_dir)  # 16-d vectors, which this model never had
    mcfg = replace(mcfg, streams=["events"], text_dim=0)
    save_model(tmp_path / "m.pt", EngagementModel(mcfg), mcfg, to_dict(cfg), 0, 0.5)
    scorer = Scorer(Scorer.write_bundle(tmp_path / "bundle", cfg, read_meta(path).vocab, checkpoint=tmp_path / "m.pt"))
    events = pd.read_parquet(cfg.data.events)
    assert (events.event_type == "message").any()
    scored = scorer.predict(events, AS_OF)
    assert len(scored) > 20 and scored.p_engaged.between(0, 1).all()

    # Blended with gradient boosting with message scores fitted on that log (no message: no
    # scorer), it still encodes nothing.

    from features.aggregates import aggregates_of
    from features.dataset import load_examples
    from pipeline.evaluation.message_scores import MessageScoredHGB, RecentMessages

    examples, user_key, _ = load_examples([path])
    X, names = aggregates_of([path])
    none = RecentMessages.none(len(X))
    text = MessageScoredHGB().fit(X, none, examples["label"], examples["split"], user_key)
    attrs = read_meta(path).attributes
    bundle = Scorer.write_bundle(tmp_path / "blend", cfg, read_meta(path).vocab, checkpoint=tmp_path / "m.pt",
                                 estimator=(text, names, [*attrs["categorical"], *attrs["numeric"]]),
                                 blend=(0.5, 1.0, 0.0))
    blended = Scorer(bundle).predict(events, AS_OF)
    assert len(blended) == len(scored) and blended.p_engaged.between(0, 1).all()


def test_the_logged_requirements_cover_every_library_scoring_imports():
    # A logged model scores raw events through the feature build: every third-party library the
    # scoring code imports (at the top or inside a function) must come with the pinned
    # requirements, directly or as their dependency, or a fresh environment fails at scoring.
    import ast
    from importlib.metadata import packages_distributions, requires
    from pathlib import Path

    from packaging.requirements import Requirement

    from pipeline.serving import requirements

    def closure(names):
        seen, todo = set(), [n.lower() for n in names]
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            for req in map(Requirement, requires(name) or []):
                if req.marker is None or req.marker.evaluate({"extra": ""}):  # what installs here, no extras
                    todo.append(req.name.lower().replace("_", "-"))
        return seen

    shipped = closure(p.split("==")[0] for p in requirements("minilm"))  # the demo's text encoder
    files = [*Path("features").rglob("*.py"), *Path("models").glob("*.py"), *Path("common").glob("*.py"),
             Path("pipeline/serving.py"), *Path("pipeline/evaluation").glob("*.py")]
    imported = set()
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    ours = {"common", "features", "models", "pipeline", "jobs", "tests", "benchmarks"}
    third_party = imported - set(sys.stdlib_module_names) - ours - {"__future__"}
    dists = packages_distributions()
    missing = {m: dists.get(m) for m in third_party
               if not any(d.lower().replace("_", "-") in shipped for d in dists.get(m, [m]))}
    assert len(third_party) > 8 and not missing, missing
