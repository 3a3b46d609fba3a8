"""tracking: the store is the main repository's, also from a `dvc exp run --temp/--queue` copy; one run per stage
execution, ended FINISHED, FAILED or KILLED; params flattened."""

from __future__ import annotations

from pathlib import Path

import pytest

from mixtune.plumbing import tracking


@pytest.mark.parametrize("cwd, root", [
    ("/x/repo/.dvc/tmp/exps/tmpabc", "/x/repo"),
    ("/x/repo/.dvc/tmp/exps/tmpabc/sub/dir", "/x/repo"),
    ("/x/repo/.dvc/tmp/exps/run/a1b2c3", "/x/repo"),  # queued experiments' workspaces
    ("/x/repo", "/x/repo"),
    ("/x/repo/.dvc/tmp", "/x/repo/.dvc/tmp"),  # not an experiment copy: as is
])
def test_repo_root(cwd, root):
    assert tracking.repo_root(Path(cwd)) == Path(root)


def test_the_tests_never_log_into_the_projects_store(tmp_path, cli, monkeypatch, tiny_model, private_mlflow_store):
    """A stage run as a test runs it by default (from the repository, no store of its own, as the `prepared`
    fixture of test_bad_input runs `prepare`) lands in the session's private store (conftest), not in
    `<repo>/mlruns`: `make test` once left 5 runs `prepare 48 train examples` there, which `make ui` then showed."""
    import sqlite3
    import uuid

    from conftest import REPO, prepare_small_task
    from mlflow import MlflowClient

    project_store = REPO / "mlruns" / "mlflow.db"
    monkeypatch.chdir(REPO)
    assert tracking.repo_root() == REPO
    assert tracking.tracking_uri() == private_mlflow_store
    assert str(REPO) not in tracking.tracking_uri()

    tag = uuid.uuid4().hex  # names this run alone: the run name carries DVC_EXP_NAME
    monkeypatch.setenv("DVC_EXP_NAME", tag)
    prepare_small_task(tmp_path, cli, tiny_model)

    client = MlflowClient(private_mlflow_store)
    [run] = client.search_runs([client.get_experiment_by_name("mixtune/spec").experiment_id],
                               f"attributes.run_name = 'prepare 32 train examples [{tag}]'")
    assert run.info.status == "FINISHED"
    if project_store.is_file():  # read-only: opening it with MLflow could write (a new store, a migration)
        with sqlite3.connect(f"{project_store.as_uri()}?mode=ro", uri=True) as db:
            assert db.execute("select count(*) from runs where name like ?", (f"%{tag}%",)).fetchone() == (0,)


@pytest.fixture
def exp_copy(tmp_path, monkeypatch):
    """A repository and a DVC experiment's temporary copy of it; run from the copy, no MLFLOW_TRACKING_URI."""
    repo = tmp_path.resolve() / "repo"
    copy = repo / ".dvc" / "tmp" / "exps" / "tmpabc"
    copy.mkdir(parents=True)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(copy)
    return repo, copy


def test_tracking_uri_from_an_experiment_copy_is_the_main_store(exp_copy, monkeypatch):
    repo, copy = exp_copy
    assert tracking.repo_root() == repo
    assert tracking.tracking_uri() == f"sqlite:///{repo}/mlruns/mlflow.db"
    monkeypatch.chdir(repo)
    assert tracking.tracking_uri() == f"sqlite:///{repo}/mlruns/mlflow.db"  # always absolute
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")  # a team's server wins
    assert tracking.tracking_uri() == "http://127.0.0.1:5000"


