"""evaluate: on the test split, the final adapter (train) against the base model and the pure specialist (the
search's share-0 trial adapter, not retrained), by the task's own metric (score.py) with 95% intervals, the
gains paired; and each adapter's forgetting: its accuracy on the held-out generalist probe against the base
model's.

Outputs: eval/metrics.json (numbers: DVC metrics), eval/details.json (what was measured), eval/predictions.jsonl
(every system's answer per example; register reads it), eval/confusion.csv (DVC plot). Run ids and timings go
to MLflow only, so a re-run that measures the same changes no tracked file: the evaluate run carries the
sha256 of the predictions it wrote and of the adapter it scored, and the train run's id.

Answers are cached in .cache/answers/<key>, the key naming the model (the base model's config, an adapter's
sha256), the examples, the scoring settings and the scoring code: the base model's and the pure specialist's
answers, which no share changes, are computed once, not in every `dvc exp run`.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from mixtune.core import score
from mixtune.core.model import (
    adapter_file,
    load_adapter,
    load_base,
    load_tokenizer,
    require_adapter,
    resolve_base,
)
from mixtune.plumbing import entry, lineage
from mixtune.plumbing.config import EvaluateConfig, ModelConfig
from mixtune.plumbing.errors import MixtuneError
from mixtune.plumbing.files import atomic_file, dumps, read_jsonl, sha256_file, write_json, write_jsonl
from mixtune.plumbing.tracking import (
    ADAPTER_TAG,
    PREDICTIONS_TAG,
    Timer,
    find_run,
    log_dataset,
    mix_label,
    repo_root,
    stage_run,
)

SYSTEMS = ("tuned", "base", "specialist")


def _read(path: Path, stage: str) -> dict:
    if not path.is_file():
        raise MixtuneError(f"{path}: no such file (run the {stage} stage first)")
    return json.loads(path.read_text())


def _answer_key(model: dict, examples: list[dict], cfg) -> str:
    blob = json.dumps({"model": model, "examples": hashlib.sha256("\n".join(map(dumps, examples)).encode()).hexdigest(),
                       "score": {k: getattr(cfg, k) for k in ("batch_size", "max_new_tokens")},
                       "code": lineage.fingerprint(["mixtune.core.score", "mixtune.core.model"])[:16]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def answers(model_id: dict, load, tokenizer, sets: dict[str, list[dict]], cfg) -> tuple[dict[str, list[str]], float | None]:
    """Each set's answers by the model `load()` gives, from the cache when this model, these examples, these
    settings and this code answered them before; -> (answers per set, seconds per example of the first set,
    None when cached)."""
    paths = {name: repo_root() / ".cache" / "answers" / f"{_answer_key(model_id, ex, cfg)}.json"
             for name, ex in sets.items()}
    if all(p.is_file() for p in paths.values()):
        return {name: json.loads(p.read_text()) for name, p in paths.items()}, None
    model, out, per_example = load(), {}, None
    for name, examples in sets.items():
        t = time.perf_counter()
        out[name] = score.predict(model, tokenizer, examples, cfg)
        per_example = per_example or (time.perf_counter() - t) / max(len(examples), 1)
        with atomic_file(paths[name]) as f:
            json.dump(out[name], f)
    return out, per_example


def numbers(cmp: dict, probe: dict | None, share: float) -> dict:
    """eval/metrics.json: the test comparison and the forgetting, numbers only (`dvc exp show` fits a terminal)."""
    metric = cmp["metric"]
    out = {"n": cmp["n"], "share": share,
           metric: {**{s: {k: cmp[s][k] for k in ("value", "low", "high")} for s in SYSTEMS},
                    "gain": cmp["tuned-base"], "gain_vs_specialist": cmp["tuned-specialist"]}}
    if len(cmp["tasks"]) > 1:  # a scenario: every task's own score too
        out["per_task"] = {t: {s: cmp[s]["per_task"].get(t) for s in SYSTEMS} for t in cmp["tasks"]}
    if probe:
        out["forgetting"] = {"probe_n": probe["n"], "base_accuracy": probe["base"]["value"],
                             **{s: probe[f"base-{s}"] for s in ("tuned", "specialist")}}
    return out


def run(cfg: EvaluateConfig, model_cfg: ModelConfig, metric: str, prepared: Path = Path("prepared"),
        mix: Path = Path("mix"), train: Path = Path("train"), search: Path = Path("search"),
        out: Path = Path("eval")) -> dict:
    """`metric`: search.metric (`auto` or a name), the one the search chose the share by."""
    split_path = prepared / "specialist" / f"{cfg.split}.jsonl"
    if not split_path.is_file():
        raise MixtuneError(f"{split_path}: no such file (run the prepare stage first)")
    examples = read_jsonl(split_path)[: cfg.max_examples]
    if not examples:
        raise MixtuneError(f"{split_path}: no examples to evaluate")
    probe = read_jsonl(prepared / "generalist_probe.jsonl")
    manifest = _read(mix / "manifest.json", "mix")
    base_path = resolve_base(model_cfg.base)
    adapters = {"tuned": train / "adapter", "specialist": search / "specialist_adapter"}
    for path in adapters.values():  # before a run is opened and the base model loaded
        require_adapter(path)
    metric = score.metric_name(metric, examples)
    timer = Timer()
    adapter_sha = sha256_file(adapter_file(train / "adapter"))
    tags = {"mixtune.mix_sha256": manifest["sha256"], ADAPTER_TAG: adapter_sha,
            "mixtune.split": cfg.split, "mixtune.metric": metric}
    params = {"evaluate": cfg.model_dump(), "model": model_cfg.model_dump(), "metric": metric,
              "mix": {k: manifest[k] for k in ("specialist_size", "generalist_share", "generalist_size", "seed",
                                               "share_source")}}

    with stage_run("evaluate", manifest["specialist_tasks"], params, tags, timer, label=mix_label(manifest)):
        t0 = time.perf_counter()
        import mlflow

        with timer():
            trained = find_run(manifest["specialist_tasks"], "train", {ADAPTER_TAG: adapter_sha})
            mlflow.set_tag("mixtune.train_run_id", trained or "")
        tokenizer = load_tokenizer(base_path)
        preds, probe_preds, seconds = {}, {}, {}
        for system in SYSTEMS:  # a fresh base for each: PEFT injects an adapter into the model it is given
            path = adapters.get(system)
            model_id = {"base": model_cfg.model_dump()} | (
                {"adapter": sha256_file(adapter_file(path)), "config": sha256_file(path / "adapter_config.json")}
                if path else {})
            got, seconds[system] = answers(
                model_id, lambda p=path: load_adapter(load_base(base_path), p) if p else load_base(base_path),
                tokenizer, {"examples": examples, "probe": probe}, cfg)
            preds[system], probe_preds[system] = got["examples"], got["probe"]
            print(f"evaluate: {system}: " + ("answers computed" if seconds[system] is not None else
                                             "answers from the cache (same model, examples, settings and code)"))

        cmp = score.compare(score.Scorer(examples, metric), preds, cfg.bootstrap, cfg.seed,
                            gains=(("tuned", "base"), ("tuned", "specialist")))
        forgetting = score.compare(score.probe_scorer(probe), probe_preds, cfg.bootstrap, cfg.seed,
                                   gains=(("base", "tuned"), ("base", "specialist"))) if probe else None
        result = numbers(cmp, forgetting, manifest["generalist_share"])
        rows = [{"id": ex["id"], "task": ex["task"], "gold": ex["completion"],
                 **{s: preds[s][i] for s in SYSTEMS}} for i, ex in enumerate(examples)]
        write_jsonl(out / "predictions.jsonl", rows)
        if score.task_kind(examples) != "generation":
            with atomic_file(out / "confusion.csv") as f:
                f.write("actual,predicted\n")
                f.writelines(f"{r['gold']},{r['tuned']}\n" for r in rows)
        details = {"metric": metric, "split": cfg.split, "tasks": cmp["tasks"], "share_source": manifest["share_source"],
                   "specialist_size": manifest["specialist_size"]}
        with timer():
            mlflow.set_tag(PREDICTIONS_TAG, sha256_file(out / "predictions.jsonl"))
            flat = {f"test.{s}.{metric}": cmp[s]["value"] for s in SYSTEMS}
            flat |= {f"test.{s}.{metric}_{k}": cmp[s][k] for s in SYSTEMS for k in ("low", "high")}
            flat |= {f"test.gain.{metric}": cmp["tuned-base"]["value"],
                     f"test.gain_vs_specialist.{metric}": cmp["tuned-specialist"]["value"]}
            flat |= {f"test.{s}.{metric}.{t}": v for s in SYSTEMS for t, v in cmp[s]["per_task"].items()}
            if forgetting:
                flat |= {f"forgetting.{s}": forgetting[f"base-{s}"]["value"] for s in ("tuned", "specialist")}
            mlflow.log_metrics(flat | ({"seconds_per_example": seconds["tuned"]} if seconds["tuned"] else {}))
            mlflow.set_tag("mixtune.answers_cached", ",".join(s for s in SYSTEMS if seconds[s] is None))
            t, g = cmp["tuned"], cmp["tuned-base"]
            mlflow.set_tag("mlflow.note.content", f"test {metric} {t['value']:.3f} [{t['low']:.3f}, {t['high']:.3f}], "
                                                  f"{g['value']:+.3f} [{g['low']:+.3f}, {g['high']:+.3f}] over the base model")
            mlflow.log_artifact(str(out / "predictions.jsonl"))
            if (out / "confusion.csv").is_file():
                mlflow.log_figure(_confusion_figure(rows), "confusion_matrix.png")
            log_dataset(examples, split_path, f"specialist-{cfg.split}", "evaluation")
        write_json(out / "details.json", details)
        mlflow.log_metrics({"stage_seconds": time.perf_counter() - t0, "mlflow_seconds": timer.seconds})
        write_json(out / "metrics.json", result)
    return {**result, "details": details, "comparison": cmp, "forgetting_comparison": forgetting}


def _confusion_figure(rows: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({r["gold"] for r in rows} | {r["tuned"] for r in rows})
    grid = np.zeros((len(labels), len(labels)), dtype=int)
    for r in rows:
        grid[labels.index(r["gold"]), labels.index(r["tuned"])] += 1
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.imshow(grid, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > grid.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    fig.tight_layout()
    return fig


# --- the stage's command (`python -m mixtune.stages.evaluate`, `mixtune evaluate`) ---------------------------------


def command(args) -> None:
    from mixtune.plumbing.config import load_section

    r = run(load_section("evaluate", args.params), load_section("model", args.params),
            load_section("search", args.params, keys=("metric",)).metric)
    c, key = r["comparison"], r["details"]["metric"]

    def show(x):
        return f"{x['value']:.3f} [{x['low']:.3f}, {x['high']:.3f}]"

    print(f"evaluate ({r['details']['split']}, n={r['n']}, share {r['share']:.2f}): {key} tuned {show(c['tuned'])}, "
          f"base {show(c['base'])}, pure specialist {show(c['specialist'])}")
    if "forgetting" in r:
        f = r["forgetting"]
        print(f"evaluate: held-out generalist accuracy lost against the base model ({f['probe_n']} questions): "
              f"tuned {show(f['tuned'])}, pure specialist {show(f['specialist'])}")


def parser():
    return entry.parser("mixtune evaluate", "score the adapter and the base model on the specialist split")


if __name__ == "__main__":
    sys.exit(entry.main(parser(), command))
