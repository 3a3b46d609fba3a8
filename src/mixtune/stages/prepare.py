"""prepare: every source -> the normalized schema; dedupe; decontaminate the generalist pool; split the specialist.

Outputs (under `prepared/`):
    specialist/train.jsonl, specialist/dev.jsonl, specialist/test.jsonl   seeded, stratified by task and label
    specialist/recipe.json        per task, how a raw record becomes its prompt: what the registered model takes
    generalist.jsonl                                                       the pool `mix` samples from
    generalist_probe.jsonl                   multiple-choice pool questions set aside: forgetting is measured on them
    stats.json                                                             what was read, dropped and why
    card.md                  what training will see: rendered examples, labels per split, lengths (mixtune check)
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

from mixtune.core.schema import prompt_text
from mixtune.core.sources import GIVEN, Fit, read_source, where_of
from mixtune.core.sources import parts as parts_of
from mixtune.core.splits import decontaminate, dedupe, given_any, place, probe_questions
from mixtune.plumbing import entry
from mixtune.plumbing.config import ModelConfig, PrepareConfig
from mixtune.plumbing.errors import MixtuneError
from mixtune.plumbing.files import atomic_dir, atomic_file, write_json, write_jsonl

TRAIN_KEYS = ("max_length",)  # of the train section: examples are measured against it


def _record(example: dict) -> int:
    return int(example["id"].rsplit("/", 1)[1]) + 1  # "<source>/<n>": the source's record n + 1


def _tracked(root: Path) -> list[str] | None:
    """The absolute paths DVC versions in the project at `root`: data/ (data.dvc), every path a .dvc file
    tracks, and every dependency of a dvc.yaml stage (the study's examples/trec); None when `root` is no DVC
    project (no .dvc/ folder): then nothing is checked."""
    import yaml

    if not (root / ".dvc").is_dir():
        return None
    base = os.path.abspath(root)
    tracked = [os.path.join(base, "data")]
    for folder, dirs, files in os.walk(base):
        depth = folder[len(base):].count(os.sep)
        dirs[:] = [] if depth >= 2 else sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        for name in sorted(f for f in files if f.endswith(".dvc") or f == "dvc.yaml"):
            try:
                doc = yaml.safe_load(Path(folder, name).read_text(encoding="utf-8")) or {}
            except (OSError, UnicodeDecodeError, yaml.YAMLError):
                continue  # DVC itself says what is wrong with it
            if name.endswith(".dvc"):
                paths = [(folder, o.get("path")) for o in doc.get("outs") or [] if isinstance(o, dict)]
            else:
                stages = [s.get("do", s) for s in (doc.get("stages") or {}).values() if isinstance(s, dict)]
                paths = [(os.path.join(folder, s.get("wdir", ".")), d) for s in stages for d in s.get("deps") or []]
            tracked += [os.path.abspath(os.path.join(where, p)) for where, p in paths
                        if isinstance(p, str) and "${" not in p]
    return tracked


def unversioned(cfg: PrepareConfig, root: Path) -> dict[str, list[str]]:
    """source name -> its files (a file, BIG-bench or evals source's path and split files) that DVC does not
    version: an error unless prepare.allow_unversioned, then recorded in stats.json, the card and the MLflow run."""
    tracked = _tracked(root)
    if tracked is None:
        return {}
    out: dict[str, list[str]] = {}
    for src in [*cfg.specialist, *cfg.generalist]:
        if src.kind == "hf":
            continue
        for path in [src.path, *(getattr(src, "splits", None) or {}).values()]:
            full = os.path.abspath(os.path.join(root, path))
            if any(full == t or full.startswith(t + os.sep) for t in tracked):
                continue
            if not cfg.allow_unversioned:
                raise MixtuneError(
                    f"{path}: source '{src.name}': not versioned: outside data/ and every path a .dvc file tracks, "
                    "so `dvc repro` would not rerun when it changes and a clone could not reproduce the result: "
                    f"copy it under data/ (cp {path} data/) and run `dvc add data`, or give it a .dvc file of its "
                    f"own (`dvc add {path}`, inside the repository), or set prepare.allow_unversioned: true")
            out.setdefault(src.name, []).append(path)
    return out


def _check_sizes(src, cfg: PrepareConfig, examples: list[dict]) -> None:
    """A record too large to take in whole: one line naming the file and the record."""
    for ex in examples:
        size = len(prompt_text(ex)) + len(ex["completion"])
        if size > cfg.max_record_chars:
            raise MixtuneError(f"{where_of(src)}: record {_record(ex)}: {size} characters, over "
                               f"prepare.max_record_chars={cfg.max_record_chars}: shorten or leave out the record, "
                               "or raise the limit")


def _check_labels(src, examples: list[dict]) -> None:
    """A classification source (all its splits) with fewer than two labels in its data."""
    if getattr(src, "format", None) == "classification":
        labels = Counter(ex["completion"] for ex in examples)
        if len(labels) < 2:
            raise MixtuneError(f"{where_of(src)}: source '{src.name}': field "
                               f"'{src.columns.get('label', 'label')}': every record has the label "
                               f"{next(iter(labels))!r}: a classifier needs at least two labels in its data")


def _fit(src, cfg: PrepareConfig, root: Path, examples: list[dict], lengths: list[int], over: list[int],
         tokenizer, max_length: int, recipes: dict) -> tuple[list[dict], int]:
    """A specialist source with examples over max_length: a one-line error that says what to change, or
    (too_long: truncate_input) the source read again with every prompt cut to fit, its answer whole."""
    from mixtune.core.model import chat_tokens

    longest = max(over, key=lambda i: lengths[i])
    if cfg.too_long == "error" or src.kind == "bigbench":
        fixes = ("set max_input_words on the source, " if getattr(src, "format", "") == "classification" else "")
        fixes += "raise train.max_length" + (", or set prepare.too_long: truncate_input" if src.kind != "bigbench" else "")
        raise MixtuneError(f"{where_of(src)}: source '{src.name}': {len(over)} of {len(examples)} examples exceed "
                           f"train.max_length={max_length} tokens with the chat template, and training would drop "
                           f"them (the longest: record {_record(examples[longest])}, "
                           f"{lengths[longest]} tokens): {fixes}")
    # The budget leaves room for the longest answer (with its end-of-turn tokens) of the source: one budget for
    # every prompt, so a served request is cut exactly as a test example was (it is in the recipe).
    prompts = chat_tokens(tokenizer, [ex["prompt"] for ex in examples], add_generation_prompt=True)
    budget = max_length - max(n - p for n, p in zip(lengths, prompts))
    fit = Fit(lambda prompt: chat_tokens(tokenizer, [prompt], add_generation_prompt=True)[0], budget)
    fitted = read_source(src, root, cfg.seed, fit=fit)
    entry = recipes[src.task_name]
    entry["prompt_budget"] = min(budget, entry.get("prompt_budget", budget))
    return fitted, fit.cut


def run(cfg: PrepareConfig, model_cfg: ModelConfig, max_length: int, root: Path = Path("."),
        out: Path = Path("prepared")) -> dict:
    """`max_length`: train.max_length. Every example is measured in the base model's tokens through its chat
    template, as training tokenizes it: training truncates at max_length and drops an example whose answer is
    cut, so none goes in over it (too_long)."""
    from mixtune.core.model import chat_tokens, load_tokenizer, resolve_base, with_answer

    loose = unversioned(cfg, root)  # before anything is read
    tokenizer = load_tokenizer(resolve_base(model_cfg.base))
    stats: dict = {"specialist": {}, "generalist": {}}

    specialist: list[dict] = []
    recipes: dict[str, dict] = {}  # task -> how its prompt is built: the registered model's input (sources.prompter)
    for src in cfg.specialist:
        s = stats["specialist"][src.name] = {"read": 0, "too_long": 0, "truncated": 0}
        for given, part in parts_of(src, root):
            examples = read_source(part, root, cfg.seed, recipes)
            _check_sizes(part, cfg, examples)
            lengths = chat_tokens(tokenizer, [with_answer(ex) for ex in examples])
            over = [i for i, n in enumerate(lengths) if n > max_length]
            s["read"] += len(examples)
            s["too_long"] += len(over)
            if over:
                examples, cut = _fit(part, cfg, root, examples, lengths, over, tokenizer, max_length, recipes)
                s["truncated"] += cut
            specialist += [{**ex, GIVEN: given} for ex in examples] if given else examples
        of_source = [ex for ex in specialist if ex["source"].split(":")[0] == src.name]
        _check_labels(src, of_source)
        given_counts = Counter(ex[GIVEN] for ex in of_source if ex.get(GIVEN))
        if given_counts:
            s["given_splits"] = dict(sorted(given_counts.items()))
    parts, stats["specialist_duplicates_removed"] = place(specialist, cfg.dev_fraction, cfg.test_fraction, cfg.seed)
    specialist = [ex for part in parts.values() for ex in part]
    for name in ("dev", "test"):
        fraction = getattr(cfg, f"{name}_fraction")
        if (fraction or given_any(stats, name)) and len(parts[name]) < cfg.min_eval_examples:
            whence = "given by the data" if given_any(stats, name) else f"{fraction} of {len(specialist)}"
            raise MixtuneError(f"{', '.join(where_of(s) for s in cfg.specialist)}: the {name} split holds "
                               f"{len(parts[name])} examples ({whence}), fewer than "
                               f"prepare.min_eval_examples={cfg.min_eval_examples}: too few to measure anything; "
                               f"give more examples or raise prepare.{name}_fraction")
    target_tasks = {ex["task"] for ex in specialist}

    generalist: list[dict] = []
    for src in cfg.generalist:
        left_out: Counter = Counter()
        examples = read_source(src, root, cfg.seed, left_out=left_out)
        kept = [ex for ex in examples if ex["task"] not in target_tasks]  # the target is never in the pool
        short = [ex for ex in kept if len(prompt_text(ex)) + len(ex["completion"]) <= cfg.generalist_max_chars]
        # The pool is ours, not the user's: an example over max_length is left out, and counted.
        fits = [ex for ex, n in zip(short, chat_tokens(tokenizer, [with_answer(ex) for ex in short]))
                if n <= max_length]
        stats["generalist"][src.name] = {"read": len(examples), "target_task_removed": len(examples) - len(kept),
                                         "too_long_removed": len(kept) - len(fits), **left_out}
        generalist += fits
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
    if loose:
        stats["not_versioned"] = loose

    card = data_card(cfg, stats, parts, tokenizer, model_cfg.base, max_length)
    # Everything is validated above; each output then appears whole or not at all.
    with atomic_dir(out / "specialist") as tmp:
        for name, part in parts.items():
            write_jsonl(tmp / f"{name}.jsonl", part)
        write_json(tmp / "recipe.json", {"tasks": recipes})
    write_jsonl(out / "generalist.jsonl", generalist)
    write_jsonl(out / "generalist_probe.jsonl", probe)
    write_json(out / "stats.json", stats)
    with atomic_file(out / "card.md") as f:
        f.write(card)
    return stats


def log_run(cfg: PrepareConfig, model_cfg: ModelConfig, max_length: int, stats: dict, out: Path) -> None:
    """The prepare stage's MLflow run (not `mixtune check`'s): its settings, the counts of stats.json as
    metrics, the data card and stats.json as artifacts, and what it made as its description."""
    import mlflow

    from mixtune.plumbing.tracking import flatten, stage_run, with_exp_name

    settings = cfg.model_dump(mode="json")
    sources = {k: settings.pop(k) for k in ("specialist", "generalist")}  # lists: an artifact, not params
    params = {"prepare": settings, "model": model_cfg.model_dump(), "train": {"max_length": max_length}}
    label = with_exp_name(f"{stats['splits']['train']} train examples")
    loose = _not_versioned(stats)
    tags = {"mixtune.not_versioned": loose} if loose else None
    with stage_run("prepare", list(stats["specialist_tasks"]), params, tags=tags, label=label) as run:
        if run is None:
            return
        mlflow.log_dict(sources, "sources.json")
        counts = {k: v for k, v in flatten(stats).items() if isinstance(v, int | float) and not isinstance(v, bool)}
        mlflow.log_metrics({f"data.{k}": float(v) for k, v in counts.items()})
        mlflow.log_artifact(str(out / "card.md"))
        mlflow.log_artifact(str(out / "stats.json"))
        truncated = sum(s["truncated"] for s in stats["specialist"].values())
        mlflow.set_tag("mlflow.note.content", (
            f"splits train {stats['splits']['train']}, dev {stats['splits']['dev']}, test {stats['splits']['test']}; "
            f"{truncated} inputs truncated; generalist pool {stats['generalist_pool']} of "
            f"{stats['generalist_tasks']} tasks, probe {stats['generalist_probe']} (see card.md)"
            + (f"; not versioned (prepare.allow_unversioned): {loose}" if loose else "")))


def _not_versioned(stats: dict) -> str:
    """The sources' files DVC does not version (prepare.allow_unversioned), as the card and the run say them."""
    return "; ".join(f"source `{name}`: {', '.join(f'`{p}`' for p in paths)}"
                     for name, paths in stats.get("not_versioned", {}).items())


def data_card(cfg: PrepareConfig, stats: dict, parts: dict[str, list[dict]], tokenizer, base: str,
              max_length: int, shown: int = 2) -> str:
    """prepared/card.md: what training will see, per task: its first examples rendered through the chat template
    exactly as the trainer tokenizes them, label counts per split, token lengths against max_length, and what
    was cut, removed or is suspicious (labels the training split never has)."""
    from mixtune.core.model import chat_tokens, with_answer

    tasks = sorted({ex["task"] for part in parts.values() for ex in part})
    lines = [f"# Data card: {', '.join(tasks)}", "",
             (f"Written by `mixtune prepare` and `mixtune check` from params.yaml and the data. Lengths are tokens "
              f"of `{base}` through its chat template (prompt and answer, as training tokenizes them) against "
              f"train.max_length={max_length}."), ""]
    if loose := _not_versioned(stats):
        lines += [(f"**Not versioned** (prepare.allow_unversioned: true): {loose}: outside the data DVC tracks, so "
                   "`dvc repro` does not rerun when it changes and a clone cannot reproduce this data."), ""]
    for name, s in stats["specialist"].items():
        lines.append(f"- source `{name}`: {s['read']} records read, {s['too_long']} over max_length, "
                     f"{s['truncated']} inputs truncated (prepare.too_long: {cfg.too_long})")
    lines += [f"- exact duplicate inputs removed (all tasks): {stats['specialist_duplicates_removed']}", ""]
    for task in tasks:
        split = {name: [ex for ex in part if ex["task"] == task] for name, part in parts.items()}
        lines += [f"## Task `{task}`", ""]
        every = [ex for part in split.values() for ex in part]
        if every and every[0]["options"]:
            labels = sorted({ex["completion"] for ex in every})
            lines += ["| split | examples | " + " | ".join(labels) + " |", "|---|---:|" + "---:|" * len(labels)]
            for name, part in split.items():
                counts = Counter(ex["completion"] for ex in part)
                lines.append(f"| {name} | {len(part)} | " + " | ".join(str(counts[lb]) for lb in labels) + " |")
            unseen = sorted({ex["completion"] for n in ("dev", "test") for ex in split[n]}
                            - {ex["completion"] for ex in split["train"]})
            lines += ["", f"**Warning:** labels in dev/test that the train split never has: {', '.join(unseen)}"
                      if unseen else "Every dev/test label is in the train split."]
        else:
            lines.append("Examples per split: " + ", ".join(f"{n} {len(p)}" for n, p in split.items()))
        lengths = sorted(chat_tokens(tokenizer, [with_answer(ex) for ex in every]))
        if lengths:
            q = {p: lengths[min(len(lengths) - 1, int(p / 100 * len(lengths)))] for p in (50, 90, 99)}
            lines += ["", (f"Tokens per example: median {q[50]}, p90 {q[90]}, p99 {q[99]}, max {lengths[-1]} "
                           f"(train.max_length {max_length}: {sum(n > max_length for n in lengths)} over)")]
        lines += ["", f"First {min(shown, len(split['train']))} training examples, as the trainer sees them:", ""]
        for ex in split["train"][:shown]:
            text = tokenizer.apply_chat_template(with_answer(ex), tokenize=False)
            lines += ["```text", text.rstrip("\n"), "```", ""]
    g = stats["generalist"]
    lines += ["## Generalist pool", "",
              *((f"- source `{n}`: {v['read']} read, {v['target_task_removed']} of the target task removed, "
                 f"{v['too_long_removed']} over generalist_max_chars or max_length left out"
                 + (f", {v['other_format_removed']} sampled records not a question with an answer (e.g. model-graded)"
                    if v.get("other_format_removed") else "")) for n, v in g.items()),
              (f"- duplicates removed {stats['generalist_duplicates_removed']}, decontaminated (sharing a "
               f"{cfg.decontaminate_ngram}-word span with a dev/test input) {stats['decontaminated']}"),
              (f"- forgetting probe {stats['generalist_probe']} questions; pool {stats['generalist_pool']} examples "
               f"of {stats['generalist_tasks']} tasks"), ""]
    return "\n".join(lines)


# --- the stage's command (`python -m mixtune.stages.prepare`, `mixtune prepare`) -----------------------------------


def command(args) -> None:
    from mixtune.plumbing.config import load_section

    cfg, model_cfg = load_section("prepare", args.params), load_section("model", args.params)
    max_length = load_section("train", args.params, keys=TRAIN_KEYS).max_length
    stats = run(cfg, model_cfg, max_length, Path(args.root), Path(args.out))
    log_run(cfg, model_cfg, max_length, stats, Path(args.out))
    print(f"prepared: splits {stats['splits']}, generalist pool {stats['generalist_pool']} "
          f"({stats['decontaminated']} decontaminated)")


def parser():
    p = entry.parser("mixtune prepare", "normalize, dedupe, decontaminate and split the sources")
    p.add_argument("--root", default=".", help="folder the source paths are relative to")
    p.add_argument("--out", default="prepared")
    return p


if __name__ == "__main__":
    sys.exit(entry.main(parser(), command))
