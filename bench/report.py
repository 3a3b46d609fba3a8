"""One table of every benchmark figure: the figure, its baseline measured in the same run, the ratio, the target,
met or not, and when it was measured. Reads bench/results/*.json (each bench_*.py writes its own); a result
that is missing is a row that says so, not a gap. Writes bench/results/report.md (the README's performance
table is that file) and prints it.

    python bench/report.py
"""

from __future__ import annotations

import json
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
# Issue 26's targets, each against a baseline measured in the same run: training >= 5x a plain TRL script,
# label scoring >= 16x per-option scoring. MFU and utilisation (against the matmul ceilings measured in the same
# run) are shown, not targets. The stages' targets are in their result (bench_stages), generation's in eval.json.
TRAIN_SPEEDUP, SCORE_SPEEDUP = 5.0, 16.0


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _when(name: str, result: dict) -> str:
    """The result's own date where it records one, else its last commit's (a checkout's file times are the
    clone's), else its file's."""
    if result.get("when"):
        return result["when"][:10]
    path = RESULTS / f"{name}.json"
    dirty = subprocess.run(["git", "status", "--porcelain", "--", str(path)], cwd=REPO, capture_output=True,
                           text=True, check=False).stdout.strip()
    committed = subprocess.run(["git", "log", "-1", "--format=%cs", "--", str(path)], cwd=REPO,
                               capture_output=True, text=True, check=False).stdout.strip()
    if committed and not dirty:
        return committed
    return datetime.fromtimestamp(os.path.getmtime(path), UTC).date().isoformat()


