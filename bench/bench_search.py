"""The search against an 11-point grid over the generalist share: same task, seeds and machine, one run.

    grid    every share in linspace(0, search.max_share, 11), each trained to the end and scored on the whole
            dev split (the search's trial code, with the 11 shares enqueued and no pruner)
    search  `mixtune search` with params.yaml's search section (baselines 0 and 0.5, then seeded TPE, pruning)

Target (issue 4): the search's best dev metric within 1 point (0.01) of the grid's best, for at most a third
of the grid's training compute, counted in trained tokens (non-padding tokens of every step each trial took).
Each arm runs in its own workspace under .cache/bench/search/ (its own study and MLflow store), on a copy of
prepared/ from `make run`; an interrupted benchmark continues both studies where they stopped (delete that folder
to start over).

    python bench/bench_search.py
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "search.json"
POINTS, MAX_GAP, MAX_COMPUTE = 11, 0.01, 1 / 3


def arm(name: str, grid: bool) -> dict:
    from mixtune import search
    from mixtune.config import load_section

    params = REPO / "params.yaml"
    cfg, mix_cfg, train_cfg, model_cfg, eval_cfg = (load_section(s, params) for s in
                                                     ("search", "mix", "train", "model", "evaluate"))
    model_cfg = model_cfg.model_copy(update={"base": str(REPO / model_cfg.base)})
    shares = tuple(round(cfg.max_share * i / (POINTS - 1), 4) for i in range(POINTS)) if grid else search.BASELINES
    if grid:  # every point to the end: no pruner, and no intermediate dev evaluations to pay for
        cfg = cfg.model_copy(update={"n_trials": POINTS, "pruner": "none", "eval_every": 10**9})
    ws = REPO / ".cache" / "bench" / "search" / name  # kept: a re-run continues each arm's study
    shutil.copytree(REPO / "prepared", ws / "prepared", dirs_exist_ok=True)
    os.chdir(ws)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{ws / 'mlruns.db'}"
    t = time.perf_counter()
    best = search.run(cfg, mix_cfg, train_cfg, model_cfg, eval_cfg, baselines=shares)
    seconds = time.perf_counter() - t
    with open(ws / "search" / "trials.csv") as f:
        trials = [{k: (float(v) if v and k != "state" else v) for k, v in row.items()} for row in csv.DictReader(f)]
    # The comparison is of the trials themselves: the best share either arm measured.
    return {"best_share": best["best_trial_share"], "best_dev_metric": best["best_trial_dev"],
            "recommended_share": best["recommended_share"],
            "trained_tokens": best["trained_tokens_total"], "seconds": seconds, "trials": trials}


def main() -> None:
    sys.path.insert(0, str(REPO / "src"))
    from mixtune.files import write_json

    grid = arm("grid", grid=True)
    found = arm("search", grid=False)
    gap = grid["best_dev_metric"] - found["best_dev_metric"]
    compute = found["trained_tokens"] / grid["trained_tokens"]
    result = {"when": datetime.now(UTC).isoformat(timespec="seconds"), "grid": grid, "search": found, "gap": gap, "compute_ratio": compute,
              "target": {"max_gap": MAX_GAP, "max_compute_ratio": MAX_COMPUTE},
              "met": gap <= MAX_GAP and compute <= MAX_COMPUTE}
    write_json(RESULTS, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("grid", "search")}, indent=1))
    print(f"grid best {grid['best_dev_metric']:.3f} at r={grid['best_share']}, {grid['trained_tokens']} tokens; "
          f"search best {found['best_dev_metric']:.3f} at r={found['best_share']:.2f}, {found['trained_tokens']} tokens")


if __name__ == "__main__":
    main()
