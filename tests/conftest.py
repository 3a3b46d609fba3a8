"""Shared helpers for the data-stage tests: synthetic records, params files, and the CLI with its stderr."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from mixtune.files import dumps
from mixtune.schema import make_example

REPO = Path(__file__).resolve().parents[1]

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


def write_params(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(sections, sort_keys=False), encoding="utf-8")
    return path


def spec_source(path: str = "spec.jsonl", labels=("a", "b", "c"), **extra) -> dict:
    return {"name": "spec", "kind": "file", "path": path, "format": "classification",
            "labels": list(labels), "instruction": "Which class?", **extra}


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
    from tiny import build_tiny_model

    rng = random.Random(3)
    corpus = [sentence(rng, 20) for _ in range(300)] + ["Which class? Answer with one of: a, b, c."]
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", corpus)
