"""study: the paper's experiments ("Specialist or Generalist?", EMNLP 2023) on the offline testbed.

Four DVC stages in study/dvc.yaml, over the axes of study/params.yaml:
    study-prepare@<target>         the target's splits, and the generalist pool without the target, its near
                                   relatives (by name) and, to vary coverage, tasks with given keywords
    study-screen@<target>          does the model learn the target at all? The pure specialist at the largest
                                   size against the base model on dev: kept only beyond the interval
    study-run@<target>-<size>      every cell of a kept target and size: seeds x shares (x corruption rates):
                                   mix -> train -> score on the dev and test subsets; plus the base model
    study-report                   reports/study.md with plots and tables (mixtune.study_report)

A cell (mixtune.stages.study_cell) is kept in .cache/study/cells/<key>.json as soon as it is measured (the key hashes
everything that determines it), so an interrupted stage resumes at the first missing cell and nothing measured is lost.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mixtune.core import metrics as M
from mixtune.plumbing import entry
from mixtune.plumbing.errors import MixtuneError
from mixtune.plumbing.files import read_jsonl, write_json
from mixtune.plumbing.study_config import StudyConfig
from mixtune.plumbing.tracking import repo_root, stage_run
from mixtune.stages.study_cell import Cells, cell_name

# Keywords that say how a BIG-bench task is posed, not which skill it needs: they do not count for coverage.
FORMAT_KEYWORDS = {"multiple choice", "zero-shot", "one-shot", "many-shot", "json", "example task",
                   "numerical response", "free response", "non-english", "multilingual", "low-resource language"}


# The keys of study/params.yaml's `study` section each stage reads (study/dvc.yaml declares the same).
PREPARE_KEYS = ("prepare", "targets", "model", "train")  # examples are measured in the model's tokens
SCREEN_KEYS = ("preset", "model", "train", "evaluate", "targets", "sizes", "seeds", "dev_examples", "test_examples")
RUN_KEYS = ("preset", "model", "train", "evaluate", "targets", "sizes", "shares", "fixed_share", "seeds",
            "dev_examples", "test_examples", "corrupt_generalist", "corrupt_targets")


def screen_path(target: str) -> Path:
    return Path("study") / "screen" / f"{target}.json"


def prepared_dir(target: str) -> Path:
    return Path("study") / "prepared" / target


def results_path(target: str, size: int) -> Path:
    return Path("study") / "results" / f"{target}-n{size}.json"


# --- prepare ------------------------------------------------------------------------------------------------


def skills(keywords) -> set[str]:
    return {k.lower() for k in keywords} - FORMAT_KEYWORDS


def coverage(target_keywords: set[str], pool: list[dict]) -> dict:
    """How much of the pool exercises the target's skills: the share of pool examples (and the number of pool
    tasks) with at least one of the target's skill keywords."""
    hits = [ex for ex in pool if skills(ex["keywords"] or []) & target_keywords]
    return {"keywords": sorted(target_keywords), "examples": len(hits), "pool": len(pool),
            "coverage": len(hits) / len(pool) if pool else 0.0, "tasks": len({ex["task"] for ex in hits}),
            "pool_tasks": len({ex["task"] for ex in pool})}


def prepare_target(cfg: StudyConfig, name: str, root: Path = Path("."), out: Path | None = None) -> dict:
    from mixtune.stages import prepare

    target = _target(cfg, name)
    out = out or prepared_dir(name)
    held = [*(target.source.tasks if target.source.kind == "bigbench" else []), *target.hold_out]
    dropped = skills(target.pool_exclude_keywords)
    # A BIG-bench pool filters per task; a file or hub source is one task: kept or dropped whole.
    pool_sources = [s.model_copy(update={"exclude_tasks": [*s.exclude_tasks, *held],
                                         "exclude_keywords": [*s.exclude_keywords, *target.pool_exclude_keywords]})
                    if s.kind == "bigbench" else s for s in cfg.prepare.generalist
                    if s.kind == "bigbench" or not (s.task_name in held or skills(s.keywords) & dropped)]
    pcfg = cfg.prepare.model_copy(update={"specialist": [target.source], "generalist": pool_sources})
    stats = prepare.run(pcfg, cfg.model, cfg.train.max_length, root, out)
    train = read_jsonl(out / "specialist" / "train.jsonl")
    keywords = skills({k for ex in train for k in ex["keywords"] or []} | set(target.source.keywords))
    cov = coverage(keywords, read_jsonl(out / "generalist.jsonl"))
    stats["coverage"] = {**cov, "capability": target.capability, "held_out": held,
                         "pool_exclude_keywords": target.pool_exclude_keywords}
    write_json(out / "stats.json", stats)
    return stats


