"""BIG-bench as a generalist pool: its tasks streamed from the sdist archive, capped per task (seeded), each
example a prompt with the task's own prefixes and options."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

from mixtune.core.schema import make_example
from mixtune.plumbing.config import BigbenchSource
from mixtune.plumbing.errors import MixtuneError, first_line

_TASKS_DIR = "/bigbench/benchmark_tasks/"
_PREFIXES = ("task_prefix", "example_input_prefix", "example_output_prefix")  # of a task.json: its prompt


def _selected(src: BigbenchSource, task: str, keywords: list[str]) -> bool:
    kw = {k.lower() for k in keywords}
    return (src.selects(task) and (not src.include_keywords or bool(kw & {k.lower() for k in src.include_keywords}))
            and not kw & {k.lower() for k in src.exclude_keywords})


def example(task_json: dict, ex: dict) -> tuple[str, str, list[str] | None] | None:
    """-> (user text, completion, options), or None for an example with no usable answer.

    The task's own example_input_prefix / example_output_prefix are part of the question (e.g. anachronisms
    asks "Does the preceding sentence contain non-contemporaneous (anachronistic) elements?" only there)."""
    question = ((task_json.get("task_prefix") or "") + (task_json.get("example_input_prefix") or "")
                + str(ex.get("input", "")))
    answer_cue = task_json.get("example_output_prefix") or ""  # e.g. "\nA: ", after the options
    scores = ex.get("target_scores")
    if isinstance(scores, dict) and scores:
        options = [str(k) for k in scores]
        best = max(scores, key=lambda k: scores[k])
        text = question + "\n\nOptions:\n" + "\n".join(f"- {o}" for o in options) + answer_cue
        return text.strip(), str(best), options
    target = ex.get("target")
    if isinstance(target, list):
        target = target[0] if target else None
    if not isinstance(target, str) or not target.strip() or not question.strip():
        return None
    return (question + answer_cue).strip(), target, None


def bigbench_tasks(path: Path) -> Iterator[tuple[str, dict]]:
    """Stream (task name, task.json) from the sdist without extracting it (1.7 GB of JSON unpacked)."""
    with tarfile.open(path, "r|gz") as tf:
        for m in tf:
            if not m.name.endswith("/task.json") or _TASKS_DIR not in m.name:
                continue
            name = m.name.split(_TASKS_DIR, 1)[1].rsplit("/task.json", 1)[0]
            try:
                tj = json.load(tf.extractfile(m))
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
                raise MixtuneError(f"{path}: {m.name}: not valid JSON: {first_line(e)}") from None
            if not isinstance(tj, dict):
                raise MixtuneError(f"{path}: {m.name}: expected a JSON object")
            yield name, tj


def examples(src: BigbenchSource, root: Path, seed: int, recipes: dict | None) -> Iterator[dict]:
    path = root / src.path
    if not path.is_file():
        # PyPI no longer serves bigbench==1.0.0, so `mixtune fetch` cannot bring it (docs/study.md).
        raise MixtuneError(f"{src.path}: source '{src.name}': no such file (place a copy of the BIG-bench sdist "
                           "or of a BIG-bench repository tarball there: PyPI no longer serves bigbench==1.0.0)")
    parent_keywords: dict[str, list[str]] = {}
    pending: list[tuple[str, dict]] = []  # subtasks seen before their parent's keywords
    try:
        for name, tj in bigbench_tasks(path):
            parent_keywords.setdefault(name, tj.get("keywords") or [])
            if not tj.get("examples"):
                continue
            # Keep only the capped sample of each task in memory, never the whole archive.
            kept = src.sample(len(tj["examples"]), seed, name)
            pending.append((name, {**tj, "examples": [(i, tj["examples"][i]) for i in kept]}))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise MixtuneError(f"{src.path}: not a readable .tar.gz archive: {e}") from None
    for name, tj in pending:
        keywords = tj.get("keywords") or parent_keywords.get(name.split("/")[0], [])
        if not _selected(src, name, keywords):
            continue
        if recipes is not None:
            _, first = tj["examples"][0]
            scores = first.get("target_scores")
            recipes.setdefault(name, {"kind": "bigbench", **{k: tj.get(k) for k in _PREFIXES}, "example": {
                "input": str(first.get("input", "")), **({"options": list(scores)} if isinstance(scores, dict) else {})}})
        for i, ex in tj["examples"]:
            parsed = example(tj, ex)
            if parsed is None:
                continue
            text, completion, options = parsed
            yield make_example(id=f"{src.name}/{name}/{i}", source=src.name, task=name,
                               keywords=keywords, capability=src.capability or None,
                               prompt=[{"role": "user", "content": text}], completion=completion, options=options)

