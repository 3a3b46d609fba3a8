"""The Optuna study behind a search: its storage, its sampler (never a share already measured), the claim that
orders the processes sharing it, stale trials, and the MLflow runs of the study and of each trial.

Storage: search/optuna.journal by default (a file; a killed process leaves its trial RUNNING, and the next
process on this machine fails it because that process is gone), or a database URL (RDB storage with heartbeats:
a worker that stops beating for GRACE seconds has its trial failed by the others).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path

from mixtune.plumbing.errors import MixtuneError, first_line
from mixtune.plumbing.tracking import Timer, repo_root, stage_run, tracking_uri, with_exp_name

HEARTBEAT, GRACE = 10, 60  # seconds; GRACE covers a pause of the heartbeat thread under a long forward pass


def journal_path() -> Path:
    # Absolute: `dvc exp run --temp` runs in a copy of the repository, and the study must outlive that copy.
    return repo_root() / "search" / "optuna.journal"


def db_url(url: str) -> str:
    """SQLAlchemy 2.1 reads postgresql:// as psycopg 3; the driver installed here is psycopg2."""
    return "postgresql+psycopg2://" + url.removeprefix("postgresql://") if url.startswith("postgresql://") else url


def count(study, states) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def share_of(t) -> float | None:
    """A trial's share, also for an enqueued trial that has not started (its params are still empty)."""
    return t.params.get("generalist_share", t.system_attrs.get("fixed_params", {}).get("generalist_share"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a killed child its parent has not reaped yet is a zombie: gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def end_trial_run(study, trial) -> None:
    """The MLflow run of a trial whose process died is left RUNNING: end it FAILED, as its trial."""
    from mlflow import MlflowClient

    run_id = trial.user_attrs.get("mlflow_run_id")
    if run_id:
        with contextlib.suppress(Exception):  # a store that is gone must not stop the study
            client = MlflowClient(tracking_uri())
            client.set_tag(run_id, "mixtune.trial_state", "FAIL")
            client.set_terminated(run_id, "FAILED")


class Claim:
    """A lock, across processes and machines, on one study: held while creating it and enqueuing the
    baselines, and from counting its trials until the next one is RUNNING, so several workers neither enqueue
    a baseline twice nor run more than n_trials. A file lock beside the journal, or a PostgreSQL advisory lock;
    either ends with its process. (Other databases: no lock; start one worker first.)"""

    def __init__(self, storage: str | None, study_name: str) -> None:
        self.url = db_url(storage) if storage else None
        self.key = int.from_bytes(hashlib.sha256(study_name.encode()).digest()[:8], "big", signed=True)
        self._held = None

    def acquire(self) -> None:
        if self._held is not None:
            return
        if self.url is None:
            path = journal_path().with_name("optuna.journal.claim")
            path.parent.mkdir(parents=True, exist_ok=True)
            f = open(path, "a")
            fcntl.flock(f, fcntl.LOCK_EX)
            self._held = f
        elif self.url.startswith("postgresql"):
            import sqlalchemy as sa

            conn = sa.create_engine(self.url, poolclass=sa.pool.NullPool).connect()
            conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": self.key})
            self._held = conn

    def release(self) -> None:
        held, self._held = self._held, None
        if held is None:
            return
        if self.url is None:
            fcntl.flock(held, fcntl.LOCK_UN)
        else:
            import sqlalchemy as sa

            held.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
        held.close()

    def fail_stale(self, study) -> None:
        """Mark FAIL the trials left RUNNING by a process that is gone (call it holding the claim)."""
        import optuna
        from optuna.trial import TrialState

        if self.url is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)  # heartbeats; the storage's callback ends the MLflow run
            return
        host = socket.gethostname()
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            # The journal is this machine's: a trial of another host (an old container) is stale too.
            worker_host, _, pid = t.user_attrs.get("worker", "").partition(":")
            if worker_host == host and pid.isdigit() and _alive(int(pid)):
                continue
            study.tell(t.number, state=TrialState.FAIL)
            end_trial_run(study, t)


def _storage(url: str | None):
    import optuna

    if url is None:
        path = journal_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: stable for years
            return optuna.storages.RDBStorage(db_url(url), heartbeat_interval=HEARTBEAT, grace_period=GRACE,
                                              heartbeat_stale_trial_callback=end_trial_run,
                                              engine_kwargs={"pool_pre_ping": True})
    except Exception as e:  # unreachable server, bad credentials, no driver
        import sqlalchemy as sa

        shown = sa.engine.make_url(url).render_as_string(hide_password=True)
        raise MixtuneError(f"search.storage {shown}: {first_line(e)}") from None


def open_study(cfg, name: str, size: int, claim: Claim, grid: list[float]):
    """Create or load the search's Optuna study; enqueue each share of the grid unless a trial at it is done,
    running or queued (a failed one is run again)."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    claim.acquire()
    try:
        storage = _storage(cfg.storage)  # under the claim: workers starting together would race to create tables
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize",
                                    load_if_exists=True)
        if "specialist_size" not in study.user_attrs:
            study.set_user_attr("specialist_size", size)
        claim.fail_stale(study)
        live = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING))
        for share in grid:
            if not any(share_of(t) == share for t in live):
                study.enqueue_trial({"generalist_share": share}, user_attrs={"grid": True})
    finally:
        claim.release()
    return study


@dataclass(frozen=True)
class Parent:
    run_id: str
    experiment_id: str


def parent_run(study, claim: Claim, tasks: list[str], params: dict, tags: dict, timer: Timer) -> Parent:
    """The study's MLflow run: made once, by whichever process comes first, and kept across re-runs (its id is
    a study attribute), so the UI shows one study with all its trials nested under it."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    claim.acquire()
    try:
        run_id = study.user_attrs.get("mlflow_run_id")
        run = None
        if run_id:
            with contextlib.suppress(Exception):  # another tracking store than the one that made it
                run = mlflow.get_run(run_id)
        if run is None:
            label = with_exp_name(f"n={study.user_attrs['specialist_size']}")
            with stage_run("search", tasks, params, tags, timer, label=label) as run:
                pass
            study.set_user_attr("mlflow_run_id", run.info.run_id)
    finally:
        claim.release()
    return Parent(run.info.run_id, run.info.experiment_id)


