"""The simulator's section of the config (`sim`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SimConfig:
    users: int = 2000
    weeks: int = 16
    seed: int = 0
    start_date: str = "2026-01-05"  # a Monday; cutoffs fall on Mondays at 00:00 UTC
    truth_samples: int = 256  # Monte-Carlo replicates per (user, cutoff) for p_engaged
    dirty_fraction: float = 0.0  # share of deliberately bad rows appended (shows the quarantine)
