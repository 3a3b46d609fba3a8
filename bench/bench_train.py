"""Training throughput: mixtune's trainer against a plain TRL script, same model, data and machine, one run.

    baseline  a plain TRL script: SFTTrainer with the default SFTConfig (CPU, batch 8) and LoRA r=16 all-linear
    mixtune   the train stage's trainer (mixtune.core.tune.build_trainer with params.yaml's train section)
    ceiling   bf16 matmul throughput measured in the same run; MFU = tokens/s x 4 x params / ceiling
    shapes    the model's own matmuls (its layers' widths and the LoRA rank) in the training precision, rows of
              one micro-batch: the ceiling this model can reach here; efficiency = tokens/s x 4 x params / it

Throughput counts non-padding tokens (the attention mask of every batch the collator builds) over the steps
after the first (warm-up), alternating baseline and mixtune runs; the figure is the median over runs.

    python bench/bench_train.py [--steps 8] [--runs 2] [--short]

--short trains on short examples instead of the default mix: the generalist pool's examples whose prompt is
under 50 tokens through the chat template (the issue's "tweets" case, where per-step overheads weigh more);
results in bench/results/train_short.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import matmul_ceiling, model_matmuls, shape_ceiling
from report import TRAIN_SPEEDUP

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "train.json"
RESULTS_SHORT = REPO / "bench" / "results" / "train_short.json"


def measure(trainer, steps: int) -> dict:
    """Run `steps` optimizer steps; tokens and time of steps 2..N (the first warms up)."""
    from transformers import TrainerCallback

    tokens: list[int] = []
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        mask = batch.get("attention_mask")
        tokens.append(int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()))
        return batch

    trainer.data_collator = counting
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    trainer.add_callback(Clock())
    trainer.train()
    seconds = stamps[-1] - stamps[0]
    accum = trainer.args.gradient_accumulation_steps  # the collator runs once per micro-batch
    counted = sum(tokens[accum : steps * accum])
    return {"tokens": counted, "seconds": seconds, "tokens_per_second": counted / seconds}


def short_examples(base: str, n: int = 256, max_prompt_tokens: int = 50) -> list[dict]:
    """The first `n` examples of the generalist pool whose prompt is under `max_prompt_tokens` tokens."""
    from mixtune.core.model import chat_tokens, load_tokenizer
    from mixtune.plumbing.files import read_jsonl

    pool = read_jsonl(REPO / "prepared" / "generalist.jsonl")
    lengths = chat_tokens(load_tokenizer(base), [e["prompt"] for e in pool], add_generation_prompt=True)
    short = [e for e, k in zip(pool, lengths) if k < max_prompt_tokens][:n]
    if len(short) < n:
        raise SystemExit(f"bench_train: only {len(short)} pool examples have prompts under {max_prompt_tokens} tokens")
    return short


def baseline_trainer(base: str, examples: list[dict], out: Path, steps: int):
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    ds = datasets.Dataset.from_list([{"prompt": e["prompt"], "completion": [{"role": "assistant",
                                     "content": e["completion"]}]} for e in examples])
    args = SFTConfig(output_dir=str(out), use_cpu=True, per_device_train_batch_size=8, max_steps=steps,
                     report_to="none", save_strategy="no", disable_tqdm=True)
    return SFTTrainer(model=AutoModelForCausalLM.from_pretrained(base), args=args, train_dataset=ds,
                      processing_class=AutoTokenizer.from_pretrained(base),
                      peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--short", action="store_true")
    args = ap.parse_args()

    sys.path.insert(0, str(REPO / "src"))
    from mixtune.core.model import resolve_base, train_precision
    from mixtune.core.tune import build_trainer
    from mixtune.plumbing.config import load_section
    from mixtune.plumbing.files import read_jsonl, write_json

    cfg = load_section("train", args.params).model_copy(update={"max_steps": args.steps, "save_steps": 10**6})
    base = resolve_base(load_section("model", args.params).base)
    examples = short_examples(base) if args.short else read_jsonl(REPO / "mix" / "train.jsonl")
    prec = train_precision(cfg.precision)
    ceiling = matmul_ceiling()
    runs: dict[str, list[dict]] = {"baseline": [], "mixtune": []}
    n_params = 0
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.runs):
            for name in ("baseline", "mixtune"):
                out = Path(tmp) / f"{name}-{r}"
                trainer = (baseline_trainer(base, examples, out, args.steps) if name == "baseline"
                           else build_trainer(cfg, base, examples, out, prec))
                n_params = sum(p.numel() for p in trainer.model.parameters())
                runs[name].append(measure(trainer, args.steps))
                print(f"{name} run {r}: {runs[name][-1]['tokens_per_second']:.0f} tokens/s", flush=True)
    tps = {k: statistics.median(x["tokens_per_second"] for x in v) for k, v in runs.items()}
    speedup = tps["mixtune"] / tps["baseline"]
    mfu = {k: v * 4 * n_params / ceiling for k, v in tps.items()}
    import transformers

    config = transformers.AutoConfig.from_pretrained(base)
    # a pass's matmul rows: its tokens, at most the micro_tokens budget (a step's tokens when they fit it)
    rows = min(cfg.micro_tokens, round(statistics.median(x["tokens"] for x in runs["mixtune"]) / (args.steps - 1)))
    shapes = shape_ceiling(model_matmuls(config, cfg.lora.r), rows, "bf16" if prec == "bf16" else "fp32")
    efficiency = {k: v * 4 * n_params / shapes for k, v in tps.items()}
    kind = "short" if args.short else "mix"
    result = {"examples": kind, "steps": args.steps, "runs": runs, "tokens_per_second": tps, "speedup": speedup,
              "target_speedup": TRAIN_SPEEDUP, "bf16_matmul_gflops": ceiling / 1e9, "params": n_params, "mfu": mfu,
              "ceiling_tokens_per_second": ceiling / (4 * n_params), "precision": prec,
              "model_shapes": {"rows": rows, "gflops": shapes / 1e9, "tokens_per_second": shapes / (4 * n_params),
                               "efficiency": efficiency}}
    write_json(RESULTS_SHORT if args.short else RESULTS, result)
    print(f"\n{'':10}{'tokens/s':>10}{'MFU':>8}\n" + "\n".join(
        f"{k:10}{tps[k]:>10.0f}{mfu[k]:>8.1%}" for k in tps))
    print(f"speedup {speedup:.2f}x over the baseline; bf16 matmul ceiling {ceiling / 1e9:.0f} GFLOP/s "
          f"= {result['ceiling_tokens_per_second']:.0f} tokens/s for {n_params / 1e6:.1f}M params")
    print(f"the model's own matmuls ({prec}, {rows} rows): {shapes / 1e9:.0f} GFLOP/s = "
          f"{shapes / (4 * n_params):.0f} tokens/s; mixtune at {efficiency['mixtune']:.0%} of it, the baseline at "
          f"{efficiency['baseline']:.0%}; {TRAIN_SPEEDUP:.0f}x the baseline would be "
          f"{TRAIN_SPEEDUP * tps['baseline']:.0f} tokens/s")
    print("PASS" if speedup >= TRAIN_SPEEDUP else f"FAIL: under {TRAIN_SPEEDUP:.0f}x the baseline")


if __name__ == "__main__":
    main()
