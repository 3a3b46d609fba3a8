"""search: the grid first, every trial to the end, nested MLflow runs, outputs, a search that continues (the
Gaussian process's shares), failing and killed trials, two workers on one PostgreSQL search, a search logging to
a real `mlflow server`, and the answer read from the curve. Tiny model, a few steps."""

from __future__ import annotations

import csv
import glob
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
import search_project as sp
from conftest import REPO

from mixtune.core import metrics as M
from mixtune.stages import search

GRID = [0.0, 0.375, 0.75]  # search_project: grid 3 over [0, 0.75]


@pytest.fixture
def project(tmp_path, tiny_model, monkeypatch):
    sp.make_project(tmp_path, tiny_model)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    return tmp_path


def runs_of(study_run_id: str, uri: str | None = None):
    """The study's run and its nested trial runs, by trial number."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    parent = client.get_run(study_run_id)
    nested = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{study_run_id}'")
    return parent, {int(r.data.tags["mixtune.trial"]): r for r in nested}


def states(study) -> dict[int, str]:
    return {t.number: t.state.name for t in study.trials}


def test_the_study_is_no_dvc_output():
    """DVC deletes a stage's outputs before it runs it: the journal must not be one, or no re-run continues."""
    import yaml

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    outs = [o if isinstance(o, str) else next(iter(o)) for s in stages.values()
            for kind in ("outs", "metrics", "plots") for o in s.get(kind, [])]
    journal = "search/optuna.journal"
    assert not [o for o in outs if journal == o or journal.startswith(o.rstrip("/") + "/")]
    assert {"search/specialist_adapter", "search/best.json", "search/metrics.json", "search/trials.csv",
            "register/result.json"} <= set(outs)


def test_a_fresh_clone_runs_every_stage():
    """Each stage writes into the MLflow store (git-ignored, per machine): a fresh clone's `make run` must run them
    all, which DVC does only for a stage with an output that is not in git (its DVC cache starts empty). With a
    committed register/result.json matching dvc.lock, a fresh clone skipped register: no registered model."""
    import yaml

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        outs = [o for kind in ("outs", "metrics", "plots") for o in stage.get(kind, [])]
        cached = [o for o in outs if isinstance(o, str) or next(iter(o.values())).get("cache", True)]
        assert cached, f"stage {name}: every output is in git, so a fresh clone skips it"