def rows() -> list[tuple[str, str, str, str, str, str]]:
    """(what, mixtune, baseline in the same run, ratio, target, met) per figure."""
    out: list[tuple[str, str, str, str, str, str]] = []

    def row(what, value, baseline="", ratio="", target="", met=None):
        out.append((what, value, baseline, ratio, target, "" if met is None else ("**met**" if met else "missed")))

    def missing(name, command):
        row(f"{name}: not measured", f"run `{command}`")

    def bound(what, b, needed, target):
        """The model's matmuls alone, timed in the same run: the least time any method can take here."""
        row(f"{what}: the model's matmuls alone ({b['precision']}, same run)",
            f"{b['seconds_per_example']:.3f} s/example", "", "",
            f"{target} needs {needed:.3f} s: " + ("within reach" if b["seconds_per_example"] < needed
                                                  else "below what these matmuls allow"))

    if (d := _load("data")) is None:
        missing("prepare, mix", "python bench/bench_data.py")
    else:
        p, m, t = d["prepare"], d["mix"], d["targets"]
        row("`prepare` on the default inputs: wall time", f"{p['seconds']:.1f} s", "", "",
            f"< {t['prepare_seconds']:.0f} s", p["seconds"] < t["prepare_seconds"])
        row("`prepare`: peak RSS", f"{p['maxrss'] / 2**20:.0f} MB", "", "", f"< {t['prepare_maxrss'] / 2**20:.0f} MB",
            p["maxrss"] < t["prepare_maxrss"])
        row("mix 1,000,000 examples (median of 3)", f"{m['seconds']:.2f} s",
            f"read + write the same bytes: {m['copy_seconds']:.2f} s", f"{m['ratio_to_copy']:.0f}x the copy",
            f"< {t['mix_1m_seconds']:.0f} s", m["seconds"] < t["mix_1m_seconds"])

    for name, what in (("train", "the default mix"), ("train_short", "short examples (prompts < 50 tokens)")):
        if (d := _load(name)) is None:
            missing(f"training on {what}", "python bench/bench_train.py" + (" --short" if "short" in name else ""))
            continue
        tps, mfu = d["tokens_per_second"], d["mfu"]
        row(f"training on {what}, non-padding tokens/s (median of {len(d['runs']['mixtune'])} runs of "
            f"{d['steps']} steps)", f"{tps['mixtune']:.0f} tokens/s, MFU {mfu['mixtune']:.0%}",
            f"plain TRL script: {tps['baseline']:.0f} tokens/s, MFU {mfu['baseline']:.0%}", f"{d['speedup']:.2f}x",
            f">= {TRAIN_SPEEDUP:.0f}x (bf16 ceiling {d['bf16_matmul_gflops']:.0f} GFLOP/s, same run)",
            d["speedup"] >= TRAIN_SPEEDUP)
        m = d["model_shapes"]
        row(f"training on {what}: the model's own matmuls ({d['precision']}, {m['rows']} rows, same run)",
            f"{m['efficiency']['mixtune']:.0%} of {m['gflops']:.0f} GFLOP/s", f"{m['efficiency']['baseline']:.0%}",
            f"{TRAIN_SPEEDUP:.0f}x needs {TRAIN_SPEEDUP * tps['baseline'] / m['tokens_per_second']:.0%}")

    if (d := _load("memory")) is None:
        missing("training memory", "python bench/bench_memory.py")
    else:
        for share, r in d["shares"].items():
            b, m = r["baseline"], r["mixtune"]
            row(f"training memory, share {float(share):.1f} ({d['steps']} steps, passes of <= {m['micro_tokens']} "
                f"tokens)", f"{m['peak_rss_mb']:.0f} MB peak, {m['seconds']:.0f} s",
                f"{d['baseline_rows']} rows a pass: {b['peak_rss_mb']:.0f} MB, {b['seconds']:.0f} s",
                f"{r['speedup']:.2f}x the speed", f"<= {d['target_rss_mb']:.0f} MB, no slower", r["met"])
        c = d["kernel_cache"]
        b, m = c["baseline"], c["mixtune"]
        row(f"training memory, share {c['share']:.1f} ({c['steps']} steps): oneDNN's kernel cache bounded",
            f"{m['peak_rss_mb']:.0f} MB peak, {m['seconds']:.0f} s",
            f"oneDNN's default ({c['baseline_capacity']} kernels): {b['peak_rss_mb']:.0f} MB, {b['seconds']:.0f} s",
            f"{c['speedup']:.2f}x the speed", f"<= {d['target_rss_mb']:.0f} MB, no slower", c["met"])
        a = d["attention"]
        b, m = a["baseline"], a["mixtune"]
        row(f"training memory, share {a['share']:.1f} ({a['steps']} steps, median of 2): attention scores "
            f"recomputed in backward", f"{m['peak_rss_mb']:.0f} MB peak, {m['seconds']:.0f} s",
            f"kept (eager): {b['peak_rss_mb']:.0f} MB, {b['seconds']:.0f} s",
            f"{a['speedup']:.2f}x the speed", f"<= {d['target_rss_mb']:.0f} MB, no slower, same loss",
            a["met"] and a["same_loss"])

    if (d := _load("eval")) is None or "scoring" not in d:
        missing("scoring", "python bench/bench_eval.py")
    else:
        s, n, g, c = d["scoring"], d["naive"], d["generation"], d["ceiling_gflops"]
        row(f"label scoring ({d['examples']} test articles, {d['tokens_per_example']:.0f} tokens each, fp32)",
            f"{s['seconds_per_example']:.3f} s/example", f"per-option scoring: {n['seconds_per_example']:.3f} s",
            f"{d['speedup']:.1f}x", f">= {SCORE_SPEEDUP:.0f}x, scores within 1e-4: {d['max_abs_difference']:.0e}",
            d["speedup"] >= SCORE_SPEEDUP and d["max_abs_difference"] <= 1e-4)
        row(f"scoring utilisation (fp32 ceiling {c['fp32']:.0f}, bf16 {c['bf16']:.0f} GFLOP/s, same run)",
            f"{s['utilisation']['bf16']:.0%} of bf16", f"{s['utilisation']['fp32']:.0%} of fp32")
        b = d["matmul_bound"]
        bound(f"label scoring ({b['rows']} rows)", b, n["seconds_per_example"] / SCORE_SPEEDUP, f"{SCORE_SPEEDUP:.0f}x")
        row("scoring: peak RSS above the loaded model", f"{s['peak_rss_above_model_mb']:.0f} MB")
        row(f"generation ({g['examples']} free-form questions, up to {g['max_new_tokens']} new tokens, greedy; "
            f"{g['model']}, {g['date']})",
            f"{g['seconds_per_example']:.3f} s/example, {g['utilisation']['fp32']:.0%} of fp32, "
            f"+{g['peak_rss_above_mb']:.0f} MB",
            f"HF generate in batches: {g['baseline_seconds_per_example']:.3f} s, "
            f"+{g['baseline_peak_rss_above_mb']:.0f} MB",
            f"{g['speedup']:.1f}x",
            f">= {g['target_speedup']:.0f}x, same answers: {g['same_answers']} of {g['examples']}",
            g["speedup"] >= g["target_speedup"] and g["same_answers"] == g["examples"])
        b = g["matmul_bound"]
        bound(f"generation (prefill at {b['prefill_rows']} rows, decode at {b['decode_rows']})", b,
              g["baseline_seconds_per_example"] / g["target_speedup"], f"{g['target_speedup']:.0f}x")

    if (d := _load("search")) is None or "tasks" not in d:  # an older search's result measures another method
        missing("search against an 11-point grid", "python bench/bench_search.py")
    else:
        for task, t in d["tasks"].items():
            g, se = t["test_gap"], t["search"]
            when = t["when"][:10] if t.get("when") else _when("search", d)  # each task is measured on its own day
            row(f"`search` on {task} against an 11-point grid ({when}): test {t['metric']}",
                f"r={se['recommended_share']:.2f}: {se['test']:.3f}, {t['search_tokens']:,} tokens",
                f"grid best r={t['grid_best_share']:.1f}: {t['grid_best_test']:.3f}, {t['grid_tokens']:,} tokens",
                f"{g['value']:+.3f} [{g['low']:+.3f}, {g['high']:+.3f}]; {t['token_ratio']:.2f} of the tokens",
                f"interval reaches 0, <= {d['target']['max_token_ratio']:.1f} of the tokens", t["met"])

    if (d := _load("stages")) is None:
        missing("the default pipeline's stages", "make run && python bench/bench_stages.py")
    else:
        rss_mb, mlflow_share, pipeline_s = (d["targets"][k] for k in ("peak_rss_mb", "mlflow_share", "total_seconds"))
        for stage, r in d["stages"].items():
            share, rss, secs = r.get("mlflow_share"), r.get("peak_rss_mb"), r.get("seconds")
            # register's work is MLflow's (logging and registering the model): its share is no overhead
            overhead = share is not None and stage != "register"
            row(f"`{stage}` stage of `make run`" + (" (time: bench_data)" if stage == "prepare" else ""),
                ", ".join(x for x in ("" if secs is None else f"{secs:.0f} s", f"{rss:.0f} MB peak" if rss else "")
                          if x),
                "", f"MLflow {share:.1%}" if share is not None else "",
                f"<= {rss_mb:.0f} MB" + (f", MLflow < {mlflow_share:.0%}" if overhead else ""),
                rss is not None and rss <= rss_mb and (not overhead or share < mlflow_share))
        row("`make run` after set-up (the stages above)", f"{d['total_seconds'] / 60:.1f} min", "", "",
            f"<= {pipeline_s / 60:.0f} min", d["total_seconds"] <= pipeline_s)
    return out


def table() -> str:
    head = ("what", "mixtune", "baseline, same run", "ratio", "target", "")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows()]
    return "\n".join(lines) + "\n"


def main() -> None:
    text = table()
    tmp = RESULTS / "report.md.tmp"
    tmp.write_text(text)
    tmp.replace(RESULTS / "report.md")
    print(text, end="")


if __name__ == "__main__":
    main()
