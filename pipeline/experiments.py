"""`make experiments`: pretrained vs scratch at 5/20/100% of the labelled training users,
ablations without each encoder, CLS vs mean pooling, encoders pretrained with the future
objective too (configs/experiments.yaml), each a train + evaluate run on the same feature
build (the future runs pretrain their own encoders first), then the comparison from MLflow."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from common.errors import UserError
from pipeline.config import Config, load_config, to_dict
from pipeline.evaluation.compare import compare
from pipeline.evaluation.evaluate import evaluate
from pipeline.pretraining.pretrain import pretrain
from pipeline.training.train import train

EXPERIMENTS = Path(__file__).resolve().parent.parent / "configs" / "experiments.yaml"


def experiment_configs(config_path: str, overrides: list[str], only: list[str] | None = None,
                       spec: Path = EXPERIMENTS) -> dict[str, Config]:
    runs = OmegaConf.to_container(OmegaConf.load(spec))
    unknown = set(only or []) - set(runs)
    if unknown:
        raise UserError(f"{spec}: no experiment {sorted(unknown)}; choose from {', '.join(runs)}")
    return {name: load_config(config_path, list(overrides) + list(extra))
            for name, extra in runs.items() if not only or name in only}


def own_pretraining(cfg: Config, base: Config) -> bool:
    """Whether an experiment needs encoders of its own: pretrained init and a `pretrain`
    section of its own (the others share the encoders `make pretrain` wrote for the config)."""
    return cfg.train.init == "pretrained" and to_dict(cfg)["pretrain"] != to_dict(base)["pretrain"]


def experiments(config_path: str, overrides: list[str], only: list[str] | None = None) -> None:
    configs = experiment_configs(config_path, overrides, only)
    base = load_config(config_path, list(overrides))
    for i, (name, cfg) in enumerate(configs.items(), 1):
        print(f"\n=== experiment {i}/{len(configs)}: {name} ===", flush=True)
        if own_pretraining(cfg, base):
            pretrain(cfg)  # reused when its encoders are current
        result = train(cfg)
        evaluate(cfg, result.run_dir)
    compare(next(iter(configs.values())))
