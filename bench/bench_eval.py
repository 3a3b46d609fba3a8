"""Label scoring against per-example generation on the default task, same model, examples and machine.

    scoring     score.predict: every label's log-likelihood, prompts batched, options on the shared KV cache
    generation  greedy generation one example at a time (max_new_tokens from params.yaml), the text mapped to
                a label (exact, else the first label it names): what a plain script does

Both for the tuned adapter (train/adapter) and the base model; seconds per example and accuracy of each.

    python bench/bench_eval.py [--examples 64]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "eval.json"
TARGET = 10.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    args = ap.parse_args()

    sys.path.insert(0, str(REPO / "src"))
    from mixtune import metrics
    from mixtune.config import load_section
    from mixtune.score import generate, label_from_text, predict
    from mixtune.files import read_jsonl, write_json
    from mixtune.model import load_adapter, load_base, load_tokenizer, resolve_base
    from mixtune.score import precision

    cfg = load_section("evaluate", args.params)
    base = resolve_base(load_section("model", args.params).base)
    examples = read_jsonl(REPO / "prepared" / "specialist" / "test.jsonl")[: args.examples]
    gold = [ex["completion"] for ex in examples]
    prec = precision()  # what predict scores at
    tokenizer = load_tokenizer(base)
    model = load_adapter(load_base(base), REPO / "train" / "adapter").eval()

    def run(name: str) -> dict:
        t = time.perf_counter()
        scored = predict(model, tokenizer, examples, cfg)
        t_score = (time.perf_counter() - t) / len(examples)
        t = time.perf_counter()
        texts = generate(model, tokenizer, examples, 1, cfg.max_new_tokens, prec)
        t_gen = (time.perf_counter() - t) / len(examples)
        generated = [label_from_text(x, ex["options"]) for x, ex in zip(texts, examples)]
        row = {"scoring_seconds_per_example": t_score, "generation_seconds_per_example": t_gen,
               "speedup": t_gen / t_score, "scoring_accuracy": metrics.accuracy(scored, gold),
               "generation_accuracy": metrics.accuracy(generated, gold)}
        print(f"{name:6} scoring {t_score:.3f} s/ex acc {row['scoring_accuracy']:.3f} | generation {t_gen:.3f} s/ex "
              f"acc {row['generation_accuracy']:.3f} | {row['speedup']:.1f}x", flush=True)
        return row

    result = {"examples": len(examples), "precision": prec, "max_new_tokens": cfg.max_new_tokens,
              "tuned": run("tuned")}
    with model.disable_adapter():
        result["base"] = run("base")
    result["target"] = TARGET
    write_json(RESULTS, result)
    ok = all(result[k]["speedup"] >= TARGET and result[k]["scoring_accuracy"] >= result[k]["generation_accuracy"]
             for k in ("tuned", "base"))
    print("PASS" if ok else "FAIL")


if __name__ == "__main__":
    main()
