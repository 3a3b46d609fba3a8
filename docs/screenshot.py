"""The README's MLflow screenshots, taken from a real store with headless Chromium (Debian's `chromium`, driven
by Playwright: the runs table needs its columns picked, and MLflow's assistant panel closed):

    docs/mlflow-runs.png     the task's runs table (after `make run` and one `dvc exp run -S ...`: two mixes)
    docs/mlflow-search.png   the latest search run's charts (dev score against share, score against forgetting)
    docs/mlflow-model.png    the registered model with its aliases (`champion`)

    make screenshots          # or: .venv/bin/python docs/screenshot.py [--mlruns DIR] [--out-dir docs]

Each page is the one `make ui` links to (mixtune.ui), so a screenshot shows what a user lands on. Re-take them
whenever the UI they show changes (an MLflow upgrade, a new run name or chart).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pages(client, base: str, task: str) -> dict[str, str]:
    """file name -> the URL of the page it shows."""
    exp = client.get_experiment_by_name(f"mixtune/{task}")
    if exp is None:
        sys.exit(f"no experiment mixtune/{task} in the store: run `make run` first")
    evaluate = client.search_runs([exp.experiment_id], "tags.`mixtune.stage` = 'evaluate'")
    if len({r.data.params.get("mix.generalist_share") for r in evaluate}) < 2:
        sys.exit("the runs table should show two mixes: run `dvc exp run -S mix.generalist_share=0.3` first")
    [search] = client.search_runs([exp.experiment_id], "tags.`mixtune.stage` = 'search'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
    model = f"mixtune-{task}"
    return {"mlflow-runs.png": f"{base}/#/experiments/{exp.experiment_id}/runs",
            "mlflow-search.png": f"{base}/#/experiments/{exp.experiment_id}/runs/{search.info.run_id}"
                                 "/artifacts/dev_vs_share.png",
            "mlflow-model.png": f"{base}/#/models/{model}"}


def shoot(page, name: str, url: str, out: Path) -> None:
    """Open `url`, set the page up as a user would (the AI-assistant panel closed; in the runs table the columns
    that tell the mixes apart), and save it."""
    if name == "mlflow-model.png":  # tall enough for two versions with their tags (the page scrolls inside)
        page.set_viewport_size({"width": page.viewport_size["width"], "height": 1900})
    page.goto(url)
    text = {"mlflow-runs.png": "Run Name", "mlflow-search.png": "dev_vs_share.png", "mlflow-model.png": "champion"}
    page.get_by_text(text[name]).first.wait_for(timeout=90_000)
    time.sleep(2)  # the last requests (images, metric values) land
    close = page.get_by_role("button", name="Close", exact=True)
    if close.count():
        close.first.click()
    if name == "mlflow-runs.png":
        page.get_by_role("button", name="Columns", exact=True).click()
        for column in ("Dataset", "Source", "Description"):  # off, off, on
            page.get_by_text(column, exact=True).last.click()
        search = page.get_by_placeholder("Search columns")
        for column in ("test.tuned.macro_f1", "mix.generalist_share"):
            search.fill(column)
            time.sleep(0.5)
            page.get_by_text(column, exact=True).first.click()  # the first match: not its _low, _high, .<task>
        page.keyboard.press("Escape")
        for header, wider in (("Run Name", 150), ("Description", 200)):  # drag the header's right edge
            box = page.get_by_role("columnheader").filter(has_text=header).first.bounding_box()
            x, y = box["x"] + box["width"] - 2, box["y"] + box["height"] / 2
            page.mouse.move(x, y)
            page.mouse.down()
            page.mouse.move(x + wider, y, steps=10)
            page.mouse.up()
        time.sleep(1)
    if name == "mlflow-model.png":
        page.get_by_text("Description", exact=True).first.click()  # unfold the model's description
        time.sleep(0.5)
    page.screenshot(path=str(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mlruns", default=str(REPO / "mlruns"), help="the MLflow store's folder")
    ap.add_argument("--out-dir", default=str(REPO / "docs"))
    ap.add_argument("--task", default="bbc_news")
    ap.add_argument("--size", default="1800,1000", help="the browser window, width,height")
    args = ap.parse_args()
    if not shutil.which("chromium"):
        sys.exit("needs Debian's chromium: sudo apt-get install chromium")

    import mlflow

    uri = f"sqlite:///{Path(args.mlruns).resolve() / 'mlflow.db'}"
    port = free_port()
    urls = pages(mlflow.MlflowClient(uri), f"http://127.0.0.1:{port}", args.task)
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
        from playwright.sync_api import sync_playwright

        width, height = map(int, args.size.split(","))
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": width, "height": height})
            for name, url in urls.items():
                out = Path(args.out_dir) / name
                shoot(page, name, url, out)
                print(f"wrote {out} ({url})")
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