def test_search_runs_the_grid_to_the_end_then_a_rerun_continues_with_the_gaussian_process(project, tiny_model,
                                                                                             monkeypatch):
    import time

    import mlflow

    log_artifacts = mlflow.log_artifacts

    def slow_log_artifacts(*args, **kw):  # each trial logs its adapter: 1 s more of MLflow per trial
        time.sleep(1.0)
        return log_artifacts(*args, **kw)

    monkeypatch.setattr(mlflow, "log_artifacts", slow_log_artifacts)
    best = search.run(*sp.search_sections(project))
    study = sp.study(project)
    trials = study.trials
    assert [t.params["generalist_share"] for t in trials] == GRID  # the grid, in this order, every trial answered
    assert states(study) == {0: "COMPLETE", 1: "COMPLETE", 2: "COMPLETE"}
    assert len(study.user_attrs["base_probe"]) == 8  # the base model's answers to the probe, once per study
    for t in trials:
        assert set(t.user_attrs) >= {"dev_metric", "dev_low", "dev_high", "dev_predictions", "probe", "trained_tokens",
                                     "mlflow_run_id", "worker", "adapter_uri", "adapter"}
        assert t.user_attrs["dev_low"] <= t.value == t.user_attrs["dev_metric"] <= t.user_attrs["dev_high"]
        assert len(t.user_attrs["dev_predictions"]) == 12  # every dev example, scored
        assert len(t.user_attrs["probe"]) == 8  # the same 8 held-out generalist questions for every trial
        assert t.user_attrs["steps"] == 4  # train.max_steps: every share trains the same steps here
        assert (Path(t.user_attrs["adapter"]) / "adapter_config.json").is_file()
        assert Path(t.user_attrs["adapter"]).parent.parent == project / ".cache" / "adapters"  # the trial cache
        dev = [json.loads(line) for line in open(project / "prepared" / "specialist" / "dev.jsonl")]
        want = M.macro_f1(t.user_attrs["dev_predictions"], [ex["completion"] for ex in dev], sp.LABELS)
        assert t.value == pytest.approx(want)  # auto: classification is judged by macro-F1

    # Outputs: one answer, for the size the final adapter is trained at.
    assert best["size"] == 16 and best["metric"] == "macro_f1" and best["tasks"] == [sp.TASK]
    assert best["specialist_trial"] == 0 and best["recommend"] == "fewest_tokens"
    # The curve: every share with its dev score and band; the recommended share is the smallest within noise
    # of the best (fewest_tokens), and the best share is inside the near-optimal range.
    assert [c["share"] for c in best["curve"]] == GRID
    assert [c["dev"] for c in best["curve"]] == [t.value for t in trials]
    values = [t.value for t in trials]
    assert best["best_trial_share"] == GRID[values.index(max(values))]
    assert best["best_trial_share"] in best["near_optimal"]
    assert best["recommended_share"] == min(best["near_optimal"])
    assert (best["near_optimal_low"], best["near_optimal_high"]) == (min(best["near_optimal"]),
                                                                     max(best["near_optimal"]))
    assert best["best_share_low"] <= best["best_trial_share"] <= best["best_share_high"]
    assert [c["steps"] for c in best["curve"]] == [4, 4, 4] and best["longer_than_specialist"] is False
    share = best["recommended_share"]
    assert best["answer"].startswith(f"For {sp.TASK} at 16 examples, ")
    if share > 0:
        assert f"use a generalist share of r={share:.2f}: the fewest generalist tokens among the shares" in best["answer"]
    elif best["best_trial_share"] == 0:
        assert "generalist data does not help here: use r=0, the pure specialist, which scores best" in best["answer"]
    else:
        assert "generalist data does not help measurably here: use r=0 (the pure specialist" in best["answer"]
    assert f"Best measured share r={best['best_trial_share']:.2f}" in best["answer"]
    assert ("at the top of the searched range" in best["answer"]) == (best["best_trial_share"] == 0.75)
    assert "Held-out generalist accuracy lost against the base model: " in best["answer"]
    assert best["answers"] == [best["answer"]]
    assert best["trials"] == {"complete": 3, "fail": 0}
    assert best["trained_tokens_total"] == sum(t.user_attrs["trained_tokens"] for t in trials) > 0
    assert (project / "search" / "specialist_adapter" / "adapter_config.json").is_file()
    # best.json: the answer, without the run URI that would change it on every run
    assert json.loads((project / "search" / "best.json").read_text()) == {
        k: v for k, v in best.items() if k not in ("specialist_adapter_uri", "recommended_adapter")}
    numbers = json.loads((project / "search" / "metrics.json").read_text())
    assert numbers["recommended_share"] == share and numbers["trials"] == best["trials"]
    rows = list(csv.DictReader(open(project / "search" / "trials.csv")))
    assert [r["trial"] for r in rows] == ["0", "1", "2"]
    assert list(rows[0]) == ["trial", "size", "share", "state", "dev_metric", "dev_low", "dev_high", "near_optimal",
                             "forgetting", "trained_tokens", "steps"]
    assert [float(r["share"]) for r in rows] == GRID and {r["state"] for r in rows} == {"COMPLETE"}
    assert [float(r["share"]) for r in rows if r["near_optimal"] == "1"] == best["near_optimal"]
    assert [float(r["dev_metric"]) for r in rows] == [t.value for t in trials]
    base_probe = M.from_bits(study.user_attrs["base_probe"]).mean()
    assert [float(r["forgetting"]) for r in rows] == pytest.approx(
        [base_probe - M.from_bits(t.user_attrs["probe"]).mean() for t in trials])

    # MLflow: one study run, a nested run per trial, the answer as its description
    parent_id = study.user_attrs["mlflow_run_id"]
    parent, nested = runs_of(parent_id)
    assert parent.data.tags["mlflow.note.content"] == best["answer"]
    assert parent.data.metrics["answer.recommended_share"] == share
    assert parent.data.metrics["answer.recommended_steps"] == parent.data.metrics["answer.specialist_steps"] == 4
    # the stage's MLflow seconds count the trials' calls (bench_stages reads them beside the run's wall time)
    assert parent.data.metrics["mlflow_overhead_seconds"] >= 3 * 1.0
    assert sorted(nested) == [0, 1, 2]
    for n, run in nested.items():
        assert run.info.run_id == trials[n].user_attrs["mlflow_run_id"] and run.info.status == "FINISHED"
        assert run.data.tags["mixtune.trial_state"] == "COMPLETE"
        assert float(run.data.params["generalist_share"]) == trials[n].params["generalist_share"]
        assert run.info.run_name == f"trial {n} r={trials[n].params['generalist_share']:.2f}"
        assert run.data.metrics["dev.macro_f1"] == trials[n].value
        assert run.data.metrics["steps"] == 4
        assert "probe_accuracy" in run.data.metrics
    from mlflow import MlflowClient

    artifacts = {a.path for a in MlflowClient().list_artifacts(parent_id)}
    assert {"best.json", "trials.csv", "dev_vs_share.png"} <= artifacts

    # n_trials 3 -> 4: the same search goes on; only trial 3 runs (the Gaussian process's share), the others
    # are untouched
    before = {t.number: (t.datetime_start, t.user_attrs["mlflow_run_id"]) for t in trials}
    sp.write_params(project, tiny_model, search={"n_trials": 4})
    search.run(*sp.search_sections(project))
    study = sp.study(project)
    assert states(study) == {0: "COMPLETE", 1: "COMPLETE", 2: "COMPLETE", 3: "COMPLETE"}
    assert {t.number: (t.datetime_start, t.user_attrs["mlflow_run_id"]) for t in study.trials[:3]} == before
    assert study.user_attrs["mlflow_run_id"] == parent_id
    _, nested = runs_of(parent_id)
    assert sorted(nested) == [0, 1, 2, 3]
    assert len({t.params["generalist_share"] for t in study.trials}) == 4  # no share drawn twice
    assert 0 <= study.trials[3].params["generalist_share"] <= 0.75
    assert len(list(csv.DictReader(open(project / "search" / "trials.csv")))) == 4

    # n_trials reached: a third run runs nothing
    search.run(*sp.search_sections(project))
    assert len(sp.study(project).trials) == 4


