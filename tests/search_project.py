"""A small project for the search and register tests: prepared/ splits of a two-label task, a generalist pool,
and a params.yaml that trains the tiny model for a few steps."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml
from conftest import merged, repo_params, sentence

from mixtune.core.schema import make_example
from mixtune.core.sources import read_source
from mixtune.plumbing.config import FileSource
from mixtune.plumbing.files import write_json, write_jsonl

TASK = "topic"
LABELS = ["a", "b"]
SOURCE = {"name": TASK, "kind": "file", "path": "data/topic.jsonl", "format": "classification", "labels": LABELS,
          "instruction": "Which class?"}


def _examples(source: str, n: int, rng: random.Random, options: list[str] | None) -> list[dict]:
    return [make_example(id=f"{source}/{i}", source=source, task=TASK if options else f"g{i % 3}", keywords=[],
                         capability=None, prompt=[{"role": "user", "content": "Which class? " + sentence(rng, 8)}],
                         completion=rng.choice(options) if options else sentence(rng, 2), options=options)
            for i in range(n)]


def params(tiny_model: Path, **sections) -> dict:
    """The repository's params.yaml, small: the tiny model, a few steps, a few dev examples."""
    p = repo_params(
        mix={"specialist_size": 16, "generalist_share": 0.0, "seed": 0},
        model={"base": str(tiny_model)},
        train={"lora": {"r": 4, "alpha": 8}, "max_steps": 4, "batch_size": 4, "precision": "fp32",
               "logging_steps": 2, "group_by_length": False, "max_length": 128},
        evaluate={"batch_size": 8, "max_new_tokens": 8, "max_examples": None, "bootstrap": 100, "seed": 0},
        search={"n_trials": 3, "grid": 3, "max_share": 0.75},
    )
    del p["prepare"]
    return merged(p, sections)


def make_project(root: Path, tiny_model: Path, generalist: int = 60, **sections) -> Path:
    """prepared/ (specialist train 40, dev 12, test 12, read from the raw file data/topic.jsonl by the source
    reader prepare uses, with its recipe; a generalist pool) and params.yaml under `root`."""
    rng = random.Random(11)
    prepared = root / "prepared"
    write_jsonl(root / SOURCE["path"], [{"text": sentence(rng, 8), "label": rng.choice(LABELS)} for _ in range(64)])
    recipes: dict = {}
    spec = read_source(FileSource.model_validate(SOURCE), root, recipes=recipes)
    write_jsonl(prepared / "specialist" / "train.jsonl", spec[:40])
    write_jsonl(prepared / "specialist" / "dev.jsonl", spec[40:52])
    write_jsonl(prepared / "specialist" / "test.jsonl", spec[52:])
    write_json(prepared / "specialist" / "recipe.json", {"tasks": recipes})
    write_jsonl(prepared / "generalist.jsonl", _examples("gen", generalist, rng, None))
    write_jsonl(prepared / "generalist_probe.jsonl", _examples("probe", 8, rng, ["p", "q"]))
    write_params(root, tiny_model, **sections)
    return root


def write_params(root: Path, tiny_model: Path, **sections) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump(params(tiny_model, **sections), sort_keys=False))


def load(root: Path, section: str, keys=None):
    from mixtune.plumbing.config import load_section

    return load_section(section, root / "params.yaml", keys=keys)


def load_section_with(**sections):
    """The repository's params.yaml with these sections' keys replaced, validated (for calls without a project)."""
    from mixtune.plumbing.config import SECTIONS

    (name, values), = sections.items()
    return SECTIONS[name].model_validate(merged(repo_params()[name], values))


def search_sections(root: Path) -> list:
    """The sections as `mixtune search` loads them."""
    from mixtune.stages import search

    return [load(root, "search"), load(root, "mix", search.MIX_KEYS), load(root, "train"), load(root, "model"),
            load(root, "evaluate", search.SCORE_KEYS)]


def study(root: Path, storage: str | None = None, size: int | None = None):
    """The project's study (of `size`, when a search ran several), in the journal by default."""
    import optuna

    from mixtune.plumbing.search_storage import db_url

    if storage is not None:
        storage = db_url(storage)
    else:
        storage = optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(root / "search" / "optuna.journal")))
    summaries = [s for s in optuna.get_all_study_summaries(storage)
                 if size is None or s.user_attrs["specialist_size"] == size]
    (summary,) = summaries
    return optuna.load_study(study_name=summary.study_name, storage=storage)


def study_named(root: Path, name: str):
    """One search's Optuna study, by name, in the project's journal."""
    import optuna

    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(root / "search" / "optuna.journal")))
    return optuna.load_study(study_name=name, storage=storage)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra) -> dict:
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1", **extra}


def mixtune(root: Path, *args: str, env_extra: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mixtune.cli", *args], cwd=root, env=env(**(env_extra or {})),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def wait_until(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@contextlib.contextmanager
def mlflow_service(args: list[str], cwd: Path, health: str, timeout: float):
    """Start `mlflow <args> --host 127.0.0.1 --port <free>` in its own process group, wait until GET <health>
    answers 200, yield its URL; stop the whole group afterwards."""
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), *args, "--host", "127.0.0.1",
                             "--port", str(port)], cwd=cwd, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def up():
        if proc.poll() is not None:
            raise AssertionError(f"mlflow {args[0]} exited")
        try:
            return urllib.request.urlopen(f"{url}{health}", timeout=2).status == 200
        except OSError:
            return False

    try:
        wait_until(up, timeout, f"mlflow {args[0]}", interval=0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
