"""What prepare does to example lists, as pure functions: exact dedupe, the seeded stratified split (a split the
data gives is kept), n-gram decontamination of the generalist pool against the specialist's examples, and the
multiple-choice probe questions set aside to measure forgetting."""

from __future__ import annotations

import hashlib
import random
import re
from collections import defaultdict

from mixtune.core.schema import prompt_text
from mixtune.core.sources import GIVEN

_WORD = re.compile(r"\w+")



def _key(example: dict, with_completion: bool) -> bytes:
    text = prompt_text(example) + ("\x00" + example["completion"] if with_completion else "")
    return hashlib.blake2b(text.encode(), digest_size=16).digest()



def dedupe(examples: list[dict], *, with_completion: bool, keep: int = 0) -> tuple[list[dict], int]:
    """Drop exact duplicates, keeping the first; the first `keep` examples are kept whatever they hold (a given
    dev/test split, as the data has it). Specialist: same input (else a test input leaks into train)."""
    seen, kept = set(), []
    for i, ex in enumerate(examples):
        k = _key(ex, with_completion)
        if k not in seen or i < keep:
            seen.add(k)
            kept.append(ex)
    return kept, len(examples) - len(kept)



def place(examples: list[dict], dev_fraction: float, test_fraction: float, seed: int) -> tuple[dict, int]:
    """The specialist examples into train/dev/test: a dev or test split the data gives is kept as it is, in
    its order; the rest is deduplicated (against the given splits too) and split (`split`), except for the
    splits its task is given. -> (the splits, duplicates removed)."""
    given = [ex for ex in examples if ex.get(GIVEN) in ("dev", "test")]
    rest = [ex for ex in examples if ex.get(GIVEN) not in ("dev", "test")]
    kept, removed = dedupe(given + rest, with_completion=False, keep=len(given))
    has = {(ex["task"], ex[GIVEN]) for ex in given}
    groups: dict[tuple[float, float], list[dict]] = defaultdict(list)
    for ex in kept[len(given):]:
        groups[(0.0 if (ex["task"], "dev") in has else dev_fraction,
                0.0 if (ex["task"], "test") in has else test_fraction)].append(ex)
    out = {"train": [], "dev": [ex for ex in given if ex[GIVEN] == "dev"],
           "test": [ex for ex in given if ex[GIVEN] == "test"]}
    for (dev, test), group in sorted(groups.items()):
        for name, part in split(group, dev, test, seed).items():
            out[name] += part
    return {name: [{k: v for k, v in ex.items() if k != GIVEN} for ex in part] for name, part in out.items()}, removed



def given_any(stats: dict, name: str) -> bool:
    return any(name in s.get("given_splits", {}) for s in stats["specialist"].values())



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
