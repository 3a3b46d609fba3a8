"""The search against an 11-point grid over the generalist share, on the default task (BBC News) and on
examples/trec: the same data, training, seeds and scoring, one run, one machine.

    grid    every share of 0, 0.1, ..., 0.9, each trained to the end (the search's own trial code, with a grid of
            10 over [0, 0.9] and no Gaussian-process trials)
    search  `mixtune search` as params.yaml sets it (its grid, then its Gaussian process, then its answer)

Every grid point and the search's recommended share are then scored on the TEST split (the search chooses on
dev alone). Target (issue 24): the recommended share's test score within the grid's noise of the grid's best test
score (the paired 95% interval of their difference reaches 0), at token_ratio = search_tokens / grid_tokens
<= 0.2, on both tasks. Both arms share the trial cache: a share both train (0 and 0.9 at the default) is trained
once and counted in each arm, as each would pay for it alone. The full-length benchmark also shares the repository's trial cache:
after `make run` the search arm trains nothing (its `seconds_this_run` is then the re-reading; make run's search
stage time is in bench_stages), and its tokens are still counted as the search paid them.

Each task runs in .cache/bench/search/<task>/ (its own prepared data, Optuna storage, answers cache and MLflow
store); an interrupted benchmark continues where it stopped (delete that folder to start over). `--smoke N`
trains every trial N steps and keeps 20 dev and 20 test examples: a run of the benchmark's code in minutes, not a
measurement (it writes nothing to bench/results).

    python bench/bench_search.py [--tasks bbc_news trec] [--smoke N]

Writes bench/results/search.json (a run of one task keeps the other's result) and a chart per task,
bench/results/search_<task>.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "search.json"
GRID = [round(0.1 * i, 1) for i in range(10)]  # 0, 0.1, ..., 0.9
MAX_TOKEN_RATIO = 0.2


SMOKE_EXAMPLES = 20


def workspace(task: str, max_steps: int | None) -> Path:
    """.cache/bench/search/<task>: params.yaml and prepared/ (the default's from `make run`; TREC's prepared here
    from examples/trec and the default generalist pool, as the README's "Bring your own task" does)."""
    ws = REPO / ".cache" / "bench" / "search" / (task + (f"-smoke{max_steps}" if max_steps else ""))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    if max_steps:
        params["train"]["max_steps"] = max_steps
    ws.mkdir(parents=True, exist_ok=True)
    # model.base as params.yaml says it, through a link, so a trial's cache key is the one `make run` computes; the
    # full-length benchmark shares the repository's trial cache (keyed by mix, config and code): a share make
    # run's search trained is not trained again. A smoke run keeps its short trials to itself.
    links = {"models": REPO / "models"}
    if not max_steps:
        links[".cache/adapters"] = REPO / ".cache" / "adapters"
        links[".cache/adapters"].mkdir(parents=True, exist_ok=True)
    for name, target in links.items():
        if not (ws / name).is_symlink():
            (ws / name).parent.mkdir(parents=True, exist_ok=True)
            (ws / name).symlink_to(target)
    if task == "trec":
        source = yaml.safe_load((REPO / "examples" / "trec" / "source.yaml").read_text())
        params["prepare"]["specialist"] = [source]
        (ws / "data" / "specialist" / "trec").mkdir(parents=True, exist_ok=True)
        for f in ("train.csv", "test.csv"):
            shutil.copy(REPO / "examples" / "trec" / f, ws / "data" / "specialist" / "trec" / f)
        if not (ws / "data" / "generalist").exists():
            (ws / "data" / "generalist").symlink_to(REPO / "data" / "generalist")
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if not (ws / "prepared" / "specialist" / "test.jsonl").is_file():
        if task == "trec":
            from mixtune.plumbing.config import load_section
            from mixtune.stages import prepare

            p = ws / "params.yaml"
            prepare.run(load_section("prepare", p), load_section("model", p),
                        load_section("train", p, keys=prepare.TRAIN_KEYS).max_length, ws, ws / "prepared")
        else:
            shutil.copytree(REPO / "prepared", ws / "prepared", dirs_exist_ok=True)
        if max_steps:
            for split in ("dev", "test"):
                path = ws / "prepared" / "specialist" / f"{split}.jsonl"
                path.write_text("".join(path.read_text().splitlines(keepends=True)[:SMOKE_EXAMPLES]))
    return ws


def arm(ws: Path, grid: bool) -> tuple[dict, list]:
    """One search in the workspace: -> (its answer, its completed trials, by share)."""
    import optuna

    from mixtune.core.search_answer import completed
    from mixtune.plumbing.config import load_section
    from mixtune.stages import search

    p = ws / "params.yaml"
    cfg = load_section("search", p)
    if grid:
        cfg = cfg.model_copy(update={"grid": len(GRID), "n_trials": len(GRID), "max_share": GRID[-1]})
    best = search.run(cfg, load_section("mix", p, keys=search.MIX_KEYS), load_section("train", p),
                      load_section("model", p), load_section("evaluate", p, keys=search.SCORE_KEYS),
                      prepared=ws / "prepared", out=ws / ("grid" if grid else "search"))
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(ws / "search" / "optuna.journal")))
    return best, completed(optuna.load_study(study_name=best["search"], storage=storage))