def test_no_trial_trains_beside_an_earlier_trials_model(project, monkeypatch):
    """With bf16 (or fp16), accelerate's autocast wrapper is a method bound to the model and set on it: a reference
    cycle, so a trial's model outlives its trial until a full collection, and on the default (514 MB) the next
    trial trained beside it. The search collects after each trial. Automatic collection is off here, as in a long
    trial where none comes in time; checked by breaking it: without the search's collection the second trial
    finds the first one's model alive."""
    import gc
    import weakref

    from mixtune.core import tune

    tuner, models = tune.tuner, []

    def tracked_tuner(*args, **kw):
        assert [m() is None for m in models] == [True] * len(models)  # no earlier trial's model is still here
        trainer = tuner(*args, **kw)
        models.append(weakref.ref(trainer.model))
        return trainer

    monkeypatch.setattr(tune, "tuner", tracked_tuner)
    sections = sp.search_sections(project)
    sections[2] = sections[2].model_copy(update={"precision": "bf16"})
    gc.disable()
    try:
        search.run(*sections)
    finally:
        gc.enable()
    assert len(models) == len(GRID) == len(sp.study(project).trials)
    assert states(sp.study(project)) == {i: "COMPLETE" for i in range(len(GRID))}


def test_a_failing_trial_is_fail_and_the_study_goes_on(project, monkeypatch):
    from mixtune.stages import mix

    real = mix.run

    def broken_at_half(cfg, *args, **kw):
        if cfg.generalist_share == 0.375:
            raise RuntimeError("disk full")
        return real(cfg, *args, **kw)

    monkeypatch.setattr(mix, "run", broken_at_half)
    best = search.run(*sp.search_sections(project))
    study = sp.study(project)
    assert states(study) == {0: "COMPLETE", 1: "FAIL", 2: "COMPLETE"}
    assert study.trials[1].user_attrs["error"] == "disk full"
    assert best["trials"] == {"complete": 2, "fail": 1}
    assert [c["share"] for c in best["curve"]] == [0.0, 0.75]  # the curve holds what was measured, nothing more
    _, nested = runs_of(study.user_attrs["mlflow_run_id"])
    assert nested[1].info.status == "FAILED" and nested[1].data.tags["mixtune.error"] == "disk full"
    rows = list(csv.DictReader(open(project / "search" / "trials.csv")))
    assert rows[1]["state"] == "FAIL" and rows[1]["dev_metric"] == ""

    # Fixed: the re-run runs the failed grid share again (a new trial) and stops at n_trials finished.
    monkeypatch.setattr(mix, "run", real)
    search.run(*sp.search_sections(project))
    study = sp.study(project)
    assert states(study) == {0: "COMPLETE", 1: "FAIL", 2: "COMPLETE", 3: "COMPLETE"}
    assert study.trials[3].params["generalist_share"] == 0.375