def _target(cfg: StudyConfig, name: str):
    if name not in cfg.targets:
        raise MixtuneError(f"study: unknown target {name!r} (targets: {', '.join(cfg.targets)})")
    return cfg.targets[name]


# --- cells --------------------------------------------------------------------------------------------------


def cells(cfg, target: str, size: int) -> list[dict]:
    """Every cell of one target and size, in the order they run: seed by seed, shares ascending, then the
    corruption rates (at the fixed share, for the corrupt_targets: at every size, since the paper's claim is
    about the amount of task data too)."""
    out = []
    for seed in cfg.seeds:
        out += [{"seed": seed, "share": share, "corrupt": 0.0} for share in sorted(cfg.shares)]
        if target in cfg.corrupt_targets:
            out += [{"seed": seed, "share": cfg.fixed_share, "corrupt": c} for c in cfg.corrupt_generalist]
    return out


def screen_cells(cfg: StudyConfig) -> list[dict]:
    """The base model and the pure specialist at the largest size and the first seed: the same cells study-run
    measures (the same cache keys), so screening costs nothing a kept target would not pay anyway."""
    return [{"base": True}, {"seed": cfg.seeds[0], "share": 0.0, "corrupt": 0.0, "size": max(cfg.sizes)}]


def screen_target(cfg: StudyConfig, target: str, prepared: Path | None = None, out: Path | None = None) -> dict:
    """Keep a target only if the model learns it: the pure specialist at the largest size beats the base model
    on the dev subset beyond the 95% interval of their paired difference (bootstrap over dev examples). Dev, not
    test: the test split is what the claims are measured on, and choosing targets by it would bias them. A
    target the model does not learn makes every comparison a floor effect that can speak for no claim."""
    _target(cfg, target)
    prepared = prepared or prepared_dir(target)
    if not (prepared / "generalist.jsonl").is_file():
        raise MixtuneError(f"{prepared}: not prepared (run `mixtune study prepare --target {target}`)")
    runner = Cells(cfg, target, prepared)
    cache = repo_root() / ".cache" / "study" / "cells"
    cache.mkdir(parents=True, exist_ok=True)
    tags = {"mixtune.target": target, "mixtune.study.preset": cfg.preset}
    with stage_run(f"study screen {target}", ["study"], {"target": target, "size": max(cfg.sizes)}, tags):
        base, tuned = (runner.run(cell, cache) for cell in screen_cells(cfg))
    diff = M.from_bits(tuned["dev"]["correct"]) - M.from_bits(base["dev"]["correct"])
    resamples = M.resample_means(diff[None, None, :], cfg.evaluate.bootstrap, seed=0)[:, 0]
    low, high = M.interval(resamples)
    gain = float(diff.mean())
    kept = low > 0
    doc = {"target": target, "size": max(cfg.sizes), "seed": cfg.seeds[0], "dev_examples": len(diff),
           "base": base["dev"]["score"], "specialist": tuned["dev"]["score"],
           "gain": {"value": gain, "low": low, "high": high}, "kept": kept,
           "why": (f"the pure specialist beats the base model on dev by {gain:+.3f} [{low:+.3f}, {high:+.3f}]"
                   if kept else f"the pure specialist's dev gain over the base model, {gain:+.3f} [{low:+.3f}, "
                   f"{high:+.3f}], holds 0: the model does not measurably learn it at this size")}
    write_json(out or screen_path(target), doc)
    return doc


