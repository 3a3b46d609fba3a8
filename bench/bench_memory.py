"""Training memory against speed: micro-batches by a token budget (`train.micro_tokens`) against today's baseline
of 4 rows a pass, same model, mixes and machine, one run.

    baseline  each step's 8 rows in passes of 4 (the code before micro_tokens), each cut to its longest row
    mixtune   passes of at most train.micro_tokens padded tokens (rows x the longest of them)

Each (method, mix) trains `--steps` steps in a process of its own, so its peak RSS is its own; the first steps
are the longest batches (the length-grouped sampler puts the longest first, so the peak is reached). Mixes: the
top of the searched range (r=0.9: 576 generalist examples beside 64 task examples, the long rows) and the pure
specialist (r=0: short rows), sampled by the mix stage from prepared/. Runs alternate baseline and mixtune.

Then oneDNN's kernel cache, which grows with the shapes a run has seen (so over more steps, `--cache-steps`):
mixtune's bound (ONEDNN_PRIMITIVE_CACHE_CAPACITY=64, core/model.py) against oneDNN's default of 1024, r=0.9.

Then attention (`--attention-steps`, r=0.9, two alternating pairs): mixtune's eager attention whose scores a
training pass recomputes in backward (core/model.py, `_eager_recomputed`) against eager attention that keeps
them, with the train_loss of each (bit for bit the same). `--attention-only` runs only this part and updates it
in memory.json.

    python bench/bench_memory.py [--steps 8] [--cache-steps 40] [--attention-steps 25] [--attention-only]

Writes bench/results/memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "memory.json"
TARGET_RSS_MB = 3072.0  # issue 26: every stage of make run within 3 GB
BASELINE_ROWS = 4
ONEDNN_DEFAULT = "1024"  # oneDNN's own kernel cache capacity, the baseline of the cache comparison


def train_once(method: str, share: float, steps: int) -> dict:
    """In this process: mix at `share`, train `steps` steps, the time of each and the peak RSS."""
    sys.path.insert(0, str(REPO / "src"))
    from transformers import TrainerCallback

    from mixtune.core import tune
    from mixtune.core.model import resolve_base, train_precision
    from mixtune.plumbing.config import load_section
    from mixtune.plumbing.files import read_jsonl
    from mixtune.stages import mix

    cfg = load_section("train", REPO / "params.yaml").model_copy(update={"max_steps": steps, "save_steps": 10**6})
    if method == "baseline":  # today's passes: a fixed number of rows, whatever their length
        tune.micro_batches = lambda lengths, budget: [(i, min(i + BASELINE_ROWS, len(lengths)))
                                                      for i in range(0, len(lengths), BASELINE_ROWS)]
    mix_cfg = load_section("mix", REPO / "params.yaml").model_copy(update={"generalist_share": share})
    with tempfile.TemporaryDirectory() as tmp:
        mix.run(mix_cfg, REPO / "prepared", Path(tmp) / "mix")
        examples = read_jsonl(Path(tmp) / "mix" / "train.jsonl")
        base = resolve_base(load_section("model", REPO / "params.yaml").base)
        trainer = tune.build_trainer(cfg, base, examples, Path(tmp) / "out", train_precision(cfg.precision))
        trainer.args.set_save(strategy="no")
        if method == "kept":  # eager attention that keeps its probabilities for backward; passes as mixtune's
            trainer.model.set_attn_implementation("eager")
        stamps: list[float] = []

        class Clock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                stamps.append(time.perf_counter())

            def on_step_end(self, args, state, control, **kw):
                stamps.append(time.perf_counter())

        trainer.add_callback(Clock())
        trainer.train()
    step_seconds = [b - a for a, b in zip(stamps[::2], stamps[1::2])]
    return {"method": method, "share": share, "micro_tokens": cfg.micro_tokens, "step_seconds": step_seconds,
            "seconds": sum(step_seconds), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "train_loss": trainer.state.log_history[-1].get("train_loss")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--cache-steps", type=int, default=40)
    ap.add_argument("--attention-steps", type=int, default=25)
    ap.add_argument("--attention-only", action="store_true")
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "SHARE"), help=argparse.SUPPRESS)  # a child process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(train_once(args.one[0], float(args.one[1]), args.steps)))
        return
    attention = compare_attention(args.attention_steps)
    if args.attention_only:
        result = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"target_rss_mb": TARGET_RSS_MB}
        result["attention"] = attention
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        return
    runs = []
    for share in (0.9, 0.0):
        for method in ("baseline", "mixtune"):
            runs.append(child(method, share, args.steps))
    cache = {"steps": args.cache_steps, "share": 0.9, "baseline_capacity": ONEDNN_DEFAULT,
             "baseline": child("mixtune", 0.9, args.cache_steps, ONEDNN_DEFAULT),
             "mixtune": child("mixtune", 0.9, args.cache_steps)}
    cache.update(compare(cache["baseline"], cache["mixtune"]))
    by = {(r["method"], r["share"]): r for r in runs}
    shares = {}
    for share in (0.9, 0.0):
        b, m = by[("baseline", share)], by[("mixtune", share)]
        shares[str(share)] = {"baseline": b, "mixtune": m, **compare(b, m)}
    result = {"steps": args.steps, "baseline_rows": BASELINE_ROWS, "target_rss_mb": TARGET_RSS_MB, "shares": shares,
              "kernel_cache": cache, "attention": attention}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: {"speedup": round(v["speedup"], 2), "peak_mb": round(v["mixtune"]["peak_rss_mb"]),
                          "baseline_peak_mb": round(v["baseline"]["peak_rss_mb"])} for k, v in shares.items()}))
    print(f"kernel cache: {cache['mixtune']['peak_rss_mb']:.0f} MB peak against oneDNN's default "
          f"{cache['baseline']['peak_rss_mb']:.0f} MB, {cache['speedup']:.2f}x the speed")


def compare_attention(steps: int) -> dict:
    """Scores recomputed (mixtune) against kept (eager), r=0.9, alternating twice: the median of each, and the
    losses, which must be the same bit for bit."""
    import statistics

    runs: dict[str, list[dict]] = {"kept": [], "mixtune": []}
    for _ in range(2):
        for method in ("kept", "mixtune"):
            runs[method].append(child(method, 0.9, steps))
    med = {m: {"seconds": statistics.median(r["seconds"] for r in rs),
               "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs)} for m, rs in runs.items()}
    losses = {r["train_loss"] for rs in runs.values() for r in rs}
    print(f"attention recomputed: {med['mixtune']['peak_rss_mb']:.0f} MB peak, {med['mixtune']['seconds']:.0f} s "
          f"against kept: {med['kept']['peak_rss_mb']:.0f} MB, {med['kept']['seconds']:.0f} s; "
          f"train_loss {sorted(losses)}")
    return {"steps": steps, "share": 0.9, "runs": runs, "baseline": med["kept"], "mixtune": med["mixtune"],
            "same_loss": len(losses) == 1, **compare(med["kept"], med["mixtune"])}


def compare(baseline: dict, mixtune: dict) -> dict:
    """Met: within the memory target and no slower than the baseline (5%: the noise of one run here)."""
    speedup = baseline["seconds"] / mixtune["seconds"]
    return {"speedup": speedup, "saved_mb": baseline["peak_rss_mb"] - mixtune["peak_rss_mb"],
            "met": mixtune["peak_rss_mb"] <= TARGET_RSS_MB and mixtune["seconds"] <= baseline["seconds"] * 1.05}


def child(method: str, share: float, steps: int, onednn_capacity: str | None = None) -> dict:
    """One training run in a process of its own (its peak RSS its own; oneDNN reads its cache setting once)."""
    env = dict(os.environ)
    env.pop("ONEDNN_PRIMITIVE_CACHE_CAPACITY", None)  # mixtune's own bound unless the baseline's is asked for
    if onednn_capacity:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = onednn_capacity
    out = subprocess.run([sys.executable, __file__, "--steps", str(steps), "--one", method, str(share)],
                         check=True, capture_output=True, text=True, env=env).stdout
    r = json.loads(out.strip().splitlines()[-1])
    r["onednn_cache_capacity"] = onednn_capacity or "mixtune's"
    print(f"r={share:g} {method}{' oneDNN cache ' + onednn_capacity if onednn_capacity else ''}: "
          f"{r['seconds']:.1f} s for {steps} steps, {r['peak_rss_mb']:.0f} MB peak", flush=True)
    return r


if __name__ == "__main__":
    main()
