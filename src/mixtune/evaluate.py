"""evaluate: the tuned adapter against the base model on the specialist split, and on held-out generalist
questions (is general ability kept?). Every metric with a 95% bootstrap interval; the gain is paired.

Classification and multiple choice: each option scored by its log-likelihood after the prompt (the prompt runs
once per example, batched; its KV cache is shared by the options). Generative: batched greedy generation.
Outputs: eval/metrics.json (DVC metrics), eval/predictions.jsonl, eval/confusion.csv (DVC plot).
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from pathlib import Path

import numpy as np

from mixtune import metrics as M
from mixtune.config import EvaluateConfig, ModelConfig
from mixtune.errors import MixtuneError
from mixtune.files import atomic_file, read_jsonl, write_json, write_jsonl
from mixtune.model import load_adapter, load_base, load_tokenizer, precision, require_adapter, resolve_base
from mixtune.tracking import Timer, log_dataset, stage_run

# --- scoring ------------------------------------------------------------------------------------------------


def _autocast(prec: str):
    import torch

    if prec == "fp32":
        return contextlib.nullcontext()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.autocast(device, dtype=torch.bfloat16 if prec == "bf16" else torch.float16)


def _prompt_ids(tokenizer, prompt: list[dict]) -> list[int]:
    return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False))


def _option_ids(tokenizer, prompt: list[dict], prompt_ids: list[int], option: str) -> list[int]:
    """The option's tokens exactly as training saw the completion: the chat template's tail after the prompt."""
    full = list(tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": option}], tokenize=True,
                                              return_dict=False))
    if full[: len(prompt_ids)] != prompt_ids:  # a template that merges across the boundary: score the text alone
        return tokenizer(option, add_special_tokens=False)["input_ids"]
    return full[len(prompt_ids):]


def score_options(model, tokenizer, examples: list[dict], batch_size: int, prec: str) -> list[list[float]]:
    """Log-likelihood of each option of each example. Prompts are left-padded so they all end together; one
    forward over the prompts, then one over every (example, option) continuation on the repeated KV cache."""
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    all_prompts = [_prompt_ids(tokenizer, ex["prompt"]) for ex in examples]
    order = sorted(range(len(examples)), key=lambda i: len(all_prompts[i]))  # similar lengths: little padding
    scores: list[list[float]] = [[] for _ in examples]
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch, prompts = [examples[i] for i in idx], [all_prompts[i] for i in idx]
        options = [[_option_ids(tokenizer, ex["prompt"], p, o) for o in ex["options"]] for ex, p in zip(batch, prompts)]
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        rows = [(i, o) for i, opts in enumerate(options) for o in opts]
        owidth = max(len(o) for _, o in rows)
        oids = torch.tensor([o + [pad] * (owidth - len(o)) for _, o in rows], device=device)
        omask = torch.tensor([[1] * len(o) + [0] * (owidth - len(o)) for _, o in rows], device=device)
        which = torch.tensor([i for i, _ in rows], device=device)
        with torch.inference_mode(), _autocast(prec):
            out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
            first = torch.log_softmax(out.logits[:, -1].float(), -1)[which, oids[:, 0]]
            cache = out.past_key_values
            cache.batch_select_indices(which)
            cont = model(input_ids=oids, attention_mask=torch.cat([mask[which], omask], 1), past_key_values=cache,
                         use_cache=False)
            logp = torch.log_softmax(cont.logits[:, :-1].float(), -1).gather(-1, oids[:, 1:, None]).squeeze(-1)
            total = first + (logp * omask[:, 1:]).sum(-1)
        flat = total.tolist()
        for i, opts in zip(idx, options):
            scores[i] = flat[: len(opts)]
            flat = flat[len(opts):]
    return scores


def generate(model, tokenizer, examples: list[dict], batch_size: int, max_new_tokens: int, prec: str) -> list[str]:
    """Batched greedy generation: left padding, KV cache."""
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    texts: list[str] = []
    for start in range(0, len(examples), batch_size):
        prompts = [_prompt_ids(tokenizer, ex["prompt"]) for ex in examples[start : start + batch_size]]
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        with torch.inference_mode(), _autocast(prec):
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        texts += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return [t.strip() for t in texts]


def label_from_text(text: str, options: list[str]) -> str:
    """Map a generated answer to an option: exact (normalized) match first, else the first option it names."""
    if not text.strip():  # no answer names no option (an option "a" normalizes to "" like the empty text)
        return ""
    norm = M.normalize_answer(text)
    for o in options:
        if M.normalize_answer(o) == norm:
            return o
    for o in options:  # whole words only: "tech" is not named by "biotechnology"
        if M.normalize_answer(o) and f" {M.normalize_answer(o)} " in f" {norm} ":
            return o
    return ""


def predict(model, tokenizer, examples: list[dict], cfg: EvaluateConfig, prec: str) -> list[str]:
    choice = [i for i, ex in enumerate(examples) if ex["options"]]
    free = [i for i, ex in enumerate(examples) if not ex["options"]]
    preds = [""] * len(examples)
    if choice:
        scored = score_options(model, tokenizer, [examples[i] for i in choice], cfg.batch_size, prec)
        for i, s in zip(choice, scored):
            preds[i] = examples[i]["options"][int(np.argmax(s))]
    if free:
        for i, t in zip(free, generate(model, tokenizer, [examples[i] for i in free], cfg.batch_size,
                                       cfg.max_new_tokens, prec)):
            preds[i] = t
    return preds


def correct(model, tokenizer, examples: list[dict], cfg: EvaluateConfig, prec: str) -> list[float]:
    """Each example's exact match (the chosen label, for classification and multiple choice), in eval mode."""
    training = model.training
    model.eval()
    preds = predict(model, tokenizer, examples, cfg, prec)
    model.train(training)
    return [M.exact_match(p, ex["completion"]) for p, ex in zip(preds, examples)]