def test_killed_mid_trial_then_rerun_continues(project, tiny_model):
    """SIGKILL while trial 0 runs: the re-run marks it FAIL, runs its share again, loses no trial."""
    sp.write_params(project, tiny_model, search={"n_trials": 2, "grid": 2})
    proc = sp.mixtune(project, "search", env_extra={"MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"]})
    try:
        def trial_running():
            if proc.poll() is not None:
                raise AssertionError(f"search ended before it was killed:\n{proc.stdout.read()}")
            try:  # the journal may be mid-write, or hold no study yet
                trials = sp.study(project).trials
            except Exception:
                return False
            return any(t.state.name == "RUNNING" and "mlflow_run_id" in t.user_attrs for t in trials)

        sp.wait_until(trial_running, 180, "a running trial")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.stdout.close()
    study = sp.study(project)
    assert states(study) == {0: "RUNNING", 1: "WAITING"}
    killed_run = study.trials[0].user_attrs["mlflow_run_id"]

    best = search.run(*sp.search_sections(project))
    study = sp.study(project)
    assert states(study) == {0: "FAIL", 1: "COMPLETE", 2: "COMPLETE"}
    assert [t.params["generalist_share"] for t in study.trials] == [0.0, 0.75, 0.0]  # the share, run again
    _, nested = runs_of(study.user_attrs["mlflow_run_id"])
    assert nested[0].info.run_id == killed_run and nested[0].info.status == "FAILED"
    assert {n: r.info.status for n, r in nested.items()} == {0: "FAILED", 1: "FINISHED", 2: "FINISHED"}
    assert best["trials"] == {"complete": 2, "fail": 1}


# --- PostgreSQL: two workers, one study ---------------------------------------------------------------------


@pytest.fixture
def postgres():
    """A throwaway PostgreSQL cluster on 127.0.0.1 (Debian's binaries; as user postgres when we are root)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.skip("PostgreSQL is not installed: no /usr/lib/postgresql/*/bin/initdb (apt-get install -y postgresql)")
    bin_dir = Path(found[-1]).parent
    as_user: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="mixtune-pg-"))  # not pytest's tmp: user postgres cannot enter that
    if os.geteuid() == 0:  # initdb refuses to run as root
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no user postgres to run the cluster as")
        os.chmod(base, 0o777)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = sp.free_port()

    def pg(*cmd):
        subprocess.run([*as_user, *map(str, cmd)], check=True, capture_output=True, timeout=120)

    try:
        pg(bin_dir / "initdb", "-D", base / "data", "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        pg(bin_dir / "pg_ctl", "-D", base / "data", "-l", base / "log", "-w", "-t", "60",
           "-o", f"-h 127.0.0.1 -p {port} -k {base}", "start")
        for db in ("optuna", "mlflow"):
            pg(bin_dir / "createdb", "-h", "127.0.0.1", "-p", port, "-U", "postgres", db)
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        if (base / "data" / "postmaster.pid").exists():
            subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(base / "data"), "-m", "immediate", "stop"],
                           capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def test_two_workers_share_one_postgres_study(project, tiny_model, postgres, monkeypatch):
    import mlflow

    # psycopg2 named for MLflow (SQLAlchemy 2.1 reads plain postgresql:// as psycopg 3); search.storage needs not.
    storage, tracking = f"{postgres}/optuna", f"{postgres.replace('postgresql', 'postgresql+psycopg2')}/mlflow"
    sp.write_params(project, tiny_model, search={"n_trials": 4, "storage": storage},
                    train={"max_steps": 12, "batch_size": 2})  # trials long enough for both to get some
    mlflow.MlflowClient(tracking).search_experiments()  # the store's tables, made once (a migration is not concurrent)
    workers = [sp.mixtune(project, "search", "--worker", env_extra={"MLFLOW_TRACKING_URI": tracking})
               for _ in range(2)]
    try:
        outputs = [w.communicate(timeout=420)[0] for w in workers]
    finally:
        for w in workers:
            w.kill()
    assert [w.returncode for w in workers] == [0, 0], outputs
    assert not (project / "search" / "best.json").exists()  # workers write no outputs

    study = sp.study(project, storage)
    trials = study.trials
    assert [t.number for t in trials] == [0, 1, 2, 3]  # exactly n_trials: none twice, none over
    assert {t.state.name for t in trials} == {"COMPLETE"}
    assert [t.params["generalist_share"] for t in trials[:3]] == GRID  # each grid share once
    pids = {t.user_attrs["worker"].rsplit(":", 1)[1] for t in trials}
    assert pids == {str(w.pid) for w in workers}  # both contributed
    _, nested = runs_of(study.user_attrs["mlflow_run_id"], tracking)
    assert sorted(nested) == [0, 1, 2, 3]
    assert {n: r.info.run_id for n, r in nested.items()} == {t.number: t.user_attrs["mlflow_run_id"] for t in trials}

    # The stage itself finds the study complete, runs nothing and writes the outputs; with the trials' folders
    # gone (as if they ran on other machines), it takes the pure specialist's adapter from MLflow.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    shutil.rmtree(project / ".cache" / "adapters")
    best = search.run(*sp.search_sections(project))
    assert (project / "search" / "specialist_adapter" / "adapter_config.json").is_file()
    assert len(sp.study(project, storage).trials) == 4
    assert best["trials"] == {"complete": 4, "fail": 0}


# --- a real MLflow tracking server ---------------------------------------------------------------------------


@pytest.fixture
def mlflow_server(tmp_path):
    root = tmp_path / "server"
    root.mkdir()
    server = ["server", "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
              "--artifacts-destination", str(root / "artifacts")]
    with sp.mlflow_service(server, root, "/health", 120) as url:
        yield url


def test_search_logs_to_an_mlflow_server(project, tiny_model, mlflow_server, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    sp.write_params(project, tiny_model, search={"n_trials": 2, "grid": 2})
    best = search.run(*sp.search_sections(project))
    study = sp.study(project)
    parent, nested = runs_of(study.user_attrs["mlflow_run_id"], mlflow_server)
    assert sorted(nested) == [0, 1] and parent.data.tags["mlflow.note.content"] == best["answer"]
    assert {a.path for a in MlflowClient(mlflow_server).list_artifacts(parent.info.run_id)} >= {"trials.csv"}
    spec_run = study.trials[best["specialist_trial"]].user_attrs["mlflow_run_id"]
    assert best["specialist_adapter_uri"] == f"runs:/{spec_run}/adapter"  # the adapter, with the server's run
    assert "adapter/adapter_model.safetensors" in {
        a.path for a in MlflowClient(mlflow_server).list_artifacts(spec_run, "adapter")}


# --- never a stale answer -----------------------------------------------------------------------------------


def _studies(root: Path) -> dict[str, int]:
    """Study name -> its finished trials, in the project's journal."""
    import optuna

    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(root / "search" / "optuna.journal")))
    return {s.study_name: len([t for t in optuna.load_study(study_name=s.study_name, storage=storage).trials
                               if t.state.name == "COMPLETE"])
            for s in optuna.get_all_study_summaries(storage)}


