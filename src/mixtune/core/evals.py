"""The OpenAI Evals registry as a generalist pool: the samples of its 554 crowd-written evals (MIT), read in place
from the `evals` wheel, capped per task (seeded). A task is a samples file (`evals/registry/data/<task>.jsonl`);
an example is its `input` (text, or chat messages with their few-shot turns) and its first `ideal` answer.

A task whose answers come from a small closed set (yes/no, A-D, true/false, a few labels) is multiple choice
over that set, as a classification task is over its labels: those questions can serve as the forgetting probe.
Records of other shapes (model-graded or game-state evals) are counted, never silently dropped."""

from __future__ import annotations

import json
import re
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from mixtune.core.schema import make_example
from mixtune.plumbing.config import EvalsSource
from mixtune.plumbing.errors import MixtuneError, first_line

DATA_DIR = "evals/registry/data/"
# Few-shot turns are system messages named as the user or the assistant (the registry's convention).
_NAMED = {"example_user": "user", "example_assistant": "assistant"}
_LINES = re.compile(rb"\r\n|\r|\n")
CLOSED_SET = 10  # at most this many distinct answers, each of at most 3 words, and 5 examples per answer


def _messages(value: object) -> list[dict] | None:
    if isinstance(value, str):
        return [{"role": "user", "content": value}] if value.strip() else None
    if not isinstance(value, list) or not value:
        return None
    out = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            return None  # e.g. image parts: not text
        role = _NAMED.get(m.get("name"), m.get("role"))
        if role not in ("system", "user", "assistant"):
            return None
        out.append({"role": role, "content": m["content"]})
    return out if out[-1]["role"] == "user" and out[-1]["content"].strip() else None


def parse(record: object) -> tuple[list[dict], str] | None:
    """-> (prompt messages, answer), or None for a record that is not a question with an ideal answer."""
    if not isinstance(record, dict):
        return None
    ideal = record.get("ideal")
    if isinstance(ideal, list):
        ideal = ideal[0] if ideal and all(isinstance(i, str) for i in ideal) else None
    prompt = _messages(record.get("input"))
    if prompt is None or not isinstance(ideal, str) or not ideal.strip():
        return None
    return prompt, ideal


def closed_set(answers: list[str]) -> list[str] | None:
    """The options of a task whose answers come from a small closed set, else None."""
    counts = Counter(a.strip() for a in answers)
    if (2 <= len(counts) <= CLOSED_SET and len(answers) >= 5 * len(counts)
            and all(len(a.split()) <= 3 for a in counts)):
        return sorted(counts)
    return None


def records(raw: bytes) -> list[tuple[int, bytes]]:
    """A samples file's non-blank lines, with their line numbers. A raw CR cannot be inside a JSON string, so a CR
    alone ends a line too (one of the registry's files uses it)."""
    return [(n, ln) for n, ln in enumerate(_LINES.split(raw), 1) if ln.strip()]


def tasks(path: Path) -> Iterator[tuple[str, list[tuple[int, bytes]]]]:
    """(task, its records) for every samples file of the registry, in name order."""
    with zipfile.ZipFile(path) as zf:
        for name in sorted(zf.namelist()):
            if name.startswith(DATA_DIR) and name.endswith(".jsonl"):
                yield name[len(DATA_DIR):-len(".jsonl")], records(zf.read(name))


def examples(src: EvalsSource, root: Path, seed: int, left_out: Counter | None = None) -> Iterator[dict]:
    """`left_out` counts the sampled records that are not a question with an ideal answer."""
    path = root / src.path
    if not path.is_file():
        raise MixtuneError(f"{src.path}: source '{src.name}': no such file (run `mixtune fetch`)")
    try:
        for task, rows in tasks(path):
            if not src.selects(task):
                continue
            parsed = []
            for i in src.sample(len(rows), seed, task):  # only the capped sample is decoded
                line, raw = rows[i]
                try:
                    record = json.loads(raw)
                except ValueError as e:
                    raise MixtuneError(f"{src.path}: {DATA_DIR}{task}.jsonl: line {line}: not valid JSON: "
                                       f"{first_line(e)}") from None
                if (got := parse(record)) is None:
                    if left_out is not None:
                        left_out["other_format_removed"] += 1
                    continue
                parsed.append((i, *got))
            options = closed_set([answer for _, _, answer in parsed])
            for i, prompt, answer in parsed:
                yield make_example(id=f"{src.name}/{task}/{i}", source=src.name, task=task, keywords=src.keywords,
                                   capability=src.capability or None, prompt=prompt,
                                   completion=answer.strip() if options else answer, options=options)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise MixtuneError(f"{src.path}: not a readable wheel (zip) archive: {e}") from None

