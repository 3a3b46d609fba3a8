"""Option scoring on the default task against naive per-option scoring and against the machine's matmul
ceiling, same model, examples and run; and batched generation's own figure.

    scoring    score.predict: a batch's common prefix once, then each prompt once with all its options in the
               same forward pass (a 4D mask), at score.score_precision() (fp32 on a CPU)
    baseline   naive scoring: one unbatched forward per (example, option) over prompt + option, what a plain
               script does; the two must agree within 1e-4 on every option
    ceiling    n x n matmul throughput at fp32 and at bf16, measured in this run; utilisation =
               2 x parameters x (prompt + option tokens) per example / seconds per example / ceiling
    generation score.generate (greedy, KV cache, prompts by length, a row leaves the batch at its end token)
               against today's baseline, HF `generate` on batches in input order (a finished row decodes until
               its batch ends), on --generate free-form generalist questions with the longest answers (writing
               -like: hundreds of words), --max-new-tokens each; the same answers, and the speed-up (target 3x)
    bound      the model's own matmuls alone (each layer's weights its own, at the rows scoring and generation
               give them, at their precision), timed in this run: no scoring or generation of these examples can
               be faster here, whatever else it saves; beside each target's time

The tuned adapter (train/adapter) on the first --examples test articles; peak RSS above the loaded model.
--generation-only measures generation alone, on the base model (no `make run` needed), and replaces only the
generation figure in eval.json.

    python bench/bench_eval.py [--examples 64] [--generation-only]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import threading
import time
from pathlib import Path

from common import matmul_ceiling, model_matmuls, shape_ceiling
from report import SCORE_SPEEDUP

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "eval.json"
TARGET_GENERATION = 3.0  # x today's batched HF generate (issue 26)


class PeakRSS:
    """This process's peak RSS while the block runs, sampled every 20 ms (ru_maxrss never goes down)."""

    def __enter__(self):
        import psutil

        self.proc, self.peak, self.stop = psutil.Process(), 0, False
        self.start = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.02)

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()
        self.above_mb = (self.peak - self.start) / 2**20


def naive(model, tokenizer, examples: list[dict]) -> list[list[float]]:
    import torch

    from mixtune.core.score import _option_ids, _prompt_ids

    out = []
    for ex in examples:
        p = _prompt_ids(tokenizer, ex["prompt"])
        row = []
        for o in ex["options"]:
            ids = p + _option_ids(tokenizer, ex["prompt"], p, o)
            with torch.inference_mode():
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
            row.append(sum(logp[t - 1, ids[t]].item() for t in range(len(p), len(ids))))
        out.append(row)
    return out


