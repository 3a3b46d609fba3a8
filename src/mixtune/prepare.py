"""prepare: every source -> the normalized schema; dedupe; decontaminate the generalist pool; split the specialist.

Outputs (under `prepared/`):
    specialist/train.jsonl, specialist/dev.jsonl, specialist/test.jsonl   seeded, stratified by task and label
    specialist/recipe.json        per task, how a raw record becomes its prompt: what the registered model takes
    generalist.jsonl                                                       the pool `mix` samples from
    generalist_probe.jsonl                   multiple-choice pool questions set aside: forgetting is measured on them
    stats.json                                                             what was read, dropped and why
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter, defaultdict
from pathlib import Path

from mixtune.config import PrepareConfig
from mixtune.files import atomic_dir, write_json, write_jsonl
from mixtune.schema import prompt_text
from mixtune.sources import read_source

_WORD = re.compile(r"\w+")


def _key(example: dict, with_completion: bool) -> bytes:
    text = prompt_text(example) + ("\x00" + example["completion"] if with_completion else "")
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def dedupe(examples: list[dict], *, with_completion: bool) -> tuple[list[dict], int]:
    """Drop exact duplicates, keeping the first. Specialist: same input (else a test input leaks into train)."""
    seen, kept = set(), []
    for ex in examples:
        k = _key(ex, with_completion)
        if k not in seen:
            seen.add(k)
            kept.append(ex)
    return kept, len(examples) - len(kept)


def ngrams(text: str, n: int) -> set[int]:
    words = _WORD.findall(text.lower())
    return {hash(tuple(words[i : i + n])) for i in range(len(words) - n + 1)}


def decontaminate(pool: list[dict], protected: list[dict], n: int) -> tuple[list[dict], int]:
    """Drop pool examples sharing any word n-gram with a protected (specialist dev/test) input."""
    banned: set[int] = set()
    for ex in protected:
        banned |= ngrams(prompt_text(ex), n)
    kept = [ex for ex in pool if ngrams(prompt_text(ex) + " " + ex["completion"], n).isdisjoint(banned)]
    return kept, len(pool) - len(kept)


def split(examples: list[dict], dev_fraction: float, test_fraction: float, seed: int) -> dict[str, list[dict]]:
    """Seeded split, stratified by task and (for classification) label, so every split has every class."""
    strata: dict[tuple, list[dict]] = defaultdict(list)
    for ex in examples:
        strata[(ex["task"], ex["completion"] if ex["options"] else "")].append(ex)
    out = {"train": [], "dev": [], "test": []}
    rng = random.Random(seed)
    for key in sorted(strata):
        group = strata[key]
        rng.shuffle(group)
        n_test, n_dev = round(len(group) * test_fraction), round(len(group) * dev_fraction)
        out["test"] += group[:n_test]
        out["dev"] += group[n_test : n_test + n_dev]
        out["train"] += group[n_test + n_dev :]
    for part in out.values():  # interleave strata so file order carries no label signal
        rng.shuffle(part)
    return out


def probe_questions(pool: list[dict], k: int, seed: int, max_options: int = 8, max_chars: int = 800) -> list[dict]:
    """k multiple-choice questions of the pool, seeded, short enough to score cheaply (fewer if it has fewer)."""
    fit = [ex for ex in pool if ex["options"] and len(ex["options"]) <= max_options
           and len(prompt_text(ex)) + sum(map(len, ex["options"])) <= max_chars]
    return random.Random(seed).sample(fit, min(k, len(fit)))


def run(cfg: PrepareConfig, root: Path = Path("."), out: Path = Path("prepared")) -> dict:
    stats: dict = {"specialist": {}, "generalist": {}}

    specialist: list[dict] = []
    recipes: dict[str, dict] = {}  # task -> how its prompt is built: the registered model's input (sources.prompter)
    for src in cfg.specialist:
        examples = read_source(src, root, cfg.seed, recipes)
        stats["specialist"][src.name] = {"read": len(examples)}
        specialist += examples
    specialist, stats["specialist_duplicates_removed"] = dedupe(specialist, with_completion=False)
    parts = split(specialist, cfg.dev_fraction, cfg.test_fraction, cfg.seed)
    target_tasks = {ex["task"] for ex in specialist}

    generalist: list[dict] = []
    for src in cfg.generalist:
        examples = read_source(src, root, cfg.seed)
        kept = [ex for ex in examples if ex["task"] not in target_tasks]  # the target is never in the pool
        short = [ex for ex in kept if len(prompt_text(ex)) + len(ex["completion"]) <= cfg.generalist_max_chars]
        stats["generalist"][src.name] = {"read": len(examples), "target_task_removed": len(examples) - len(kept),
                                         "too_long_removed": len(kept) - len(short)}
        kept = short
        generalist += kept
    generalist, stats["generalist_duplicates_removed"] = dedupe(generalist, with_completion=True)
    generalist, stats["decontaminated"] = decontaminate(generalist, parts["dev"] + parts["test"],
                                                        cfg.decontaminate_ngram)

    probe = probe_questions(generalist, cfg.generalist_probe, cfg.seed)
    held = {ex["id"] for ex in probe}
    generalist = [ex for ex in generalist if ex["id"] not in held]

    stats["splits"] = {name: len(part) for name, part in parts.items()}
    stats["generalist_probe"] = len(probe)
    stats["generalist_pool"] = len(generalist)
    stats["generalist_tasks"] = len({ex["task"] for ex in generalist})
    stats["specialist_tasks"] = dict(sorted(Counter(ex["task"] for ex in specialist).items()))

    # Everything is validated above; each output then appears whole or not at all.
    with atomic_dir(out / "specialist") as tmp:
        for name, part in parts.items():
            write_jsonl(tmp / f"{name}.jsonl", part)
        write_json(tmp / "recipe.json", {"tasks": recipes})
    write_jsonl(out / "generalist.jsonl", generalist)
    write_jsonl(out / "generalist_probe.jsonl", probe)
    write_json(out / "stats.json", stats)
    return stats