def test_scores(ws: Path, adapters: dict[str, Path], metric: str) -> dict:
    """Every adapter's answers on the test split (evaluate's cached answers), compared pairwise: -> score.compare's
    result, with the gain of each system over every other."""
    from mixtune.core import score
    from mixtune.core.model import adapter_file, load_adapter, load_base, load_tokenizer, resolve_base
    from mixtune.plumbing.config import load_section
    from mixtune.plumbing.files import read_jsonl, sha256_file
    from mixtune.stages import evaluate

    p = ws / "params.yaml"
    eval_cfg, model_cfg = load_section("evaluate", p), load_section("model", p)
    base = resolve_base(model_cfg.base)
    tokenizer = load_tokenizer(base)
    test = read_jsonl(ws / "prepared" / "specialist" / "test.jsonl")
    preds = {}
    for name, path in adapters.items():
        model_id = {"base": model_cfg.model_dump(), "adapter": sha256_file(adapter_file(path)),
                    "config": sha256_file(path / "adapter_config.json")}
        got, _ = evaluate.answers(model_id, lambda p=path: load_adapter(load_base(base), p), tokenizer,
                                  {"test": test}, eval_cfg)
        preds[name] = got["test"]
    names = list(adapters)
    gains = [(a, b) for a in names for b in names if a != b]
    return score.compare(score.Scorer(test, metric), preds, eval_cfg.bootstrap, eval_cfg.seed, gains=gains)


def run_task(task: str, max_steps: int | None) -> dict:
    ws = workspace(task, max_steps)
    cwd = os.getcwd()
    os.chdir(ws)  # the trial cache and the answers cache are the workspace's
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{ws / 'mlruns.db'}"
    try:
        t = time.perf_counter()
        found, found_trials = arm(ws, grid=False)
        search_seconds = time.perf_counter() - t
        grid, grid_trials = arm(ws, grid=True)
        metric = grid["metric"]
        adapters = {f"grid {t.params['generalist_share']:.2f}": Path(t.user_attrs["adapter"]) for t in grid_trials}
        rec = next(t for t in found_trials if t.number == found["recommended_trial"])
        adapters["search"] = Path(rec.user_attrs["adapter"])
        cmp = test_scores(ws, adapters, metric)
    finally:
        os.chdir(cwd)
    points = []
    for t in grid_trials:
        name = f"grid {t.params['generalist_share']:.2f}"
        a = t.user_attrs
        points.append({"share": t.params["generalist_share"], "dev": a["dev_metric"], "dev_low": a["dev_low"],
                       "dev_high": a["dev_high"], "test": cmp[name]["value"], "test_low": cmp[name]["low"],
                       "test_high": cmp[name]["high"], "trained_tokens": a["trained_tokens"]})
    best_point = max(points, key=lambda q: (q["test"], -q["share"]))
    gap = cmp[f"search-grid {best_point['share']:.2f}"]  # the recommended share against the grid's best, paired
    grid_tokens = sum(q["trained_tokens"] for q in points)
    search_tokens = found["trained_tokens_total"]
    within = gap["high"] >= 0
    return {"task": task, "metric": metric, "grid": points, "grid_best_share": best_point["share"],
            "grid_best_test": best_point["test"],
            "search": {"shares": [c["share"] for c in found["curve"]],
                       "dev": [c["dev"] for c in found["curve"]], "recommended_share": found["recommended_share"],
                       "near_optimal": found["near_optimal"], "test": cmp["search"]["value"],
                       "test_low": cmp["search"]["low"], "test_high": cmp["search"]["high"],
                       "answer": found["answer"], "seconds_this_run": search_seconds},
            "test_gap": {k: gap[k] for k in ("value", "low", "high")},
            "grid_tokens": grid_tokens, "search_tokens": search_tokens, "token_ratio": search_tokens / grid_tokens,
            "within_noise": within, "met": within and search_tokens / grid_tokens <= MAX_TOKEN_RATIO}