def hf_generate(model, tokenizer, examples: list[dict], batch_size: int, max_new_tokens: int) -> list[str]:
    """Today's generation before issue 26: HF `generate` on batches in input order, left padding, KV cache."""
    import torch

    from mixtune.core.score import _prompt_ids

    pad, texts = tokenizer.pad_token_id, []
    for start in range(0, len(examples), batch_size):
        prompts = [_prompt_ids(tokenizer, ex["prompt"]) for ex in examples[start : start + batch_size]]
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        texts += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return [t.strip() for t in texts]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--generate", type=int, default=48, help="free-form questions for the generation figure")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--generation-only", action="store_true", help="base model, generation's figure only")
    args = ap.parse_args()

    sys.path.insert(0, str(REPO / "src"))
    from mixtune.core import score
    from mixtune.core.model import load_adapter, load_base, load_tokenizer, resolve_base
    from mixtune.plumbing.config import load_section
    from mixtune.plumbing.files import read_jsonl, write_json

    cfg = load_section("evaluate", args.params)
    base = resolve_base(load_section("model", args.params).base)
    tokenizer = load_tokenizer(base)
    prec = score.score_precision()
    ceilings = {"fp32": matmul_ceiling("fp32"), "bf16": matmul_ceiling("bf16")}
    if args.generation_only:
        model = load_base(base).eval()
        gen = generation(model, tokenizer, args, cfg, prec, ceilings)
        result = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        write_json(RESULTS, {**result, "generation": {**gen, "model": "base"}})
        return print_generation(gen)
    examples = read_jsonl(REPO / "prepared" / "specialist" / "test.jsonl")[: args.examples]
    model = load_adapter(load_base(base), REPO / "train" / "adapter").eval()
    n_params = sum(p.numel() for p in model.parameters())
    prompts = [score._prompt_ids(tokenizer, ex["prompt"]) for ex in examples]
    tokens = sum(len(p) + sum(len(score._option_ids(tokenizer, ex["prompt"], p, o)) for o in ex["options"])
                 for ex, p in zip(examples, prompts)) / len(examples)

    rows = cfg.batch_size * score.ROW_TOKENS  # a scoring batch's padded tokens at most
    with PeakRSS() as rss:
        t = time.perf_counter()
        fast = score.score_options(model, tokenizer, examples, cfg.batch_size, prec)
        t_fast = (time.perf_counter() - t) / len(examples)
    t = time.perf_counter()
    slow = naive(model, tokenizer, examples)
    t_slow = (time.perf_counter() - t) / len(examples)
    diff = max(abs(a - b) for fr, sr in zip(fast, slow) for a, b in zip(fr, sr))
    flop = 2 * n_params * tokens
    result = {
        "examples": len(examples), "precision": prec, "params": n_params, "tokens_per_example": tokens,
        "ceiling_gflops": {k: v / 1e9 for k, v in ceilings.items()},
        "scoring": {"seconds_per_example": t_fast, "peak_rss_above_model_mb": rss.above_mb,
                    "utilisation": {k: flop / t_fast / v for k, v in ceilings.items()}},
        "naive": {"seconds_per_example": t_slow, "utilisation": {k: flop / t_slow / v for k, v in ceilings.items()}},
        "speedup": t_slow / t_fast, "max_abs_difference": diff,
        # label scoring's matmuls alone (a batch's padded tokens as rows; no LM head, no adapter): a lower bound
        "matmul_bound": {"rows": rows, "precision": prec,
                         "seconds_per_example": tokens * matmul_seconds(model.config, rows, prec, False, 3)},
        "generation": {**generation(model, tokenizer, args, cfg, prec, ceilings), "model": "tuned adapter"},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    write_json(RESULTS, result)
    u = result["scoring"]["utilisation"]
    print(f"scoring    {t_fast:.3f} s/example ({tokens:.0f} tokens), {u['fp32']:.0%} of the fp32 ceiling "
          f"({ceilings['fp32'] / 1e9:.0f} GFLOP/s), {u['bf16']:.0%} of bf16 ({ceilings['bf16'] / 1e9:.0f}); "
          f"peak RSS +{rss.above_mb:.0f} MB")
    print(f"naive      {t_slow:.3f} s/example: scoring is {t_slow / t_fast:.1f}x faster; max |difference| {diff:.1e}")
    print(f"the model's matmuls alone ({prec}, {rows} rows): "
          f"{result['matmul_bound']['seconds_per_example']:.3f} s/example; {SCORE_SPEEDUP:.0f}x per-option scoring "
          f"needs {t_slow / SCORE_SPEEDUP:.3f} s")
    print_generation(result["generation"])


def generation(model, tokenizer, args, cfg, prec: str, ceilings: dict) -> dict:
    """score.generate against HF generate on the same free-form questions, same run; generation's peak RSS
    above what the process held before it."""
    from mixtune.core import score
    from mixtune.plumbing.files import read_jsonl

    n_params = sum(p.numel() for p in model.parameters())
    free = sorted((ex for ex in read_jsonl(REPO / "prepared" / "generalist.jsonl") if not ex["options"]),
                  key=lambda ex: -len(ex["completion"]))[: args.generate]
    with PeakRSS() as rss:
        t = time.perf_counter()
        texts = score.generate(model, tokenizer, free, cfg.batch_size, args.max_new_tokens, prec)
        t_gen = (time.perf_counter() - t) / len(free)
    with PeakRSS() as rss_before:
        t = time.perf_counter()
        before = hf_generate(model, tokenizer, free, cfg.batch_size, args.max_new_tokens)
        t_before = (time.perf_counter() - t) / len(free)
    prompt_tokens = [len(score._prompt_ids(tokenizer, ex["prompt"])) for ex in free]
    new_tokens = [len(tokenizer(x, add_special_tokens=False)["input_ids"]) + 1 for x in texts]
    gen_tokens = (sum(prompt_tokens) + sum(new_tokens)) / len(free)
    return {"date": time.strftime("%Y-%m-%d"), "examples": len(free), "max_new_tokens": args.max_new_tokens,
            "seconds_per_example": t_gen, "tokens_per_example": gen_tokens,
            "baseline_seconds_per_example": t_before, "speedup": t_before / t_gen,
            "same_answers": sum(a == b for a, b in zip(texts, before)), "target_speedup": TARGET_GENERATION,
            "peak_rss_above_mb": rss.above_mb, "baseline_peak_rss_above_mb": rss_before.above_mb,
            "utilisation": {k: 2 * n_params * gen_tokens / t_gen / v for k, v in ceilings.items()},
            "matmul_bound": matmul_bound(model.config, cfg, args.max_new_tokens, prompt_tokens, new_tokens, prec)}


def matmul_bound(config, cfg, max_new_tokens: int, prompt_tokens: list[int], new_tokens: list[int],
                 prec: str) -> dict:
    """The fastest generation the model's own matmuls allow here (`matmul_seconds`), at the rows score.generate
    gives them: the prefill's at a prompt pass's padded tokens (batch_size x ROW_TOKENS), a decode step's at the
    largest decoding batch (CACHE_TOKENS over the shortest prompts plus the answer limit), with the LM head."""
    from mixtune.core import score
    from mixtune.core.model import micro_batches

    lengths = sorted(prompt_tokens)
    decode_rows = max(j - i for i, j in micro_batches([n + max_new_tokens for n in lengths], score.CACHE_TOKENS))
    prefill_rows = cfg.batch_size * score.ROW_TOKENS
    per_token = {"prefill": matmul_seconds(config, prefill_rows, prec, head=False, reps=3),
                 "decode": matmul_seconds(config, decode_rows, prec, head=True, reps=10)}
    seconds = (sum(prompt_tokens) * per_token["prefill"] + sum(new_tokens) * per_token["decode"]) / len(lengths)
    return {"prefill_rows": prefill_rows, "decode_rows": decode_rows, "precision": prec,
            "seconds_per_token": per_token, "seconds_per_example": seconds}


def matmul_seconds(config, rows: int, prec: str, head: bool, reps: int) -> float:
    """Seconds per token of the model's matmuls alone at `rows` rows, measured in this run: every layer's
    weights, each its own (read from memory as the model reads them), and with `head` the LM head. Attention,
    norms and the rest are left out: nothing that runs these matmuls at `prec` can be faster."""
    shapes = model_matmuls(config) * config.num_hidden_layers + ([(config.hidden_size, config.vocab_size)] if head
                                                                 else [])
    return 2 * sum(a * b for a, b in shapes) / shape_ceiling(shapes, rows, prec, reps)


def print_generation(gen: dict) -> None:
    g, b = gen["utilisation"], gen["matmul_bound"]
    print(f"generation {gen['seconds_per_example']:.3f} s/example ({gen['tokens_per_example']:.0f} tokens), "
          f"{g['fp32']:.0%} of fp32, {g['bf16']:.0%} of bf16, +{gen['peak_rss_above_mb']:.0f} MB; HF generate "
          f"{gen['baseline_seconds_per_example']:.3f} s, +{gen['baseline_peak_rss_above_mb']:.0f} MB: "
          f"{gen['speedup']:.1f}x, {gen['same_answers']} of {gen['examples']} answers the same")
    print(f"the model's matmuls alone ({b['precision']}; prefill at {b['prefill_rows']} rows, decode at "
          f"{b['decode_rows']}): {b['seconds_per_example']:.3f} s/example; {gen['target_speedup']:.0f}x HF generate "
          f"needs {gen['baseline_seconds_per_example'] / gen['target_speedup']:.3f} s")


if __name__ == "__main__":
    main()
