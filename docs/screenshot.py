"""Screenshot of the MLflow UI comparing the two latest `evaluate` runs (for the README), with headless Chromium.

    .venv/bin/python docs/screenshot.py [--out docs/mlflow-compare.png]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(REPO / "docs" / "mlflow-compare.png"))
    ap.add_argument("--experiment", default="mixtune/bbc_news")
    ap.add_argument("--mlruns", default=str(REPO / "mlruns"), help="the MLflow store's folder")
    args = ap.parse_args()

    import mlflow

    uri = f"sqlite:///{Path(args.mlruns).resolve() / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(args.experiment)
    runs = client.search_runs([exp.experiment_id], "tags.`mixtune.stage` = 'evaluate' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=2)
    if len(runs) < 2:
        sys.exit("need two finished evaluate runs (dvc exp run -S mix.generalist_share=0.5)")
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri", uri,
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        ids = json.dumps([r.info.run_id for r in runs])
        url = (f"http://127.0.0.1:{port}/#/compare-runs?runs={urllib.parse.quote(ids)}"
               f"&experiments={urllib.parse.quote(json.dumps([exp.experiment_id]))}")
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                            "--no-first-run", "--disable-background-networking", "--disable-component-update",
                            "--disable-sync", f"--user-data-dir={profile}", "--hide-scrollbars",
                            "--window-size=1500,1400", "--virtual-time-budget=20000", f"--screenshot={args.out}", url],
                           check=True, timeout=120, capture_output=True)
        print(f"wrote {args.out} ({url})")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