# --- metrics ------------------------------------------------------------------------------------------------


def summarize(examples: list[dict], tuned: list[str], base: list[str], cfg: EvaluateConfig) -> dict:
    """Metrics for both systems, with intervals, and the paired gain (tuned - base) with its interval."""
    gold = [ex["completion"] for ex in examples]
    n = len(gold)
    if all(ex["options"] for ex in examples):
        labels = sorted({o for ex in examples for o in ex["options"]})
        fns = {"accuracy": lambda p, g: M.accuracy(p, g), "macro_f1": lambda p, g: M.macro_f1(p, g, labels)}
    else:  # generative (or mixed): per-example scores averaged
        fns = {"exact_match": lambda p, g: float(np.mean([M.exact_match(a, b) for a, b in zip(p, g)])),
               "token_f1": lambda p, g: float(np.mean([M.token_f1(a, b) for a, b in zip(p, g)])),
               "rouge_l": lambda p, g: float(np.mean([M.rouge_l(a, b) for a, b in zip(p, g)]))}
    out: dict = {"n": n, "tuned": {}, "base": {}, "gain": {}}
    for name, fn in fns.items():
        for system, pred in (("tuned", tuned), ("base", base)):
            out[system][name] = fn(pred, gold)
            out[system][f"{name}_low"], out[system][f"{name}_high"] = M.bootstrap(
                lambda idx, p=pred: fn([p[i] for i in idx], [gold[i] for i in idx]), n, cfg.bootstrap, cfg.seed)
        out["gain"][name] = out["tuned"][name] - out["base"][name]
        out["gain"][f"{name}_low"], out["gain"][f"{name}_high"] = M.bootstrap(
            lambda idx: fn([tuned[i] for i in idx], [gold[i] for i in idx]) - fn([base[i] for i in idx],
                                                                                 [gold[i] for i in idx]),
            n, cfg.bootstrap, cfg.seed)
    return out


def generalist_sample(prepared: Path, mix: Path, k: int, seed: int, max_options: int = 8,
                      max_chars: int = 800) -> list[dict]:
    """Multiple-choice generalist questions that were not in the training mix (short enough to score cheaply)."""
    if k == 0:
        return []
    used = {json.loads(line)["id"] for line in open(mix / "train.jsonl", encoding="utf-8")}
    pool = [ex for ex in read_jsonl(prepared / "generalist.jsonl")
            if ex["options"] and len(ex["options"]) <= max_options and ex["id"] not in used
            and len(ex["prompt"][-1]["content"]) + sum(map(len, ex["options"])) <= max_chars]
    return random.Random(seed).sample(pool, min(k, len(pool)))


