"""End to end on the real default assets: SmolLM2-135M-Instruct, BBC News and a real BIG-bench subset, through
`dvc repro` of the project's own dvc.yaml (prepare -> search -> mix -> train -> evaluate -> register), small
(a few training steps, a few dev and test examples), tracked in the temporary project's own MLflow store."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import yaml
from conftest import REAL_BBC, REAL_MODEL, REPO
from test_pipeline_e2e import BIN, sh

pytestmark = pytest.mark.e2e
N_TEST = 40  # test examples evaluate scores


def test_default_pipeline_answers_trains_evaluates_and_registers(tmp_path, evals_subset):
    if not (REAL_MODEL / "model.safetensors").is_file() or not REAL_BBC.is_file():
        pytest.skip("the default assets are absent: run `make fetch` first")
    archive, _ = evals_subset
    repo = tmp_path / "repo"
    (repo / "data" / "specialist").mkdir(parents=True)
    (repo / "data" / "generalist").mkdir(parents=True)
    shutil.copy(REAL_BBC, repo / "data" / "specialist" / "bbc_news.jsonl")
    shutil.copy(archive, repo / "data" / "generalist" / archive.name)
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    shutil.copytree(REPO / "src" / "mixtune", repo / "src" / "mixtune", ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"]["base"] = str(REAL_MODEL)
    params["prepare"].update(dev_fraction=0.02, generalist_probe=5)
    params["mix"].update(specialist_size=24)  # generalist_share: auto, as the default
    # Enough training for the adapter to beat the base model: measured on the repository's prepared BBC data (24
    # examples, 20 test examples at offsets 0, 20 and 40 of the test split), 8 steps at 1e-3 gave macro-F1 gains
    # of 0.31-0.45 over the base model with intervals' low ends of 0.03-0.21 at shares 0 and 0.5; 3 steps at the
    # default 2e-4 left it where the base model is (gains -0.01 to 0.01).
    # On a machine without bf16 (fp32 training), 8 steps left the gain's interval reaching below 0 on 20 test
    # examples (-0.057): 12 steps and 40 test examples.
    params["train"].update(max_steps=12, learning_rate=1e-3, batch_size=4, save_steps=100)
    params["evaluate"].update(max_examples=N_TEST)
    params["search"].update(n_trials=2, grid=2, max_share=0.5)  # shares 0 and 0.5
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(repo, "git", "init", "-q")
    sh(repo, str(BIN / "dvc"), "init", "-q")
    sh(repo, str(BIN / "dvc"), "add", "-q", "data")

    first = sh(repo, str(BIN / "dvc"), "repro")
    for stage in ("prepare", "search", "mix", "train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in first, stage

    # One answer, and the final adapter trained at exactly that share.
    best = json.loads((repo / "search" / "best.json").read_text())
    assert best["metric"] == "macro_f1" and best["trials"] == {"complete": 2, "fail": 0}
    assert [c["share"] for c in best["curve"]] == [0.0, 0.5] and best["recommended_share"] in (0.0, 0.5)
    assert best["answer"].startswith("For bbc_news at 24 examples, ") and "mixtune search: " not in best["answer"]
    manifest = json.loads((repo / "mix" / "manifest.json").read_text())
    assert manifest["generalist_share"] == best["recommended_share"] and manifest["share_source"] == "auto"
    train = json.loads((repo / "train" / "metrics.json").read_text())
    assert train["steps"] == 12 and train["trained_tokens"] > 0
    # The recommended share is a trial's: the train stage takes that trial's adapter instead of training it again.
    assert f"train: reused search trial {best['recommended_trial']} (share {best['recommended_share']:.2f}" in first
    adapter_config = json.loads((repo / "train" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(REAL_MODEL.resolve())

    # Evaluate: the final adapter, the base model and the search's pure specialist, by macro-F1; forgetting.
    result = json.loads((repo / "eval" / "metrics.json").read_text())
    assert result["n"] == N_TEST and result["share"] == best["recommended_share"]
    m = result["macro_f1"]
    for system in ("tuned", "base", "specialist"):
        assert 0 <= m[system]["low"] <= m[system]["value"] <= m[system]["high"] <= 1
    # The tuned adapter beats the base model: the paired interval of its gain lies above 0.
    assert m["gain"]["value"] == pytest.approx(m["tuned"]["value"] - m["base"]["value"])
    assert m["gain"]["low"] > 0
    assert result["forgetting"]["probe_n"] == 5
    # Forgetting is scored one way: the search's at the recommended share and for the pure specialist (the same
    # adapters) is evaluate's, on the same probe.
    f = result["forgetting"]
    assert (best["forgetting"], best["specialist_forgetting"]) == pytest.approx(
        (f["tuned"]["value"], f["specialist"]["value"]))
    labels = {"business", "entertainment", "politics", "sport", "tech"}
    rows = [json.loads(line) for line in open(repo / "eval" / "predictions.jsonl")]
    assert len(rows) == N_TEST and all({r["tuned"], r["base"], r["specialist"], r["gold"]} <= labels for r in rows)

    # Register: the version evaluate measured, champion as the first.
    registered = json.loads((repo / "register" / "result.json").read_text())
    assert registered["version"] == 1 and registered["promoted"]
    assert registered["test_score"] == pytest.approx(m["tuned"]["value"])
    assert "up to date" in sh(repo, str(BIN / "dvc"), "status")

    # The champion takes raw articles, as the user's file holds them, and answers what evaluate scored.
    test = [json.loads(line) for line in open(repo / "prepared" / "specialist" / "test.jsonl")][:N_TEST]
    raw = [json.loads(line) for line in open(REAL_BBC)]
    with open(repo / "articles.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "text"])
        w.writeheader()
        w.writerows({"id": ex["id"], "text": raw[int(ex["id"].split("/")[1])]["text"]} for ex in test)
    out = sh(repo, str(BIN / "mixtune"), "predict", "--model", "models:/mixtune-bbc_news@champion",
             "--input", "articles.csv", "--output", "served.jsonl")
    assert f"predict: {N_TEST} predictions in served.jsonl" in out
    served = [json.loads(line) for line in open(repo / "served.jsonl")]
    assert [s["id"] for s in served] == [r["id"] for r in rows]
    assert [s["prediction"] for s in served] == [r["tuned"] for r in rows]
    assert all(set(s["probabilities"]) == labels for s in served)

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mixtune/bbc_news")
    runs = client.search_runs([exp.experiment_id])
    stages = {r.data.tags["mixtune.stage"] for r in runs}
    assert stages == {"prepare", "search", "search-trial", "train", "evaluate", "register"}
    [prepare_run] = [r for r in runs if r.data.tags["mixtune.stage"] == "prepare"]
    assert "card.md" in {a.path for a in client.list_artifacts(prepare_run.info.run_id)}
    assert all(r.info.status == "FINISHED" for r in runs)
    [search_run] = [r for r in runs if r.data.tags["mixtune.stage"] == "search"]
    assert search_run.data.tags["mlflow.note.content"] == best["answer"]
    [train_run] = [r for r in runs if r.data.tags["mixtune.stage"] == "train"]
    [recommended_trial] = [r for r in runs if r.data.tags["mixtune.stage"] == "search-trial"
                           and r.data.tags["mixtune.trial"] == str(best["recommended_trial"])]
    assert train_run.data.tags["mixtune.reused_trial_run_id"] == recommended_trial.info.run_id
    assert "dev_vs_share.png" in {a.path for a in client.list_artifacts(search_run.info.run_id)}

    # A share set by hand is an experiment of its own: mix..register rerun, the search is left as it is.
    params["mix"]["generalist_share"] = 0.3
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    second = sh(repo, str(BIN / "dvc"), "repro")
    assert "Stage 'search' didn't change, skipping" in second
    for stage in ("mix", "train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in second, stage
    assert "train: reused" not in second  # no trial trained 0.3
    # the base model's and the pure specialist's answers, which no share changes, come from the cache
    assert "evaluate: base: answers from the cache" in second and "evaluate: specialist: answers from the cache" in second
    manifest = json.loads((repo / "mix" / "manifest.json").read_text())
    assert (manifest["generalist_share"], manifest["share_source"]) == (0.3, "manual")
    assert json.loads((repo / "search" / "best.json").read_text()) == best
    registered = json.loads((repo / "register" / "result.json").read_text())
    assert registered["version"] == 2
    versions = client.search_model_versions("name = 'mixtune-bbc_news'")
    assert {v.tags["mixtune.share_source"] for v in versions} == {"auto", "manual"}