@contextlib.contextmanager
def trial_run(parent: Parent, trial, share: float, size: int, timer: Timer):
    """A trial's nested MLflow run; it ends FINISHED (complete), FAILED or KILLED, as the trial."""
    import mlflow

    with timer():
        run = mlflow.start_run(experiment_id=parent.experiment_id, run_name=f"trial {trial.number} r={share:.2f}", nested=True,
                               parent_run_id=parent.run_id,
                               tags={"mixtune.stage": "search-trial", "mixtune.search": trial.study.study_name,
                                     "mixtune.trial": str(trial.number), "mixtune.worker": trial.user_attrs["worker"]})
        mlflow.log_params({"trial": trial.number, "generalist_share": share, "specialist_size": size})
    trial.set_user_attr("mlflow_run_id", run.info.run_id)
    state, status = "FAIL", "FAILED"
    try:
        yield run
        state, status = "COMPLETE", "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except Exception as e:
        reason = first_line(e)
        trial.set_user_attr("error", reason)
        with timer():
            mlflow.set_tag("mixtune.error", reason[:5000])
        raise
    finally:
        with timer():
            mlflow.set_tag("mixtune.trial_state", state)
            mlflow.end_run(status)


SAME_SHARE = 0.01  # shares closer than this train nearly the same mix (one example apart at 64): not a new point



def sampler(**kw):
    """Optuna's GPSampler, except that a share already measured (or being measured) is never proposed again:
    with noisy scores the process may well pick an end of the range twice, but the curve needs new points, and
    the answer reads one trial per share. Such a proposal becomes the middle of the widest gap between the
    shares measured so far."""
    import optuna
    from optuna.trial import TrialState

    class NewShares(optuna.samplers.GPSampler):
        def sample_relative(self, study, trial, search_space):
            params = super().sample_relative(study, trial, search_space)
            share = params.get("generalist_share")
            if share is None:
                return params
            low, high = search_space["generalist_share"].low, search_space["generalist_share"].high
            taken = sorted({share_of(t) for t in study.get_trials(deepcopy=False, states=(
                TrialState.COMPLETE, TrialState.RUNNING)) if share_of(t) is not None} | {low, high})
            if min(abs(share - s) for s in taken) < SAME_SHARE:
                a, b = max(zip(taken, taken[1:]), key=lambda gap: gap[1] - gap[0])
                params["generalist_share"] = (a + b) / 2
            return params

    return NewShares(**kw)


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def time_left(trained: list[tuple[int, int, float]], grid_left: list[int], extra: int, size: int) -> float:
    """Seconds the search's remaining trials will take, from the trials this process trained, each (generalist
    examples, training tokens, seconds). A trial costs about a + b x its tokens (scoring is the same at every
    share, training grows as 1/(1-r): r=0.9 trains ten times the pure specialist's tokens), and a share's tokens
    are about t0 + g x its generalist examples; both lines are fitted on the trials so far (before a trial with
    generalist data, a generalist example counts as long as a task example). `grid_left`: the generalist counts
    of the grid's shares still to come; `extra` trials at shares not chosen yet cost the mean of the grid's."""
    import numpy as np

    n_g, tokens, seconds = (np.array(c, dtype=float) for c in zip(*trained))
    if len(set(n_g)) > 1:
        g, t0 = np.polyfit(n_g, tokens, 1)
    else:
        g = tokens.mean() / (size + n_g.mean())
        t0 = g * size
    b, a = np.polyfit(tokens, seconds, 1) if len(set(tokens)) > 1 else (0.0, 0.0)
    if b <= 0 or a < 0:  # too few or too noisy trials for a line: all of it per token
        b, a = seconds.sum() / tokens.sum(), 0.0
    cost = [a + b * (t0 + g * n) for n in (grid_left or list(n_g))]
    return float(sum(cost[:len(grid_left)]) + extra * np.mean(cost))


def grid(cfg) -> list[float]:
    """The first trials: `cfg.grid` shares evenly spaced over [0, max_share], the pure specialist first."""
    n = cfg.grid
    return [round(cfg.max_share * i / (n - 1), 4) for i in range(n)] if n > 1 else [0.0]
