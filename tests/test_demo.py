"""`make demo` end to end at test size: simulate -> validate -> features -> pretrain -> train
-> evaluate -> compare through `pipeline.demo.demo`, the function the CLI calls; then a
second run that reuses everything it built."""

import shutil

import mlflow
import pytest

from pipeline.config import load_config
from pipeline.demo import demo
from pipeline.evaluation.registry import CHAMPION
from pipeline.paths import Paths


@pytest.mark.slow  # over ~10 s: `make test-full`
def test_demo_runs_every_stage_then_reuses_them(sim_store_files, tiny_encoder_dir, tmp_path, capsys):
    path, _ = sim_store_files
    shutil.copytree(path.parent, tmp_path / "w" / "features")  # the same inputs: the store is reused
    cfg = load_config("configs/test.yaml", [f"workdir={tmp_path / 'w'}", f"tracking.uri=sqlite:///{tmp_path}/m.db",
                                            f"features.text_encoder={tiny_encoder_dir}"])
    demo(cfg)
    out = capsys.readouterr().out
    banners = [line for line in out.splitlines() if line.startswith("=== [")]
    assert [b.split("] ", 1)[1].rstrip("= ") for b in banners] == [
        "data + validation + features", "pretrain encoders",
        "train: fine-tune the pretrained encoders, evaluate beside the baselines",
        "compare (read back from MLflow)", "where to look"]
    paths = Paths.of(cfg)
    assert (paths.raw / "events.parquet").exists() and (paths.validated / "quarantine.parquet").exists()
    assert sorted(p.name for p in paths.pretrain.glob("*.pt")) == ["conversation.pt", "events.pt", "food.pt", "last.pt"]
    table = out.split("compare (read back from MLflow)")[1]
    for row in ("oracle", "pretrained-100pct-all-cls", "hgb", "logistic", "active_last_week", "prevalence"):
        assert row in table, row

    client = mlflow.MlflowClient(cfg.tracking.uri)
    champion = client.get_model_version_by_alias(cfg.tracking.model_name, CHAMPION)
    assert client.get_run(champion.run_id).info.run_name == "pretrained-100pct-all-cls"

    demo(cfg)  # again: nothing is rebuilt or retrained
    again = capsys.readouterr().out
    assert "is up to date (same inputs and settings); reusing it" in again
    assert "pretrain: encoders in" in again and "are up to date; reusing them" in again
    assert "pretrained-100pct-all-cls is already trained on these features" in again
    assert "already the champion" in again
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
                              filter_string="tags.stage = 'train'")
    assert len(runs) == 1  # the second demo trained nothing
