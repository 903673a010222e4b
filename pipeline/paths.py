"""Where every stage reads and writes, derived from `Config.workdir` (one place)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from features.store import FEATURE_FILE, shard_file_name


@dataclass(frozen=True)
class Paths:
    root: Path
    cache_dir: str = ""
    vocab_path: str = ""
    pretrain_dir: str = ""

    @classmethod
    def of(cls, cfg) -> Paths:
        return cls(Path(cfg.workdir), cfg.features.cache_dir, cfg.features.vocab_path, cfg.pretrain.dir)

    @property
    def raw(self) -> Path:  # simulator output: events/users/foods/truth parquet
        return self.root / "raw"

    @property
    def validated(self) -> Path:  # accepted events, quarantine, validation.json
        return self.root / "validated"

    @property
    def features(self) -> Path:
        return self.root / "features"

    @property
    def feature_file(self) -> Path:
        return self.features / FEATURE_FILE

    @property
    def text_cache(self) -> Path:  # message vectors keyed by (encoder, text hash); no text
        return Path(self.cache_dir) if self.cache_dir else self.features / "text_cache"

    @property
    def vocab(self) -> Path:
        return Path(self.vocab_path) if self.vocab_path else self.features / "vocab.json"

    @property
    def pretrain(self) -> Path:
        return Path(self.pretrain_dir) if self.pretrain_dir else self.root / "pretrain"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def jobs(self) -> Path:
        return self.root / "jobs"

    def shard_feature_file(self, shard: int, num_shards: int) -> Path:
        return self.features / shard_file_name(shard, num_shards)