def test_edited_code_starts_a_new_search_a_comment_or_an_unchanged_rerun_runs_nothing(project, tiny_model):
    """The package copied into the project is the code that runs. A comment added to its search.py changes no
    code: the next search re-uses the trials. A changed line of score.py is new code: the next search measures
    again under a new name instead of replaying the old trials."""
    src = project / "src"
    shutil.copytree(REPO / "src" / "mixtune", src / "mixtune")
    sp.write_params(project, tiny_model, search={"n_trials": 2, "grid": 2})

    def search_in_copy() -> str:
        proc = sp.mixtune(project, "search", env_extra={"PYTHONPATH": str(src),
                                                        "MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"]})
        out = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, out
        return json.loads((project / "search" / "best.json").read_text())["search"]

    first = search_in_copy()
    assert _studies(project) == {first: 2}
    assert search_in_copy() == first and _studies(project) == {first: 2}  # unchanged: nothing runs again
    search_py = src / "mixtune" / "stages" / "search.py"
    search_py.write_text(search_py.read_text().replace("\ndef run(", "\n# why: a comment\ndef run(", 1))
    assert search_in_copy() == first and _studies(project) == {first: 2}  # a comment: nothing runs again

    score_py = src / "mixtune" / "core" / "score.py"
    score_py.write_text(score_py.read_text() + "EDITED = True\n")
    second = search_in_copy()
    assert second != first and _studies(project) == {first: 2, second: 2}  # the old study stays in storage
    from mlflow import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    tagged = {r.data.tags["mixtune.search"] for r in client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.`mixtune.stage` = 'search'")}
    assert tagged == {first, second}


@pytest.mark.parametrize("section, key, value", [("evaluate", "max_new_tokens", 4), ("evaluate", "batch_size", 3),
                                                 ("train", "learning_rate", 1e-3), ("search", "grid", 2),
                                                 ("mix", "seed", 1)])
def test_every_parameter_that_changes_a_score_names_a_new_study(project, tiny_model, section, key, value):
    def name(**sections):
        sp.write_params(project, tiny_model, **sections)
        cfg, mix, train, model, score = sp.search_sections(project)
        return search.study_definition(cfg, mix, train, model, score, 16, project / "prepared")

    base = name()
    # more trials, or another reading of the same curve, continue the same search
    assert name(search={"n_trials": 7, "timeout": 60, "recommend": "least_forgetting", "max_forgetting": 0.1}) == base
    assert name(**{section: {key: value}}) != base


# --- one recommendation -------------------------------------------------------------------------------------


def _dev(n: int = 200) -> list[dict]:
    return [{"id": f"d/{i}", "task": sp.TASK, "completion": "ab"[i % 2], "options": ["a", "b"]} for i in range(n)]


def _right(dev: list[dict], k: int) -> list[str]:
    """The first k dev answers right, the rest wrong: accuracy k/n."""
    return [ex["completion"] if i < k else ("b" if ex["completion"] == "a" else "a") for i, ex in enumerate(dev)]


def _study(points: list[tuple[float, int, str]], base_probe: str = "1111111111", steps: list[int] | None = None):
    """An in-memory study of completed trials (share, right answers of 200, probe bits; optimizer steps), as the
    search records them; `recommend` reads nothing else."""
    import optuna

    dev = _dev()
    study = optuna.create_study(direction="maximize")
    study.set_user_attr("specialist_size", 64)
    study.set_user_attr("tasks", sp.TASK)
    study.set_user_attr("base_probe", base_probe)
    dist = {"generalist_share": optuna.distributions.FloatDistribution(0.0, 0.5)}
    for n, (share, k, probe) in enumerate(points):
        study.add_trial(optuna.trial.create_trial(
            params={"generalist_share": share}, distributions=dist, value=k / len(dev),
            user_attrs={"dev_predictions": _right(dev, k), "probe": probe, "adapter": f"/a/{n}",
                        "adapter_uri": f"runs:/r{n}/adapter", "trained_tokens": 10,
                        "steps": steps[n] if steps else 24}))
    return study, dev


def _recommend(points, metric="accuracy", base_probe="1111111111", steps=None, **search_keys):
    from mixtune.core import score

    study, dev = _study(points, base_probe, steps)
    cfg = sp.load_section_with(search={"metric": metric, "max_share": 0.5, "n_trials": 6, "grid": 6, **search_keys})
    return search.recommend(study, score.Scorer(dev, metric), cfg, 300)


def test_a_rising_curve_recommends_the_top_and_says_to_widen_the_range():
    r = _recommend([(0.0, 100, "1111100000"), (0.25, 110, "1111100000"), (0.5, 170, "1111100000")])
    assert r["best_trial"] == 2 and r["near_optimal"] == [0.5] and r["recommended_share"] == 0.5
    assert (r["best_share_low"], r["best_share_high"]) == (0.5, 0.5)
    assert r["dev_gain"] == pytest.approx(0.35) and r["dev_gain_low"] > 0.25
    assert r["at_top_of_range"] is True
    assert r["answer"].startswith(f"For {sp.TASK} at 64 examples, use a generalist share of r=0.50: the fewest "
                                  "generalist tokens among the shares within noise of the best (near-optimal range "
                                  "r in [0.50, 0.50], 1 of 3 shares); dev accuracy +0.350 [")
    assert "it is at the top of the searched range (search.max_share=0.5): widen it." in r["answer"]
    assert r["longer_than_specialist"] is False and "optimizer steps" not in r["answer"]  # all trained 24 steps


def test_a_share_that_trained_longer_than_the_pure_specialist_says_so_and_how_to_check_it():
    """train.epochs over each mix: r=0.5 trains twice the pure specialist's steps, and the answer names the run
    that trains the pure specialist as long (the default's r=0.9 trained 240 steps against 24, and lost to it)."""
    r = _recommend([(0.0, 100, "1111100000"), (0.25, 110, "1111100000"), (0.5, 170, "1111100000")],
                   steps=[24, 32, 48])
    assert r["recommended_share"] == 0.5 and r["longer_than_specialist"] is True
    assert (r["specialist_steps"], r["recommended_steps"]) == (24, 48)
    assert [c["steps"] for c in r["curve"]] == [24, 32, 48]
    assert "; it is at the top of the searched range (search.max_share=0.5): widen it. r=0.50 trained 48 optimizer " \
           "steps, the pure specialist 24: part of its gain may be the longer training, not the generalist data; " \
           "compare it with the pure specialist trained as long: dvc exp run --temp -S train.max_steps=48 -S " \
           "search.grid=1 -S search.n_trials=1. Held-out" in r["answer"]
    flat = _recommend([(0.0, 120, "1111100000"), (0.5, 122, "1111111111")], steps=[24, 48])
    assert flat["recommended_share"] == 0.0 and flat["longer_than_specialist"] is False  # r=0 recommended: nothing
    assert "optimizer steps" not in flat["answer"]


# Up, then flat, then down (right answers of 200): 0.1, 0.25 and 0.4 differ by 2-3 examples, within noise.
FLAT_TOP = [(0.0, 100, "1111100000"), (0.1, 153, "1110000000"), (0.25, 155, "1111000000"),
            (0.4, 152, "1111111110"), (0.5, 120, "1111111111")]


def test_the_near_optimal_range_and_the_fewest_tokens_in_it():
    r = _recommend(FLAT_TOP)
    assert r["best_trial_share"] == 0.25 and r["near_optimal"] == [0.1, 0.25, 0.4]
    assert r["recommended_share"] == 0.1 and r["recommended_trial"] == 1  # the smallest share within noise
    assert r["dev_gain"] == pytest.approx(0.265)
    assert [c["share"] for c in r["curve"]] == [0.0, 0.1, 0.25, 0.4, 0.5]
    assert all(c["low"] <= c["dev"] <= c["high"] for c in r["curve"])
    assert r["at_top_of_range"] is False and "widen" not in r["answer"]
    assert "near-optimal range r in [0.10, 0.40], 3 of 5 shares" in r["answer"]
    assert "Best measured share r=0.25 (dev accuracy 0.775;" in r["answer"]
    # forgetting at the recommended share and for the pure specialist, against the base model (all right)
    assert r["forgetting"] == pytest.approx(0.7) and r["specialist_forgetting"] == pytest.approx(0.5)
    assert "Held-out generalist accuracy lost against the base model: +0.70 at r=0.10, +0.50 for the pure " \
           "specialist." in r["answer"]


def test_least_forgetting_picks_another_share_of_the_same_range():
    r = _recommend(FLAT_TOP, recommend="least_forgetting")
    assert r["near_optimal"] == [0.1, 0.25, 0.4] and r["recommended_share"] == 0.4
    assert r["forgetting"] == pytest.approx(0.1)
    assert "use a generalist share of r=0.40: the least forgetting among the shares" in r["answer"]


def test_a_trial_recorded_without_its_steps_reads_them_from_its_cache_entry(tmp_path):
    """A search recorded before trials kept their steps: the answer reads each trial's from its adapter's cache
    entry (metrics.json, written by the trial core), and says nothing when that is not at hand either."""
    import optuna

    from mixtune.core import search_answer

    entry = tmp_path / "key"
    (entry / "adapter").mkdir(parents=True)
    (entry / "metrics.json").write_text(json.dumps({"train_loss": 1.0, "final_loss": 0.9, "steps": 240,
                                                    "trained_tokens": 322140}))
    dist = {"generalist_share": optuna.distributions.FloatDistribution(0.0, 0.9)}

    def made(attrs):
        return optuna.trial.create_trial(params={"generalist_share": 0.9}, distributions=dist, value=0.5,
                                         user_attrs=attrs)

    assert search_answer.steps_of(made({"adapter": str(entry / "adapter")})) == 240
    assert search_answer.steps_of(made({"adapter": str(entry / "adapter"), "steps": 12})) == 12  # its own first
    assert search_answer.steps_of(made({"adapter": str(tmp_path / "gone" / "adapter")})) is None
    assert search_answer.steps_of(made({})) is None


def test_no_share_beyond_the_noise_recommends_the_pure_specialist():
    r = _recommend([(0.0, 120, "1111100000"), (0.5, 122, "1111111111")])
    assert r["near_optimal"] == [0.0, 0.5] and r["recommended_share"] == 0.0 and r["dev_gain"] == 0.0
    assert "generalist data does not help measurably here: use r=0 (the pure specialist, dev accuracy 0.600), " \
           "which is within noise of the best share r=0.50 (dev 0.610)" in r["answer"]


def test_max_forgetting_recommends_within_it_and_names_the_smallest_share_that_keeps_it():
    points = [(0.0, 100, "1111111000"), (0.25, 150, "1100000000"), (0.5, 151, "1111111100")]
    free = _recommend(points)
    assert free["near_optimal"] == [0.25, 0.5] and free["recommended_share"] == 0.25
    assert free["smallest_share_within_max_forgetting"] is None and "max_forgetting" not in free["answer"]
    bound = _recommend(points, max_forgetting=0.25)  # 0 forgets 0.3 and 0.25 forgets 0.8 of the base's 1.0
    assert bound["recommended_share"] == 0.5 and bound["smallest_share_within_max_forgetting"] == 0.5
    assert bound["answer"].endswith("Smallest share within search.max_forgetting=0.25: r=0.50.")
    none = _recommend(points, max_forgetting=0.1)
    assert none["recommended_share"] == 0.0 and none["smallest_share_within_max_forgetting"] is None
    assert "keeps forgetting within search.max_forgetting=0.1: use r=0, the pure specialist" in none["answer"]


def test_the_metric_decides_the_recommendation():
    """On an imbalanced task a majority-class adapter wins by accuracy and loses by macro-F1."""
    from mixtune.core import score

    dev = [{"id": f"d/{i}", "task": "emotion", "completion": "joy" if i < 14 else ("anger", "fear")[i % 2],
            "options": ["anger", "fear", "joy"]} for i in range(20)]
    majority = ["joy"] * 20  # accuracy 0.70, macro-F1 0.27
    seeing = [ex["completion"] if i >= 14 else ("joy" if i < 7 else "anger") for i, ex in enumerate(dev)]  # 0.65, 0.68
    import optuna

    dist = {"generalist_share": optuna.distributions.FloatDistribution(0.0, 0.5)}
    results = {}
    for metric in ("accuracy", "macro_f1"):
        scorer = score.Scorer(dev, metric)
        study = optuna.create_study(direction="maximize")
        study.set_user_attr("specialist_size", 64)
        for n, (share, preds) in enumerate([(0.0, majority), (0.5, seeing)]):
            study.add_trial(optuna.trial.create_trial(
                params={"generalist_share": share}, distributions=dist,
                value=scorer.value(scorer.encode(preds))[0],
                user_attrs={"dev_predictions": preds, "adapter": f"/a/{n}", "adapter_uri": f"runs:/r{n}/adapter"}))
        cfg = sp.load_section_with(search={"metric": metric, "max_share": 0.5, "n_trials": 6, "grid": 6})
        results[metric] = search.recommend(study, scorer, cfg, 300)["best_trial"]
    assert results == {"accuracy": 0, "macro_f1": 1}


def test_the_pure_specialist_scoring_best_is_said_plainly():
    r = _recommend([(0.0, 150, "1111100000"), (0.25, 120, "1111100000"), (0.5, 100, "1111100000")])
    assert r["best_trial_share"] == 0.0 and r["recommended_share"] == 0.0 and r["near_optimal"] == [0.0]
    assert r["answer"].startswith(f"For {sp.TASK} at 64 examples, generalist data does not help here: use r=0, the "
                                  "pure specialist, which scores best. Best measured share r=0.00 (dev accuracy 0.750;")


# --- the time left, in the progress line ---------------------------------------------------------------------


def test_time_left_counts_that_a_share_costs_more_the_higher_it_is():
    """After the pure specialist alone (193 s for 27,519 tokens, 64 task examples), the grid's five other shares
    hold 14, 36, 75, 165 and 576 generalist examples: a generalist example taken as long as a task example,
    a trial costs 193 x (1 + n_g / 64) s, 3,576.5 s in all; the old estimate (the mean trial so far times the
    trials left) said 965 s. The fresh clone's make run then took 3,319 s for them."""
    from mixtune.plumbing.search_storage import time_left

    assert time_left([(0, 27519, 193.0)], [14, 36, 75, 165, 576], 0, 64) == pytest.approx(193 * (5 + 866 / 64))
    # two trials fit both lines: tokens = 1000 + 20 n_g, seconds = 10 + 0.01 x tokens; one grid share (n_g 50:
    # 2,000 tokens, 30 s) and one Gaussian-process trial at the grid's mean cost
    assert time_left([(0, 1000, 20.0), (100, 3000, 40.0)], [50], 1, 10) == pytest.approx(60.0)
    # a line with a negative intercept (noisy timings) is not trusted: all of the time per token
    assert time_left([(0, 1000, 5.0), (100, 3000, 40.0)], [50], 0, 10) == pytest.approx(2000 * 45 / 4000)


def test_the_progress_line_estimates_the_rest_from_the_grid_it_still_has_to_run(project):
    """The progress line after the first trial says what `time_left` makes of that trial's recorded time and
    tokens for the grid's two other shares (10 and 48 generalist examples at 16 task examples); the last line,
    nothing left."""
    import re

    from mixtune.plumbing.search_storage import minutes, time_left

    proc = sp.mixtune(project, "search")
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out
    lines = [line for line in out.splitlines() if "trials done" in line]
    assert len(lines) == 3, out
    t0 = sp.study(project).trials[0]
    seconds = (t0.datetime_complete - t0.datetime_start).total_seconds()
    expected = minutes(time_left([(0, t0.user_attrs["trained_tokens"], seconds)], [10, 48], 0, 16))
    assert re.search(rf"trial 0 r=0\.00: dev .*; 1 of 3 trials done, \d+m\d\ds elapsed, about {expected} left$", lines[0])
    assert lines[-1].endswith("about 0m00s left") and "3 of 3 trials done" in lines[-1]
