"""Shared helpers for the data-stage tests: synthetic records, params files, and the CLI with its stderr."""

from __future__ import annotations

import json
import os
import random
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from mixtune.core.schema import make_example
from mixtune.plumbing.files import dumps

REPO = Path(__file__).resolve().parents[1]
REAL_POOL = REPO / "data" / "generalist" / "evals-3.0.1.post1-py3-none-any.whl"
REAL_BBC = REPO / "data" / "specialist" / "bbc_news.jsonl"
REAL_MODEL = REPO / "models" / "SmolLM2-135M-Instruct"
N_TASKS = 5

_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "do", "gu", "fi", "he", "ba", "xo"]


def vocabulary(size: int = 3000, seed: int = 1234) -> list[str]:
    """Pseudo-words, so n-gram overlap between unrelated synthetic texts is practically impossible."""
    rng = random.Random(seed)
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))))
    return sorted(words)


VOCAB = vocabulary()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def classification_records(per_label: dict[str, int], *, seed: int = 0, words: int = 30) -> list[dict]:
    """Unique text+label records, `per_label[label]` of each, labels interleaved."""
    rng = random.Random(seed)
    records = [{"text": sentence(rng, words), "label": label}
               for label, n in per_label.items() for _ in range(n)]
    rng.shuffle(records)
    return records


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def merged(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` laid over it, nested mappings key by key."""
    out = dict(base)
    for k, v in overrides.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def repo_params(**overrides) -> dict:
    """The repository's params.yaml (every key has its value there, none in config.py) with `overrides`."""
    return merged(yaml.safe_load((REPO / "params.yaml").read_text()), overrides)


def section(name: str, **overrides):
    """One validated section of the repository's params.yaml, with `overrides`."""
    from mixtune.plumbing.config import SECTIONS

    return SECTIONS[name].model_validate(repo_params(**{name: overrides})[name])


def write_params(path: Path, **sections) -> Path:
    """A params file with `sections`, each laid over the repository's section of that name (config.py has no
    defaults: every key comes from a params file). A test's `prepare` has no generalist source and no minimum
    split size (its splits are a few examples) unless it says."""
    repo = yaml.safe_load((REPO / "params.yaml").read_text())
    if "prepare" in sections:
        sections["prepare"] = {"generalist": [], "min_eval_examples": 0, **sections["prepare"]}
        # prepare measures examples in the base model's tokens, against train.max_length
        sections = {"model": {}, "train": {}, **sections}
    full = {name: merged(repo[name], values) if name in repo and isinstance(values, dict) else values
            for name, values in sections.items()}
    path.write_text(yaml.safe_dump(full, sort_keys=False), encoding="utf-8")
    return path


def prepare_small_task(tmp_path: Path, cli, tiny_model: Path) -> None:
    """`mixtune prepare` through the CLI on a 40-record task of three labels (32 train examples) in `tmp_path`."""
    write_jsonl(tmp_path / "spec.jsonl", classification_records({"a": 20, "b": 10, "c": 10}))
    params = write_params(tmp_path / "params.yaml", prepare={"specialist": [spec_source()]},
                          model={"base": str(tiny_model)})
    rc, _, err = cli("--params", params, "prepare", "--root", tmp_path, "--out", tmp_path / "prepared")
    assert rc == 0, err


def spec_source(path: str = "spec.jsonl", labels=("a", "b", "c"), **extra) -> dict:
    return {"name": "spec", "kind": "file", "path": path, "format": "classification",
            "labels": None if labels is None else list(labels), "instruction": "Which class?", **extra}


def prepared_dir(root: Path, n_specialist: int, n_generalist: int, *, spec_tasks=("topic",),
                 gen_tasks=("g0", "g1", "g2", "g3", "g4")) -> Path:
    """A prepared/ folder as `prepare` writes it, built directly (the mix tests need no sources)."""
    rng = random.Random(7)
    out = root / "prepared"
    (out / "specialist").mkdir(parents=True)

    def lines(n, source, tasks, options):
        for i in range(n):
            task = tasks[i % len(tasks)]
            yield dumps(make_example(id=f"{source}/{i}", source=source, task=task, keywords=[], capability=None,
                                     prompt=[{"role": "user", "content": sentence(rng, 12)}],
                                     completion=rng.choice(options) if options else sentence(rng, 3),
                                     options=options)) + "\n"

    (out / "specialist" / "train.jsonl").write_text("".join(lines(n_specialist, "spec", spec_tasks, ["a", "b"])))
    (out / "generalist.jsonl").write_text("".join(lines(n_generalist, "gen", gen_tasks, None)))
    return out


@pytest.fixture(scope="session", autouse=True)
def private_mlflow_store(tmp_path_factory):
    """The session's own MLflow store, so no test logs into the project's (`<repo>/mlruns`, which `make ui` shows)
    nor a team server the shell names. Set in os.environ, not by monkeypatch, so the stage subprocesses the tests
    start inherit it; a test that wants a store of its own still sets MLFLOW_TRACKING_URI with monkeypatch, and the
    end-to-end tests that run `dvc repro` in a temporary project drop it there, so that project's store is used."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow-store')}/mlflow.db"
    before = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(autouse=True)
def no_mlflow_run_left_active():
    """A test that leaves an MLflow run active (in this process) fails, and the run is ended: the next test's stage
    would otherwise fail to start its own run, far from the cause."""
    yield
    mlflow = sys.modules.get("mlflow")
    run = mlflow.active_run() if mlflow else None
    if run is not None:
        mlflow.end_run()
        pytest.fail(f"the test left MLflow run {run.info.run_id} ({run.info.run_name}) active")


@pytest.fixture
def cli(capsys):
    """Run `mixtune.cli.main(argv)`; -> (exit code, stdout, stderr)."""
    from mixtune.cli import main

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        rc = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return rc, out, err

    return run


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random Llama + BPE tokenizer with a chat template (seconds), for train/evaluate/tracking tests."""
    import torch
    from tiny import build_tiny_model

    # A 32-wide model gains nothing from a second thread, and on a busy 2-core machine every matmul then waits
    # in OpenMP barriers: the tests ran ~100x slower with 2 threads while another process used the cores.
    torch.set_num_threads(1)

    rng = random.Random(3)
    corpus = [sentence(rng, 20) for _ in range(300)] + ["Which class? Answer with one of: a, b, c."]
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", corpus)


@pytest.fixture(scope="session")
def evals_subset(tmp_path_factory) -> tuple[Path, list[str]]:
    """A small real OpenAI Evals wheel: its first samples files (by name, under 1 MB) until N_TASKS tasks with
    questions are in, at least one of them multiple choice over a closed answer set (the forgetting probe's)."""
    from mixtune.core import evals

    if not REAL_POOL.is_file():
        pytest.skip(f"{REAL_POOL} is absent: run `mixtune fetch` (or `make fetch`) first")
    out = tmp_path_factory.mktemp("evals") / REAL_POOL.name
    tasks: list[str] = []
    closed = 0
    with zipfile.ZipFile(REAL_POOL) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in sorted(src.infolist(), key=lambda i: i.filename):
            name = info.filename
            if not (name.startswith(evals.DATA_DIR) and name.endswith(".jsonl")) or info.file_size > 1_000_000:
                continue
            if len(tasks) >= N_TASKS and closed:
                break
            data = src.read(name)
            answers = [got[1] for got in map(evals.parse, (json.loads(ln) for _, ln in evals.records(data)))
                       if got]
            if not answers or (len(tasks) >= N_TASKS - 1 and not closed and not evals.closed_set(answers[:100])):
                continue
            dst.writestr(info, data)
            tasks.append(name[len(evals.DATA_DIR):-len(".jsonl")])
            closed += bool(evals.closed_set(answers[:100]))
    assert len(tasks) == N_TASKS and closed
    return out, tasks
