"""The diagnose command on a real (tiny) store, and the experiment grid."""

from pipeline.diagnose import diagnose
from pipeline.experiments import experiment_configs


def test_diagnose_runs_every_check_on_real_batches(sim_store, capsys):
    _, cfg, _ = sim_store
    results = diagnose(cfg, n_batches=4, batch_size=16)
    names = {r.name for r in results}
    out = capsys.readouterr().out
    assert {"data: conversation stream", "data: food stream", "data: events stream", "data: labels"} <= names
    assert len(results) >= 11 and out.count("PASS") + out.count("FAIL") == len(results)
    by_name = {r.name: r for r in results}
    # A correct batch-first model passes the checks that catch the seed's bug.
    for key in by_name:
        if "independ" in key or "padding" in key:
            assert by_name[key].passed, by_name[key]
    assert "verdict:" in out


def test_experiment_grid_covers_label_fractions_ablations_and_pooling():
    configs = experiment_configs("configs/test.yaml", ["workdir=/tmp/unused"])
    fractions = {(c.train.init, c.train.label_fraction) for c in configs.values()}
    assert {(i, f) for i in ("pretrained", "scratch") for f in (0.05, 0.2, 1.0)} <= fractions
    streams = {tuple(c.model.streams) for c in configs.values()}
    assert {("food", "events"), ("conversation", "events"), ("conversation", "food")} <= streams
    assert {c.model.pooling for c in configs.values()} == {"cls", "mean"}
    from pipeline.train import run_name

    assert len({run_name(c) for c in configs.values()}) == len(configs)  # distinct MLflow runs
