"""How much a model could gain on the simulator, and from what: gradient boosting on the demo
store's aggregates and message columns, plus facts from the simulator's hidden side, one group
at a time. A diagnostic (docs/results.md): the hidden facts are never a model input.

    python -m pipeline.diagnostics.headroom --config configs/demo.yaml

re-runs the simulation of the config's `sim` section (deterministic for its seed), matches each
example of `<workdir>/features` to its user and cutoff day (and checks that the label recomputed
from the hidden history is the store's), and prints val / test / out-of-time ROC-AUC of:
- `hgb`, `hgb_text`: the two boosting models of `make train`;
- + what the user announced: per life event kind (trip, work crunch, decision to quit) announced
  before the cutoff, the days of it inside the label's window and the days until it starts
  (what a perfect reader of the messages would know);
- + every booked life event, announced or not, illness included;
- + the hidden state at the cutoff: motivation and the user's fixed traits;
- the oracle (the simulator's own probability).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from features.aggregates import aggregates_of
from features.contract import USER_ID
from features.store import SPLITS, UNLABELLED, feature_files, load_arrays
from features.vocab import pseudonyms
from pipeline.config import load_config
from pipeline.evaluation.baselines import hgb_candidates, tuned
from pipeline.evaluation.message_scores import MessageScoredHGB, recent_user_messages
from pipeline.paths import Paths
from pipeline.simulator.run import Simulation, day_zero, run_simulation

KINDS = ("travel", "busy", "illness", "quit")


@dataclass
class Matched:
    """The store's examples beside the simulation they came from."""

    user: np.ndarray  # (n,) the simulator's user row of each example
    day: np.ndarray  # (n,) the cutoff's day index
    label: np.ndarray
    split: np.ndarray
    sim: Simulation
    row_of: dict[str, int]  # raw user id -> the simulator's user row
    horizon: int
    day0: pd.Timestamp