# --- stage --------------------------------------------------------------------------------------------------


def run(cfg: EvaluateConfig, model_cfg: ModelConfig, prepared: Path = Path("prepared"), mix: Path = Path("mix"),
        train: Path = Path("train"), out: Path = Path("eval")) -> dict:
    split_path = prepared / "specialist" / f"{cfg.split}.jsonl"
    if not split_path.is_file():
        raise MixtuneError(f"{split_path}: no such file (run the prepare stage first)")
    examples = read_jsonl(split_path)[: cfg.max_examples]
    if not examples:
        raise MixtuneError(f"{split_path}: no examples to evaluate")
    manifest = json.loads((mix / "manifest.json").read_text())
    train_metrics = json.loads((train / "metrics.json").read_text()) if (train / "metrics.json").is_file() else {}
    base_path = resolve_base(model_cfg.base)
    require_adapter(train / "adapter")  # before a run is opened and the base model loaded, as train checks its base
    prec = precision("auto")
    timer = Timer()
    tags = {"mixtune.mix_sha256": manifest["sha256"], "mixtune.train_run_id": train_metrics.get("run_id", ""),
            "mixtune.split": cfg.split}
    params = {"evaluate": cfg.model_dump(), "model": model_cfg.model_dump(),
              "mix": {k: manifest[k] for k in ("specialist_size", "generalist_share", "generalist_size", "seed")}}

    with stage_run("evaluate", manifest["specialist_tasks"], params, tags, timer):
        t0 = time.perf_counter()
        import mlflow

        tokenizer = load_tokenizer(base_path)
        model = load_adapter(load_base(base_path), train / "adapter")
        model.eval()
        held_out = generalist_sample(prepared, mix, cfg.generalist_sample, cfg.seed)

        t = time.perf_counter()
        tuned = predict(model, tokenizer, examples, cfg, prec)
        seconds_per_example = (time.perf_counter() - t) / len(examples)
        tuned_gen = predict(model, tokenizer, held_out, cfg, prec)
        with model.disable_adapter():
            base = predict(model, tokenizer, examples, cfg, prec)
            base_gen = predict(model, tokenizer, held_out, cfg, prec)

        result = summarize(examples, tuned, base, cfg)
        if held_out:
            g = summarize(held_out, tuned_gen, base_gen, cfg)
            result["generalist"] = {"n": g["n"], "tuned_accuracy": g["tuned"]["accuracy"],
                                    "base_accuracy": g["base"]["accuracy"], "forgetting": -g["gain"]["accuracy"],
                                    "forgetting_low": -g["gain"]["accuracy_high"],
                                    "forgetting_high": -g["gain"]["accuracy_low"]}
        result["split"] = cfg.split
        result["seconds_per_example"] = seconds_per_example

        rows = [{"id": ex["id"], "task": ex["task"], "gold": ex["completion"], "tuned": p, "base": b}
                for ex, p, b in zip(examples, tuned, base)]
        write_jsonl(out / "predictions.jsonl", rows)
        if all(ex["options"] for ex in examples):
            with atomic_file(out / "confusion.csv") as f:
                f.write("actual,predicted\n")
                f.writelines(f"{r['gold']},{r['tuned']}\n" for r in rows)
        result["stage_seconds"] = time.perf_counter() - t0
        with timer():
            flat = {f"{system}.{k}": v for system in ("tuned", "base", "gain") for k, v in result[system].items()}
            flat.update({f"generalist.{k}": v for k, v in result.get("generalist", {}).items()})
            mlflow.log_metrics({**flat, "seconds_per_example": seconds_per_example})
            mlflow.log_artifact(str(out / "predictions.jsonl"))
            if (out / "confusion.csv").is_file():
                mlflow.log_figure(_confusion_figure(rows), "confusion_matrix.png")
            log_dataset(examples, split_path, f"specialist-{cfg.split}", "evaluation")
        result["mlflow_seconds"] = timer.seconds
        write_json(out / "metrics.json", result)
    return result


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
