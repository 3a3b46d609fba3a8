"""The pipeline's stages as the last `make run` (or `dvc repro`) ran them, from the MLflow store: each stage's
wall time, its process's peak RSS and the seconds it spent in MLflow calls, against the targets. Reads the
latest run of each stage in the default task's experiment; run it right after a `make run` on a fresh clone.

    python bench/bench_stages.py [--tracking-uri URI]

Writes bench/results/stages.json. prepare's time comes from bench_data (run it first): prepare's MLflow run
opens after its work. register's work is MLflow's (it logs and registers the model): its share is no overhead.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "stages.json"
STAGES = ("prepare", "search", "train", "evaluate", "register")
TARGET_TOTAL_S, TARGET_RSS_MB, TARGET_MLFLOW_SHARE = 600.0, 3072.0, 0.02  # issues 24 and 26


def heaviest_session(client, run, m: dict) -> tuple[float, float | None, dict]:
    """-> (wall seconds, peak RSS MB, its metrics) of the session of `run` that used the most memory. A search
    keeps one run across re-runs (`dvc repro` after a comment reopens it and trains nothing): each process logs
    peak_rss_mb and mlflow_overhead_seconds as it ends, so those timestamps delimit the sessions, and the end
    time minus the start time of a reopened run would count the days between them."""
    rss = client.get_metric_history(run.info.run_id, "peak_rss_mb")
    if len(rss) <= 1:
        return (run.info.end_time - run.info.start_time) / 1000, m.get("peak_rss_mb"), m
    rss = sorted(rss, key=lambda x: x.timestamp)
    i = max(range(len(rss)), key=lambda j: rss[j].value)
    begin = rss[i - 1].timestamp if i else run.info.start_time
    over = {x.timestamp: x.value for x in client.get_metric_history(run.info.run_id, "mlflow_overhead_seconds")}
    m = {"mlflow_overhead_seconds": over[rss[i].timestamp]} if rss[i].timestamp in over else {}
    return (rss[i].timestamp - begin) / 1000, rss[i].value, m


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tracking-uri", default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    from mlflow.tracking import MlflowClient

    from mixtune.plumbing.files import write_json
    from mixtune.plumbing.tracking import tracking_uri

    client = MlflowClient(tracking_uri=args.tracking_uri or tracking_uri())
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              "attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"])
    rows = {}
    for stage in STAGES:
        run = next((r for r in runs if r.data.tags.get("mixtune.stage") == stage), None)
        if run is None:
            continue
        m = run.data.metrics
        if stage == "prepare":
            # prepare opens its run after its work, to log what it made: the run's wall time is its MLflow
            # calls. bench_data times the stage itself on the same inputs.
            data = RESULTS.parent / "data.json"
            wall = json.loads(data.read_text())["prepare"]["seconds"] if data.is_file() else None
            share, rss = None, m.get("peak_rss_mb")
        elif run.data.tags.get("mixtune.reused_trial_run_id"):
            # train took a search trial's adapter: it trained nothing, its run is its MLflow calls (logging the
            # adapter), which are the stage's work, not overhead on it.
            wall, share, rss = (run.info.end_time - run.info.start_time) / 1000, None, m.get("peak_rss_mb")
        else:
            wall, rss, m = heaviest_session(client, run, m)
            share = m["mlflow_overhead_seconds"] / wall if wall and "mlflow_overhead_seconds" in m else None
        rows[stage] = {"seconds": wall, "peak_rss_mb": rss,
                       "reused_trial": bool(run.data.tags.get("mixtune.reused_trial_run_id")),
                       "mlflow_seconds": m.get("mlflow_overhead_seconds"), "mlflow_share": share,
                       "run_id": run.info.run_id}
    total = sum(r["seconds"] or 0.0 for r in rows.values())
    result = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "stages": rows, "total_seconds": total,
              "targets": {"total_seconds": TARGET_TOTAL_S, "peak_rss_mb": TARGET_RSS_MB,
                          "mlflow_share": TARGET_MLFLOW_SHARE}}
    write_json(RESULTS, result)
    print(f"{'stage':10}{'seconds':>9}{'peak RSS MB':>13}{'MLflow s':>10}{'share':>8}")
    for stage, r in rows.items():
        share = "" if r["mlflow_share"] is None else f"{r['mlflow_share']:.1%}"
        rss = "" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f}"
        mls = "" if r["mlflow_seconds"] is None else f"{r['mlflow_seconds']:.1f}"
        secs = "" if r["seconds"] is None else f"{r['seconds']:.1f}"
        note = "  (reused a search trial: trained nothing)" if r.get("reused_trial") else ""
        print(f"{stage:10}{secs:>9}{rss:>13}{mls:>10}{share:>8}{note}")
    print(f"{'total':10}{total:>9.1f}   (target <= {TARGET_TOTAL_S:.0f} s; <= {TARGET_RSS_MB:.0f} MB and "
          f"< {TARGET_MLFLOW_SHARE:.0%} in MLflow per stage)")


if __name__ == "__main__":
    main()
