"""One training-step measurement at one sequence length, in its own process so that its
peak memory is its own (`benchmarks.run` runs one per length):

    python -m benchmarks.train_length MODEL_CONFIG_JSON LENGTH BATCH STEPS DEVICE

Every stream of a synthetic batch (the batch contract's factory, models/synthetic.py)
holds LENGTH items; max_len_* are set to LENGTH. Prints one JSON line: examples/s of the
fastest of STEPS steps (forward, backward, clipping, AdamW) and the peak memory of the
warm-up and timed steps above the level before them (optimizer state, gradients and
activations; the weights and the batch are already there).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys

import torch

from benchmarks.measure import MB, PeakMemory, best_of, rss_bytes
from common.devices import autocast
from features.store import STREAMS
from models.config import ModelConfig
from models.engagement import EngagementModel
from models.synthetic import random_batch
from pipeline.training import loop


def train_step(model, optimizer, batch: dict, device: torch.device) -> None:
    batch = loop.to_device(batch, device)
    with autocast(device):
        _, loss = model(batch, batch["label"])
    loop.optimizer_step(loss, optimizer, model.parameters(), 1.0)
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(config_json: str, length: int, batch_size: int, steps: int, device_name: str) -> dict:
    device = torch.device(device_name)
    L = length
    cfg = dataclasses.replace(ModelConfig(**json.loads(config_json)),
                              max_len_conversation=L, max_len_food=L, max_len_events=L)
    torch.manual_seed(0)
    model = EngagementModel(cfg).to(device)
    optimizer = loop.make_optimizer(model, 1e-3, 0.01)
    batch = random_batch(cfg, B=batch_size, T=L, lengths={s: [L] * batch_size for s in STREAMS})
    step = functools.partial(train_step, model, optimizer, batch, device)
    with PeakMemory(device) as mem:
        step()  # warm-up: allocates the optimizer state
        seconds, _ = best_of(step, steps)
    return {"examples_per_s": batch_size / seconds, "step_seconds": seconds, "peak_mb": round(mem.peak_mb, 1),
            "rss_before_mb": round(rss_bytes() / MB, 1) if device.type == "cpu" else None}


if __name__ == "__main__":
    a = sys.argv[1:]
    print(json.dumps(main(a[0], int(a[1]), int(a[2]), int(a[3]), a[4])))