def run_target(cfg: StudyConfig, target: str, size: int, prepared: Path | None = None,
               out: Path | None = None, screen: Path | None = None) -> dict:
    """All cells of one target at one size (the base model once per target), into study/results/; a target
    its screen dropped gets a result with no cells and the reason."""
    _target(cfg, target)
    if size not in cfg.sizes:
        raise MixtuneError(f"study: size {size} is not one of study.sizes {cfg.sizes}")
    prepared = prepared or prepared_dir(target)
    if not (prepared / "generalist.jsonl").is_file():
        raise MixtuneError(f"{prepared}: not prepared (run `mixtune study prepare --target {target}`)")
    out = out or results_path(target, size)
    screened = screen or screen_path(target)
    if not screened.is_file():
        raise MixtuneError(f"{screened}: no such file (run `mixtune study screen --target {target}` first)")
    verdict = json.loads(screened.read_text())
    if not verdict["kept"]:  # nothing to run: the report lists the target with its screen result
        doc = {"target": target, "size": size, "run_id": None, "dropped": verdict["why"], "cells": []}
        write_json(out, doc)
        return doc
    runner = Cells(cfg, target, prepared)
    cache = repo_root() / ".cache" / "study" / "cells"
    cache.mkdir(parents=True, exist_ok=True)
    todo = [{"base": True}] + [{**c, "size": size} for c in cells(cfg, target, size)]
    results = []
    tags = {"mixtune.target": target, "mixtune.study.preset": cfg.preset}
    with stage_run(f"study {target} n={size}", ["study"], {"target": target, "size": size,
                                                          **cfg.model_dump(include={"seeds", "shares"})},
                   tags) as run:
        for i, cell in enumerate(todo, 1):
            r = runner.run(cell, cache)
            results.append(r)
            how = "cached" if r["cached"] else f"{r['seconds']:.0f} s"
            print(f"study {target} {cell_name(cell)} [{i}/{len(todo)}]: dev {r['dev']['score']:.3f} "
                  f"test {r['test']['score']:.3f} ({how})", flush=True)
        run_id = run.info.run_id if run else None
    doc = {"target": target, "size": size, "run_id": run_id, "dev_examples": len(runner.dev),
           "test_examples": len(runner.test), "cells": [{k: v for k, v in r.items() if k != "cached"}
                                                        for r in results]}
    write_json(out, doc)
    return doc


# --- the stage's command (`python -m mixtune.stages.study`, `mixtune study prepare|screen|run`) --------------------


def _prepare(args) -> None:
    from mixtune.plumbing.config import load_section

    cfg = load_section("study", args.study_params, keys=PREPARE_KEYS)
    for target in [args.target] if args.target else list(cfg.targets):
        stats = prepare_target(cfg, target)
        c = stats["coverage"]
        print(f"study prepare {target}: splits {stats['splits']}, pool {stats['generalist_pool']}, "
              f"coverage {c['coverage']:.3f} ({c['tasks']} of {c['pool_tasks']} pool tasks)")


def _screen(args) -> None:
    from mixtune.plumbing.config import load_section

    if not args.target:
        raise MixtuneError("study screen: needs --target (one stage of study/dvc.yaml's matrix)")
    doc = screen_target(load_section("study", args.study_params, keys=SCREEN_KEYS), args.target)
    print(f"study screen {args.target}: {'kept' if doc['kept'] else 'dropped'}: {doc['why']}")


def _run(args) -> None:
    from mixtune.plumbing.config import load_section

    if not args.target or not args.size:
        raise MixtuneError("study run: needs --target and --size (one stage of study/dvc.yaml's matrix)")
    doc = run_target(load_section("study", args.study_params, keys=RUN_KEYS), args.target, args.size)
    if doc.get("dropped"):
        print(f"study run {args.target} n={args.size}: dropped by its screen, nothing to run")
        return
    print(f"study run {args.target} n={args.size}: {len(doc['cells'])} cells in {results_path(args.target, args.size)}")


def command(args) -> None:
    args.func(args)


def parser():
    p = entry.parser("mixtune study", "the paper's experiments, as study/dvc.yaml runs them: prepare, screen and "
                     "run here; `mixtune study report` writes reports/study.md (mixtune.stages.study_report)",
                     params=False)
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, func, help_ in (("prepare", _prepare, "a target's splits and generalist pool"),
                                ("screen", _screen, "keep a target only if the model learns it"),
                                ("run", _run, "every cell of one target and size")):
        a = actions.add_parser(action, help=help_)
        a.add_argument("--target", help="a key of study.targets (prepare: default all)")
        a.add_argument("--size", type=int, help="a value of study.sizes (run)")
        a.add_argument("--study-params", default="study/params.yaml", help="default: study/params.yaml")
        a.set_defaults(func=func)
    return p


if __name__ == "__main__":
    sys.exit(entry.main(parser(), command))
