import pytest

from common.errors import UserError
from pipeline.cli import main
from pipeline.config import load_config, save_config


def test_yaml_defaults_chain_and_overrides_merge():
    cfg = load_config("configs/test.yaml", ["model.d_model=24", "labels.oot_cutoffs=3"])
    assert cfg.name == "test"  # test.yaml overrides demo.yaml
    assert cfg.sim.users == 60
    assert cfg.features.text_encoder == "minilm"  # inherited from demo.yaml
    assert cfg.model.d_model == 24 and cfg.labels.oot_cutoffs == 3
    assert cfg.data.events == "data/test/raw/events.parquet"  # ${workdir} interpolation


def test_typed_schema_rejects_unknown_keys_and_bad_types():
    with pytest.raises(UserError, match="bogus"):
        load_config("configs/test.yaml", ["model.bogus=1"])
    with pytest.raises(UserError, match="d_model"):
        load_config("configs/test.yaml", ["model.d_model=wide"])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config("configs/test.yaml", ["train.lr=0.123"])
    path = save_config(cfg, tmp_path)
    again = load_config(path)
    assert again == cfg


def test_cli_show_config_and_missing_file(capsys):
    assert main(["train", "--config", "configs/test.yaml", "--show-config", "train.epochs=7"]) == 0
    assert "epochs: 7" in capsys.readouterr().out
    assert main(["train", "--config", "configs/missing.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "configs/missing.yaml" in err


def test_every_shipped_config_loads_and_production_names_distilbert():
    import glob

    for path in glob.glob("configs/*.yaml"):
        if path.endswith("experiments.yaml"):
            continue
        cfg = load_config(path)
        assert cfg.name
        # to_dict's plain copy (dataclasses.asdict, fast) is OmegaConf's own, the key made public
        from omegaconf import OmegaConf

        from features.config import public
        from pipeline.config import to_dict, to_yaml

        via_omegaconf = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
        assert to_dict(cfg) == via_omegaconf | {"features": public(via_omegaconf["features"])}, path
        # and to_yaml's text (PyYAML's emitter, fast) is OmegaConf's
        assert to_yaml(cfg) == OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg))), path
    assert load_config("configs/production.yaml").features.text_encoder == "distilbert-base-uncased"