def draw(t: dict, path: Path) -> None:
    """The grid's dev and test curves with their 95% intervals, the search's near-optimal range shaded and its
    recommended share's test score marked: the README's picture of whether the search answered right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g, se = t["grid"], t["search"]
    x = [q["share"] for q in g]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.axvspan(min(se["near_optimal"]) - 0.005, max(se["near_optimal"]) + 0.005, color="tab:green", alpha=0.15,
               label="search: near-optimal range (dev)")
    for split, colour in (("dev", "tab:blue"), ("test", "tab:orange")):
        ax.fill_between(x, [q[f"{split}_low"] for q in g], [q[f"{split}_high"] for q in g], color=colour, alpha=0.15)
        ax.plot(x, [q[split] for q in g], "o-", color=colour, label=f"grid: {split} {t['metric']} (95% interval)")
    if se.get("dev"):
        ax.plot(se["shares"], se["dev"], "s", mfc="none", color="tab:purple", ms=9, label="search's trials: dev")
    ax.errorbar([se["recommended_share"]], [se["test"]], yerr=[[se["test"] - se["test_low"]],
                [se["test_high"] - se["test"]]], fmt="*", ms=14, color="tab:red", capsize=4,
                label=f"search's pick r={se['recommended_share']:.2f}: test")
    ax.set_xlabel("generalist share of the training set")
    ax.set_ylabel(t["metric"])
    ax.set_title(f"{t['task']}: the search against an 11-point grid")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", nargs="+", default=["bbc_news", "trec"], choices=["bbc_news", "trec"])
    ap.add_argument("--smoke", type=int, default=None, metavar="STEPS",
                    help="a smoke run: every trial this many steps, 20 dev and 20 test examples")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    from mixtune.plumbing.files import write_json

    tasks = {}
    for task in args.tasks:
        tasks[task] = run_task(task, args.smoke) | {"when": datetime.now(UTC).isoformat(timespec="seconds")}
    for name, t in tasks.items():
        print(f"{name}: grid best test {t['metric']} {t['grid_best_test']:.3f} at r={t['grid_best_share']:.1f}; "
              f"search recommends r={t['search']['recommended_share']:.2f}: test {t['search']['test']:.3f}, "
              f"{t['test_gap']['value']:+.3f} [{t['test_gap']['low']:+.3f}, {t['test_gap']['high']:+.3f}] against "
              f"it; tokens {t['search_tokens']:,} of the grid's {t['grid_tokens']:,} ({t['token_ratio']:.2f})")
    if args.smoke:
        print("(a smoke run: nothing written to bench/results)")
        return
    # One task at a time is ~1.5 h here: a run keeps the other task's result (each says when it was measured).
    old = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    tasks = old.get("tasks", {}) | tasks
    result = {"when": datetime.now(UTC).isoformat(timespec="seconds"), "tasks": tasks,
              "target": {"max_token_ratio": MAX_TOKEN_RATIO, "test_gap_interval_reaches": 0.0},
              "met": all(tasks.get(k, {}).get("met", False) for k in ("bbc_news", "trec"))}
    write_json(RESULTS, result)
    for name, t in tasks.items():
        draw(t, RESULTS.parent / f"search_{name}.png")


if __name__ == "__main__":
    main()