def match(cfg, store: str) -> Matched:
    """Simulate `cfg.sim` again and match the examples of `store`; raises when the labels
    recomputed from the hidden history are not the store's (another seed or config)."""
    sim = run_simulation(cfg.sim)
    n_days = sim.history.active.shape[0]
    raw = sim.tables["users"][USER_ID].to_numpy(zero_copy_only=False).astype(str)  # in user-row order
    row_of_key = dict(zip(pseudonyms(raw, cfg.features.pseudonym_key).tolist(), range(len(raw))))
    a, _ = load_arrays(store, ("examples", "users"))
    ex = a["examples"]
    user = np.array([row_of_key[k] for k in a["users"]["key"][ex["user_row"]].tolist()])
    day = (ex["as_of"].astype(np.int64) - day_zero(cfg.sim.start_date).value // 10**9) // 86400
    lc = cfg.labels
    active = sum(sim.history.active[np.minimum(day + j, n_days - 1), user].astype(int) for j in range(lc.horizon_days))
    labelled = ex["label"] != UNLABELLED
    if not np.array_equal(active[labelled] >= lc.min_active_days, ex["label"][labelled] == 1):
        raise ValueError(f"{store}: its labels are not this simulation's (another sim seed or size?)")
    return Matched(user, day, ex["label"], ex["split"], sim, dict(zip(raw, range(len(raw)))), lc.horizon_days,
                   day_zero(cfg.sim.start_date))


def life_columns(m: Matched, announced_only: bool) -> np.ndarray:
    """(n, 2 x len(KINDS)): per kind, the most days of one such event inside the label's window
    and the days until the next one not yet over starts (99: none), of the events known before
    the cutoff: announced in a message, or (announced_only=False) booked."""
    lives = m.sim.life_events
    days = {c: ((lives[c] - m.day0).dt.total_seconds() / 86400).to_numpy() for c in ("booked", "start", "end", "announced_at")}
    ev = pd.DataFrame({"user": lives[USER_ID].map(m.row_of).to_numpy(), "kind": lives["kind"], **days})
    ex = pd.DataFrame({"example": np.arange(len(m.user)), "user": m.user, "day": m.day})
    pairs = ex.merge(ev, on="user")
    known = pairs["announced_at"] < pairs["day"] if announced_only else pairs["booked"] < pairs["day"]
    pairs = pairs[known.to_numpy()]
    end = pairs["end"].fillna(np.inf)  # a decision to quit has no end
    pairs = pairs.assign(
        overlap=np.clip(np.minimum(end, pairs["day"] + m.horizon) - np.maximum(pairs["start"], pairs["day"]), 0, m.horizon),
        ahead=np.where(end > pairs["day"], np.maximum(pairs["start"] - pairs["day"], 0), 99.0),
    )
    cols = []
    for kind in KINDS:
        g = pairs[pairs["kind"] == kind].groupby("example")
        overlap, ahead = np.zeros(len(m.user)), np.full(len(m.user), 99.0)
        if len(g):
            most, soonest = g["overlap"].max(), g["ahead"].min()
            overlap[most.index], ahead[soonest.index] = most.to_numpy(), soonest.to_numpy()
        cols += [overlap, ahead]
    return np.column_stack(cols)


def hidden_state(m: Matched) -> np.ndarray:
    """(n, 6): motivation at the cutoff, whether the user had quit, and fixed traits."""
    h, t, u = m.sim.history, m.sim.traits, m.user
    return np.column_stack([h.motivation[m.day, u], h.churned[np.maximum(m.day - 1, 0), u],
                            t.base[u], t.respond[u], t.mu0[u], t.fatigue[u]])


def oracle(m: Matched) -> np.ndarray:
    truth = m.sim.tables["truth"].to_pandas()
    key = pd.DataFrame({"user": truth[USER_ID].map(m.row_of),
                        "day": ((truth["as_of"] - m.day0).dt.total_seconds() // 86400).astype(int),
                        "p": truth["p_engaged"]})
    got = pd.DataFrame({"user": m.user, "day": m.day}).merge(key, on=["user", "day"], how="left")
    return got["p"].fillna(0.5).to_numpy()


def auc_by_split(m: Matched, p: np.ndarray) -> list[float]:
    out = []
    for name in ("val", "test", "oot"):
        rows = (m.label != UNLABELLED) & (m.split == SPLITS.index(name))
        out.append(roc_auc_score(m.label[rows], p[rows]) if len(np.unique(m.label[rows])) == 2 else float("nan"))
    return out


def headroom(cfg) -> list[tuple[str, list[float]]]:
    """[(variant, [val, test, oot ROC-AUC])] for the store under `cfg`'s workdir."""
    files = [str(f) for f in feature_files(Paths.of(cfg).features)]
    if len(files) != 1:
        raise ValueError("the headroom diagnostic reads one unsharded store")
    m = match(cfg, files[0])
    X, _ = aggregates_of(files)
    y, split = m.label, m.split
    train = (y != UNLABELLED) & (split == SPLITS.index("train"))
    val = (y != UNLABELLED) & (split == SPLITS.index("val"))
    groups = load_arrays(files[0], ("examples",))[0]["examples"]["user_row"]
    text = MessageScoredHGB().fit_columns(X, recent_user_messages(files), y, train, groups)
    rows = [("oracle (the simulator's own probability)", auc_by_split(m, oracle(m)))]
    for name, Z in [
        ("hgb: aggregates", X),
        ("hgb_text: + message columns", text),
        ("+ life events the user announced (a perfect reader)", np.hstack([text, life_columns(m, True)])),
        ("+ every booked life event, announced or not", np.hstack([text, life_columns(m, False)])),
        ("+ the hidden state at the cutoff (motivation, traits)", np.hstack([text, hidden_state(m)])),
        ("+ both", np.hstack([text, life_columns(m, False), hidden_state(m)])),
    ]:
        model = tuned(hgb_candidates(0), Z, y, train, val, name)
        rows.append((name, auc_by_split(m, model.predict_proba(Z)[:, 1])))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    print(f"{'':58s} {'val':>7s} {'test':>7s} {'oot':>7s}")
    for name, aucs in headroom(load_config(args.config, args.overrides)):
        print(f"{name:58s} " + " ".join(f"{a:7.4f}" for a in aucs))


if __name__ == "__main__":
    main()
