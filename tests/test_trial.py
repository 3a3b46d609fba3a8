"""The trial core: the train stage takes a search trial's adapter when the trial trained exactly its mix, config
and code, and what it takes is byte for byte what it would have trained. Tiny model, a few steps."""

from __future__ import annotations

import json

import pytest
import search_project as sp

from mixtune.core import trial, tune
from mixtune.plumbing.config import MixConfig
from mixtune.stages import mix, search, train

TRAIN = {"save_steps": 2, "logging_steps": 3}


@pytest.fixture
def project(tmp_path, tiny_model, monkeypatch):
    # The stage checkpoints every 2 steps and logs every 3; a trial checkpoints never: neither may move a weight
    # or a row of the loss curve.
    sp.make_project(tmp_path, tiny_model, search={"n_trials": 2, "grid": 2}, train=TRAIN)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    return tmp_path


def _files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_train_stage_reuses_the_trials_adapter_byte_for_byte(project):
    from mlflow import MlflowClient

    best = search.run(*sp.search_sections(project))
    study = sp.study(project)
    top = study.trials[1]
    assert top.params["generalist_share"] == 0.75
    # the mix stage at the trial's share (what `auto` does when the search recommends it)
    manifest = mix.run(MixConfig(specialist_size=16, generalist_share=0.75, seed=0, corrupt_generalist=0.0),
                       project / "prepared", project / "mix")
    assert manifest["sha256"] == top.user_attrs["mix_sha256"]
    train_cfg, model_cfg = sp.load(project, "train"), sp.load(project, "model")

    reused = train.run(train_cfg, model_cfg, project / "mix", project / "reused")
    assert reused["reused"]["trial"] == 1 and reused["reused"]["search"] == best["search"]
    retrained = train.run(train_cfg, model_cfg, project / "mix", project / "retrained", reuse=False)
    assert "reused" not in retrained and retrained["steps"] == 4
    out_reused, out_retrained = _files(project / "reused"), _files(project / "retrained")
    assert sorted(out_reused) == sorted(out_retrained) == [
        "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/chat_template.jinja",
        "adapter/tokenizer.json", "adapter/tokenizer_config.json", "loss.csv", "metrics.json"]
    assert out_reused == out_retrained  # adapter, loss curve and metrics: byte for byte
    assert json.loads(out_reused["metrics.json"])["steps"] == 4
    assert [line.split(",")[0] for line in out_reused["loss.csv"].decode().splitlines()] == ["step", "2", "3", "4"]

    # MLflow says so: the train run names the trial's run it took the adapter from
    client = MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              "tags.`mixtune.stage` = 'train'", order_by=["attributes.start_time ASC"])
    assert len(runs) == 2
    assert runs[0].data.tags["mixtune.reused_trial_run_id"] == top.user_attrs["mlflow_run_id"]
    assert runs[0].data.tags["mlflow.note.content"].startswith("reused search trial 1 (share 0.75, search ")
    assert "mixtune.reused_trial_run_id" not in runs[1].data.tags
    assert runs[0].data.metrics["train_loss"] == runs[1].data.metrics["train_loss"]


def test_a_changed_training_config_or_mix_finds_no_trial(project):
    search.run(*sp.search_sections(project))
    manifest = mix.run(MixConfig(specialist_size=16, generalist_share=0.75, seed=0, corrupt_generalist=0.0),
                       project / "prepared", project / "mix")
    train_cfg, model_cfg = sp.load(project, "train"), sp.load(project, "model")
    assert trial.cached(trial.key(train_cfg, model_cfg, manifest["sha256"], "fp32")) is not None
    other = train_cfg.model_copy(update={"learning_rate": train_cfg.learning_rate * 2})
    assert trial.cached(trial.key(other, model_cfg, manifest["sha256"], "fp32")) is None
    assert trial.cached(trial.key(train_cfg, model_cfg, "0" * 64, "fp32")) is None
    out = train.run(other, model_cfg, project / "mix", project / "train")
    assert "reused" not in out


def test_a_new_search_over_the_same_mixes_trains_nothing_again(project, tiny_model, monkeypatch):
    """Another search (here: another seed, so another name) whose grid trains the same mixes with the same config
    and code takes the cached adapters: the same answers, no training."""
    first = search.run(*sp.search_sections(project))
    before = {t.params["generalist_share"]: t.user_attrs["dev_predictions"] for t in sp.study(project).trials}
    sp.write_params(project, tiny_model, search={"n_trials": 2, "grid": 2, "seed": 1}, train=TRAIN)

    def no_training(*args, **kw):
        raise AssertionError("trained again")

    monkeypatch.setattr(tune, "tuner", no_training)
    second = search.run(*sp.search_sections(project))
    assert second["search"] != first["search"]
    trials = [t for t in sp.study_named(project, second["search"]).trials]
    assert {t.params["generalist_share"]: t.user_attrs["dev_predictions"] for t in trials} == before
    assert [t.user_attrs["trained_tokens"] for t in trials] == [c["trained_tokens"] for c in first["curve"]]
    assert [t.user_attrs["steps"] for t in trials] == [c["steps"] for c in first["curve"]] == [4, 4]

    def points(r):  # the bands resample with the search's seed, which differs here
        return [{k: c[k] for k in ("share", "dev", "forgetting", "trained_tokens", "steps")} for c in r["curve"]]

    assert points(second) == points(first) and second["recommended_share"] == first["recommended_share"]
