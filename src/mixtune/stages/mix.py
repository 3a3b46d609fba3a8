"""mix: the training set from `specialist_size` specialist examples plus a generalist share.

generalist_share r is the fraction of the FINAL training set drawn from the generalist pool:
    n_g = round(n_s * r / (1 - r))        e.g. n_s = 300, r = 0.25 -> n_g = 100 (400 in all)
Both sources are sampled without replacement with one seeded generator; asking for more than a source holds
is an error, never silent oversampling. Lines are copied as bytes, so mixing a million examples is I/O bound.

corrupt_generalist c replaces the answer of exactly round(c * m) of the m drawn generalist examples that have a
wrong answer to take: another of its options (multiple choice), else another answer of the same task in the pool
(m is n_g but for the rare task whose every answer is the same). The study uses it to put hallucinated
generalist data under control (the paper's claim 3).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from mixtune.plumbing import entry
from mixtune.plumbing.config import MixConfig
from mixtune.plumbing.errors import MixtuneError
from mixtune.plumbing.files import atomic_dir, dumps, write_json


def generalist_count(specialist_size: int, share: float) -> int:
    return round(specialist_size * share / (1 - share))


def _lines(path: Path) -> list[bytes]:
    if not path.is_file():
        raise MixtuneError(f"{path}: no such file (run the prepare stage first)")
    with open(path, "rb") as f:
        return [line for line in f if line.strip()]


def _sample(lines: list[bytes], k: int, rng: np.random.Generator, what: str, path: Path) -> list[bytes]:
    if k > len(lines):
        raise MixtuneError(f"{path}: {what}: needs {k} examples but holds only {len(lines)}")
    idx = rng.choice(len(lines), size=k, replace=False) if k else []
    return [lines[i] for i in idx]


def _corrupt(drawn: list[bytes], pool: list[bytes], rate: float, rng: np.random.Generator, path: Path) -> int:
    """Give round(rate * m) of the m drawn examples that can have one a wrong answer, in place; -> how many."""
    answers: dict[str, set[str]] = {}
    for line in pool:
        ex = json.loads(line)
        answers.setdefault(ex["task"], set()).add(ex["completion"])
    examples = [json.loads(line) for line in drawn]

    def wrong(ex: dict) -> list[str]:
        return sorted(set(ex["options"] or answers[ex["task"]]) - {ex["completion"]})

    possible = [i for i, ex in enumerate(examples) if wrong(ex)]
    if not possible:
        raise MixtuneError(f"{path}: mix.corrupt_generalist={rate}: none of the {len(examples)} drawn generalist "
                           "examples has another answer in its task to put in its place")
    k = round(rate * len(possible))
    for i in sorted(rng.choice(possible, size=k, replace=False).tolist()) if k else []:
        choices = wrong(examples[i])
        examples[i]["completion"] = choices[int(rng.integers(len(choices)))]
        drawn[i] = (dumps(examples[i]) + "\n").encode()
    return k


def recommended_share(specialist_size: int, search: Path = Path("search")) -> float:
    """`generalist_share: auto`: the share the search recommends (search/best.json) for this specialist size."""
    path = search / "best.json"
    if not path.is_file():
        raise MixtuneError(f"{path}: no such file (mix.generalist_share: auto takes the search's answer: "
                           "run the search stage first, or set a number)")
    best = json.loads(path.read_text())
    if best["size"] != specialist_size:
        raise MixtuneError(f"{path}: the search recommends a share for {best['size']} specialist examples, not "
                           f"mix.specialist_size={specialist_size}")
    return float(best["recommended_share"])


def run(cfg: MixConfig, prepared: Path = Path("prepared"), out: Path = Path("mix"),
        search: Path = Path("search")) -> dict:
    rng = np.random.default_rng(cfg.seed)
    spec_path, gen_path = prepared / "specialist" / "train.jsonl", prepared / "generalist.jsonl"
    auto = cfg.generalist_share == "auto"
    share = recommended_share(cfg.specialist_size, search) if auto else cfg.generalist_share
    n_g = generalist_count(cfg.specialist_size, share)
    specialist = _sample(_lines(spec_path), cfg.specialist_size, rng, "mix.specialist_size", spec_path)
    pool = _lines(gen_path) if n_g else []
    generalist = _sample(pool, n_g, rng, f"mix.generalist_share={share:g}", gen_path) if n_g else []
    corrupted = _corrupt(generalist, pool, cfg.corrupt_generalist, rng, gen_path) \
        if cfg.corrupt_generalist and generalist else 0
    mixed = specialist + generalist
    mixed = [mixed[i] for i in rng.permutation(len(mixed))]

    by_source, by_task, specialist_tasks = Counter(), Counter(), set()
    for is_specialist, lines in ((True, specialist), (False, generalist)):
        for line in lines:
            ex = json.loads(line)
            by_source[ex["source"]] += 1
            by_task[ex["task"]] += 1
            if is_specialist:
                specialist_tasks.add(ex["task"])
    data = b"".join(mixed)
    manifest = {
        "specialist_size": cfg.specialist_size,
        "generalist_share": share,
        "share_source": "auto" if auto else "manual",  # auto: the search's recommendation
        "generalist_size": n_g,
        "corrupt_generalist": cfg.corrupt_generalist,
        "corrupted": corrupted,
        "total": len(mixed),
        "seed": cfg.seed,
        "specialist_tasks": sorted(specialist_tasks),
        "sha256": hashlib.sha256(data).hexdigest(),
        "by_source": dict(sorted(by_source.items())),
        "by_task": dict(sorted(by_task.items())),
    }
    with atomic_dir(out) as tmp:
        (tmp / "train.jsonl").write_bytes(data)
        write_json(tmp / "manifest.json", manifest)
    return manifest


# --- the stage's command (`python -m mixtune.stages.mix`, `mixtune mix`) -------------------------------------------


def command(args) -> None:
    from mixtune.plumbing.config import load_section

    m = run(load_section("mix", args.params), Path(args.prepared), Path(args.out))
    print(f"mix: {m['total']} examples ({m['specialist_size']} specialist + {m['generalist_size']} generalist, "
          f"share {m['generalist_share']:.2f} {'from the search' if m['share_source'] == 'auto' else 'set by hand'}), "
          f"sha256 {m['sha256'][:12]}")


def parser():
    p = entry.parser("mixtune mix", "sample the training set at mix.generalist_share")
    p.add_argument("--prepared", default="prepared")
    p.add_argument("--out", default="mix")
    return p


if __name__ == "__main__":
    sys.exit(entry.main(parser(), command))
