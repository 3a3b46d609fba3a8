"""MLflow tracking: one experiment per specialist task, one run per stage execution.

The store defaults to `sqlite:///<repo>/mlruns/mlflow.db` with artifacts under `<repo>/mlruns/artifacts`, always
absolute: `dvc exp run --temp/--queue` runs stages in a copy under `.dvc/tmp/exps/`, and a relative store would
be logged into that copy and lost. `MLFLOW_TRACKING_URI` overrides it (a team's tracking server).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from mixtune.plumbing.errors import MixtuneError, first_line

_EXPS = f"{os.sep}.dvc{os.sep}tmp{os.sep}exps{os.sep}"
# Tags that link runs to the files they wrote or read (find_run): the sha256 of an adapter (train and evaluate
# runs, registered versions) and of eval/predictions.jsonl (evaluate runs).
ADAPTER_TAG = "mixtune.adapter_sha256"
PREDICTIONS_TAG = "mixtune.predictions_sha256"
REUSED_TAG = "mixtune.reused_trial_run_id"  # a train run that took a search trial's adapter: that trial's run
# MLflow 3 opens an experiment with no runs of a known kind on its GenAI overview (traces: all empty); marked
# as model development, it opens on its runs.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def repo_root(cwd: Path | None = None) -> Path:
    """The user's repository, also from inside a DVC experiment's temporary copy."""
    path = str((cwd or Path.cwd()).resolve())
    return Path(path.split(_EXPS, 1)[0]) if _EXPS in path else Path(path)


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlruns' / 'mlflow.db'}"


def experiment_name(specialist_tasks: list[str]) -> str:
    return "mixtune/" + "+".join(specialist_tasks)


def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def git_commit() -> str | None:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path.cwd())
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def data_hash() -> str | None:
    """The md5 DVC recorded for the raw inputs (data.dvc), so a run names the exact data it saw."""
    import yaml

    path = Path("data.dvc")
    if not path.is_file():
        return None
    outs = (yaml.safe_load(path.read_text()) or {}).get("outs") or [{}]
    return outs[0].get("md5")


def mix_label(manifest: dict) -> str:
    """What tells one run of a stage from another in the UI: the share (from the search, or set by hand), the
    specialist size, and the DVC experiment's name when `dvc exp run` runs it (DVC sets DVC_EXP_NAME)."""
    how = "auto" if manifest.get("share_source") == "auto" else "set"
    return with_exp_name(f"r={manifest['generalist_share']:.2f} {how}, n={manifest['specialist_size']}")


def with_exp_name(label: str) -> str:
    exp = os.environ.get("DVC_EXP_NAME")
    return f"{label} [{exp}]" if exp else label


def find_run(specialist_tasks: list[str], stage: str, tags: dict[str, str]) -> str | None:
    """The latest finished run of `stage` with these tags, or None. A file's sha256 links a stage's run to the
    files it wrote: a run id written into an output would change that output, and dvc.lock, on every run."""
    import mlflow

    exp = mlflow.get_experiment_by_name(experiment_name(specialist_tasks))
    if exp is None:
        return None
    where = " and ".join([f"tags.`mixtune.stage` = '{stage}'", "attributes.status = 'FINISHED'",
                          *(f"tags.`{k}` = '{v}'" for k, v in tags.items())])
    runs = mlflow.search_runs([exp.experiment_id], where, order_by=["attributes.start_time DESC"], max_results=1,
                              output_format="list")
    return runs[0].info.run_id if runs else None


def is_main_process() -> bool:
    """Under `accelerate launch` every rank runs the stage; only rank 0 tracks and writes outputs."""
    return os.environ.get("RANK", "0") == "0"


class Timer:
    """Wall time spent inside MLflow calls, so its overhead is measured, not guessed."""

    def __init__(self) -> None:
        self.seconds = 0.0

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - t


def log_dataset(examples: list[dict], path: Path, name: str, context: str) -> None:
    """Record which examples a run saw (ids and tasks) and where they came from, as an MLflow dataset input."""
    import mlflow
    import pandas as pd

    frame = pd.DataFrame({"id": [e["id"] for e in examples], "task": [e["task"] for e in examples]})
    mlflow.log_input(mlflow.data.from_pandas(frame, source=str(Path(path).resolve()), name=name), context=context)


@contextlib.contextmanager
def stage_run(stage: str, specialist_tasks: list[str], params: dict, tags: dict | None = None,
              timer: Timer | None = None, run_id: str | None = None, label: str = "") -> Iterator[object]:
    """Open the stage's run, or reopen `run_id` (a search's study keeps one run across re-runs; its params were
    logged when it was made). It ends FINISHED, FAILED (an error) or KILLED (SIGINT/SIGTERM)."""
    timer = timer or Timer()
    if not is_main_process():
        yield None
        return
    with timer():
        import mlflow

        uri = tracking_uri()
        mlflow.set_tracking_uri(uri)
        name = experiment_name(specialist_tasks)
        try:
            exp = mlflow.get_experiment_by_name(name)
            if exp is None:
                artifacts = None
                if uri.startswith("sqlite:///"):
                    artifacts = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
                exp_id = mlflow.create_experiment(name, artifact_location=artifacts, tags=dict([EXPERIMENT_KIND]))
            else:
                exp_id = exp.experiment_id
            # System metrics (CPU, memory, disk) every 10 s, in a thread of MLflow's, beside the stage's own.
            if run_id:
                run = mlflow.start_run(run_id=run_id, log_system_metrics=True)
            else:
                run = mlflow.start_run(experiment_id=exp_id, run_name=f"{stage} {label}".strip(),
                                       log_system_metrics=True)
        except Exception as e:  # an unreachable server or a broken store
            raise MixtuneError(f"MLflow store {uri}: {first_line(e)}") from None
        mlflow.set_tags({"mixtune.stage": stage, "mlflow.source.git.commit": git_commit() or "",
                         "mixtune.data_md5": data_hash() or "", **(tags or {})})
        flat = {} if run_id else {k: ("" if v is None else v) for k, v in flatten(params).items()}
        for i in range(0, len(flat), 100):  # MLflow takes at most 100 params per batch
            mlflow.log_params(dict(list(flat.items())[i : i + 100]))
    status = "FINISHED"
    try:
        yield run
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        with timer():
            if status == "FINISHED":  # bench/bench_stages.py reads both, beside the run's wall time
                import resource

                mlflow.log_metrics({"mlflow_overhead_seconds": timer.seconds,
                                    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
            mlflow.end_run(status=status)