def test_runs_from_an_experiment_copy_land_in_the_main_store(exp_copy):
    from mlflow import MlflowClient

    repo, copy = exp_copy
    params = {"train": {"lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]}, "max_steps": None},
              "mix": {"generalist_share": 0.25}}
    with tracking.stage_run("train", ["topic"], params, {"mixtune.mix_sha256": "abc"}) as run:
        import mlflow

        mlflow.log_metric("loss", 1.5, step=1)
        mlflow.log_text("hello", "note.txt")
    with pytest.raises(RuntimeError), tracking.stage_run("evaluate", ["topic"], {}):
        raise RuntimeError("boom")
    with pytest.raises(KeyboardInterrupt), tracking.stage_run("train", ["topic"], {}):
        raise KeyboardInterrupt

    assert (repo / "mlruns" / "mlflow.db").is_file()
    assert not (copy / "mlruns").exists()  # nothing in the copy, which DVC deletes
    client = MlflowClient(tracking_uri=f"sqlite:///{repo}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("mixtune/topic")
    assert exp.artifact_location == (repo / "mlruns" / "artifacts").as_uri()
    finished, failed, killed = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    assert finished.info.run_id == run.info.run_id
    assert [r.info.status for r in (finished, failed, killed)] == ["FINISHED", "FAILED", "KILLED"]
    assert [r.data.tags["mixtune.stage"] for r in (finished, failed, killed)] == ["train", "evaluate", "train"]
    assert finished.data.params == {"train.lora.r": "8", "train.lora.target_modules": "['q_proj', 'v_proj']",
                                    "train.max_steps": "", "mix.generalist_share": "0.25"}
    assert finished.data.tags["mixtune.mix_sha256"] == "abc"
    assert "mlflow_overhead_seconds" in finished.data.metrics
    import resource  # this process's peak RSS, in MB: at least what it holds now (pytest, torch imported)

    assert 100 < finished.data.metrics["peak_rss_mb"] <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    artifact = Path(client.download_artifacts(run.info.run_id, "note.txt", str(copy / "dl")))
    assert artifact.read_text() == "hello"
    assert finished.info.artifact_uri.startswith((repo / "mlruns" / "artifacts").as_uri())


def test_more_than_100_params_are_logged(tmp_path, monkeypatch):
    """MLflow takes at most 100 params per call; stage_run batches them."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    params = {"evaluate": {f"k{i}": i for i in range(150)}}
    with tracking.stage_run("evaluate", ["a", "b"], params) as run:
        pass
    got = MlflowClient(tracking_uri=uri).get_run(run.info.run_id).data.params
    assert got == {f"evaluate.k{i}": str(i) for i in range(150)}
    assert MlflowClient(tracking_uri=uri).get_experiment(run.info.experiment_id).name == "mixtune/a+b"


def test_a_stage_run_logs_system_metrics(tmp_path, monkeypatch):
    import time

    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    monkeypatch.chdir(tmp_path)
    with tracking.stage_run("train", ["a"], {}) as run:
        end = time.perf_counter() + 2
        while time.perf_counter() < end:  # busy, not asleep: a core in use while MLflow's thread samples
            pass
    metrics = MlflowClient(tracking_uri=uri).get_run(run.info.run_id).data.metrics
    # the latest sample, taken in the loop (only a process's first psutil.cpu_percent reads 0: nothing to compare)
    assert 0 < metrics["system/cpu_utilization_percentage"] <= 100
    import psutil

    total_mb = psutil.virtual_memory().total / 1e6
    assert 0 < metrics["system/system_memory_usage_megabytes"] < total_mb
    assert metrics["system/system_memory_usage_percentage"] == pytest.approx(
        100 * metrics["system/system_memory_usage_megabytes"] / total_mb, abs=0.1)


def test_flatten_and_experiment_name():
    assert tracking.flatten({"a": {"b": {"c": 1}, "d": [1, 2]}, "e": None}) == {"a.b.c": 1, "a.d": [1, 2], "e": None}
    assert tracking.experiment_name(["bbc_news"]) == "mixtune/bbc_news"
    assert tracking.experiment_name(["a", "b"]) == "mixtune/a+b"


def test_unreachable_store_is_one_line_error(tmp_path, monkeypatch):
    from mixtune.plumbing.errors import MixtuneError

    (tmp_path / "file").write_text("")  # the store's folder would have to be inside a file
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/file/mlflow.db")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MixtuneError, match=r"^MLflow store sqlite:///\S+: ") as e:
        with tracking.stage_run("train", ["topic"], {}):
            pass
    assert "\n" not in str(e.value)


def test_a_run_is_named_by_its_share_size_and_dvc_experiment(monkeypatch):
    from mixtune.plumbing.tracking import mix_label

    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    manifest = {"generalist_share": 0.2718, "share_source": "auto", "specialist_size": 64}
    assert mix_label(manifest) == "r=0.27 auto, n=64"
    monkeypatch.setenv("DVC_EXP_NAME", "brisk-ions")  # set by DVC for a stage run by `dvc exp run`
    assert mix_label({**manifest, "share_source": "manual"}) == "r=0.27 set, n=64 [brisk-ions]"
