"""End to end on the real default assets: SmolLM2-135M-Instruct, BBC News and a real BIG-bench subset, through
the CLI stage by stage (a few training steps), tracked in a temporary MLflow store."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REAL_BBC, REAL_MODEL, REPO

pytestmark = pytest.mark.e2e


def test_default_pipeline_trains_evaluates_and_tracks(tmp_path, bigbench_subset):
    if not (REAL_MODEL / "model.safetensors").is_file() or not REAL_BBC.is_file():
        pytest.skip("the default assets are absent: run `make fetch` first")
    archive, _ = bigbench_subset
    (tmp_path / "data" / "specialist").mkdir(parents=True)
    (tmp_path / "data" / "generalist").mkdir(parents=True)
    shutil.copy(REAL_BBC, tmp_path / "data" / "specialist" / "bbc_news.jsonl")
    shutil.copy(archive, tmp_path / "data" / "generalist" / "bigbench-1.0.0.tar.gz")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"]["base"] = str(REAL_MODEL)
    params["mix"].update(specialist_size=24, generalist_share=0.2)
    params["train"].update(max_steps=3, batch_size=4, save_steps=100)
    params["evaluate"].update(max_examples=20, generalist_sample=5)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    store = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    env = dict(os.environ, MLFLOW_TRACKING_URI=store, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")

    for stage in ("prepare", "mix", "train", "evaluate"):
        proc = subprocess.run([sys.executable, "-m", "mixtune.cli", stage], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{stage}:\n{proc.stdout}\n{proc.stderr[-3000:]}"

    manifest = json.loads((tmp_path / "mix" / "manifest.json").read_text())
    assert (manifest["specialist_size"], manifest["generalist_size"], manifest["total"]) == (24, 6, 30)
    train = json.loads((tmp_path / "train" / "metrics.json").read_text())
    assert train["steps"] == 3 and train["trained_tokens"] > 0 and train["tokens_per_second"] > 0
    adapter_config = json.loads((tmp_path / "train" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(REAL_MODEL.resolve())
    result = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert result["n"] == 20 and result["generalist"]["n"] == 5
    assert 0 <= result["base"]["accuracy_low"] <= result["base"]["accuracy"] <= result["base"]["accuracy_high"] <= 1
    labels = {"business", "entertainment", "politics", "sport", "tech"}
    rows = [json.loads(line) for line in open(tmp_path / "eval" / "predictions.jsonl")]
    assert len(rows) == 20 and {r["tuned"] for r in rows} <= labels and {r["gold"] for r in rows} <= labels

    import mlflow

    client = mlflow.MlflowClient(store)
    exp = client.get_experiment_by_name("mixtune/bbc_news")
    runs = {r.data.tags["mixtune.stage"]: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"train", "evaluate"}
    assert all(r.info.status == "FINISHED" for r in runs.values())
    assert runs["evaluate"].data.tags["mixtune.train_run_id"] == runs["train"].info.run_id
    assert runs["train"].data.params["mix.generalist_share"] == "0.2"
    assert runs["evaluate"].data.metrics["tuned.accuracy"] == pytest.approx(result["tuned"]["accuracy"])
    assert len(client.get_metric_history(runs["train"].info.run_id, "loss")) >= 1
