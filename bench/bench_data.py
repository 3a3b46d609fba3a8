"""Benchmark of the data stages against their targets.

    (a) `mixtune prepare` on the real default inputs (params.yaml's prepare section: BBC News + the whole
        BIG-bench sdist): wall time < 180 s, peak RSS < 2 GB.
    (b) `mix.run` for a 1,000,000-example mix (500,000 specialist at generalist_share 0.5) from a synthetic
        prepared/ folder (600,000-line specialist train split, 1,000,000-line generalist pool, ~300-byte lines):
        median of 3 runs < 30 s. Beside it, as an in-run baseline, the time to read the same inputs and write
        the same number of output bytes (what `cp` would do), so the ratio means something on a noisy machine.

Each measurement runs in a fresh child process (its own peak RSS, no warm imports). Prints a table and writes
bench/results/data.json. Synthetic inputs are cached under .cache/bench/ (`make clean` removes them).

    python bench/bench_data.py [--params params.yaml] [--runs 3] [--skip-prepare]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "bench"
RESULTS = REPO / "bench" / "results" / "data.json"

PREPARE_TARGET_S, PREPARE_TARGET_RSS = 180.0, 2 * 1024**3
MIX_TARGET_S = 30.0
N_SPECIALIST, N_GENERALIST = 600_000, 1_000_000
MIX = {"specialist_size": 500_000, "generalist_share": 0.5, "seed": 0, "corrupt_generalist": 0.0}  # 500,000 + 500,000 = 1,000,000
SYNTHETIC_VERSION = "2"  # bump when the generator changes, so a stale cache is rebuilt

# --- child snippets: each reports {"seconds", "maxrss"} as JSON on its last stdout line ------------------------

_MIX_CHILD = """
import json, resource, sys, time
from pathlib import Path
from mixtune.stages import mix
from mixtune.plumbing.config import MixConfig
cfg, prepared, out = MixConfig(**json.loads(sys.argv[1])), Path(sys.argv[2]), Path(sys.argv[3])
t = time.perf_counter()
m = mix.run(cfg, prepared, out)
s = time.perf_counter() - t
print(json.dumps({"seconds": s, "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "total": m["total"], "bytes": (out / "train.jsonl").stat().st_size}))
"""

_COPY_CHILD = """
import json, resource, sys, time
from pathlib import Path
prepared, out, n_bytes = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
t = time.perf_counter()
out.mkdir(parents=True, exist_ok=True)
left = n_bytes
with open(out / "train.jsonl", "wb") as dst:  # read both inputs whole; write as many bytes as the mix does
    for src in (prepared / "specialist" / "train.jsonl", prepared / "generalist.jsonl"):
        data = memoryview(src.read_bytes())
        dst.write(data[:left])
        left -= min(left, len(data))
s = time.perf_counter() - t
print(json.dumps({"seconds": s, "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def child(code: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        sys.exit(f"benchmark child failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- (a) prepare on the real inputs ---------------------------------------------------------------------------


def bench_prepare(params: Path) -> dict:
    """Run the real command as a child; its peak RSS from RUSAGE_CHILDREN (so it must be the first child)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert before.ru_maxrss == 0, "prepare must be the first child process (ru_maxrss is a max over children)"
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        cmd = [sys.executable, "-m", "mixtune.cli", "--params", str(params), "prepare", "--root", str(REPO),
               "--out", str(Path(tmp) / "prepared")]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        wall = time.perf_counter() - t
        if proc.returncode:
            sys.exit(f"mixtune prepare failed:\n{proc.stderr}")
        stats = json.loads((Path(tmp) / "prepared" / "stats.json").read_text())
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "seconds": wall,
        "cpu_seconds": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "maxrss": after.ru_maxrss * 1024,
        "splits": stats["splits"],
        "generalist_read": sum(s["read"] for s in stats["generalist"].values()),
        "generalist_pool": stats["generalist_pool"],
        "generalist_tasks": stats["generalist_tasks"],
        "output": proc.stdout.strip(),
    }


# --- (b) mixing a million examples ------------------------------------------------------------------------------


def synthetic_prepared() -> Path:
    """prepared/ with N_SPECIALIST + N_GENERALIST normalized examples of ~300 bytes; built once, then cached."""
    root = CACHE / f"prepared-{N_SPECIALIST}-{N_GENERALIST}"
    stamp = root / ".complete"
    if stamp.is_file() and stamp.read_text() == SYNTHETIC_VERSION:
        return root
    from mixtune.core.schema import make_example
    from mixtune.plumbing.files import atomic_file, dumps

    rng = random.Random(0)
    vocab = sorted({"".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(20000)})
    labels = ["business", "entertainment", "politics", "sport", "tech"]

    def write(path: Path, n: int, source: str, tasks: list[str], classification: bool, words: int) -> None:
        with atomic_file(path) as f:
            for i in range(n):
                text = " ".join(rng.choices(vocab, k=words))
                label = labels[i % 5]
                f.write(dumps(make_example(
                    id=f"{source}/{i}", source=source, task=tasks[i % len(tasks)],
                    keywords=["topic classification"] if classification else ["arithmetic"], capability=None,
                    prompt=[{"role": "user", "content": text}],
                    completion=label if classification else " ".join(rng.choices(vocab, k=3)),
                    options=labels if classification else None)) + "\n")

    # ~330-byte specialist lines (the label set makes them longer), ~305-byte generalist lines
    write(root / "specialist" / "train.jsonl", N_SPECIALIST, "specialist", ["topic"], True, words=10)
    write(root / "generalist.jsonl", N_GENERALIST, "generalist", [f"task_{t}" for t in range(1000)], False, words=14)
    stamp.write_text(SYNTHETIC_VERSION)
    return root


def bench_mix(runs: int) -> dict:
    t = time.perf_counter()
    prepared = synthetic_prepared()
    setup = time.perf_counter() - t
    spec, gen = prepared / "specialist" / "train.jsonl", prepared / "generalist.jsonl"
    in_bytes = spec.stat().st_size + gen.stat().st_size
    out = CACHE / "mix-out"
    mixes, copies = [], []
    for _ in range(runs):  # interleaved, so drift on a shared machine hits both alike
        mixes.append(child(_MIX_CHILD, json.dumps(MIX), str(prepared), str(out)))
        copies.append(child(_COPY_CHILD, str(prepared), str(CACHE / "copy-out"), str(mixes[-1]["bytes"])))
    for scratch in (out, CACHE / "copy-out"):  # keep only the (reusable) synthetic inputs
        shutil.rmtree(scratch, ignore_errors=True)
    assert all(m["total"] == 1_000_000 for m in mixes)
    mix_s = statistics.median(m["seconds"] for m in mixes)
    copy_s = statistics.median(c["seconds"] for c in copies)
    return {
        "examples": mixes[0]["total"],
        "config": MIX,
        "input_lines": N_SPECIALIST + N_GENERALIST,
        "input_bytes": in_bytes,
        "mean_line_bytes": round(in_bytes / (N_SPECIALIST + N_GENERALIST), 1),
        "output_bytes": mixes[0]["bytes"],
        "runs_seconds": [round(m["seconds"], 3) for m in mixes],
        "seconds": mix_s,
        "maxrss": max(m["maxrss"] for m in mixes),
        "copy_runs_seconds": [round(c["seconds"], 3) for c in copies],
        "copy_seconds": copy_s,
        "ratio_to_copy": mix_s / copy_s,
        "synthetic_setup_seconds": round(setup, 1),
    }


# --- report -------------------------------------------------------------------------------------------------------


def gib(n: float) -> str:
    return f"{n / 1024**3:.2f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--skip-prepare", action="store_true")
    args = ap.parse_args()

    results: dict = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "targets": {"prepare_seconds": PREPARE_TARGET_S, "prepare_maxrss": PREPARE_TARGET_RSS,
                    "mix_1m_seconds": MIX_TARGET_S},
    }
    rows = []
    if not args.skip_prepare:
        print("prepare: running `mixtune prepare` on the real default inputs ...", flush=True)
        p = results["prepare"] = bench_prepare(args.params)
        p["ok"] = p["seconds"] < PREPARE_TARGET_S and p["maxrss"] < PREPARE_TARGET_RSS
        rows += [("prepare: wall time", f"{p['seconds']:.1f} s", f"< {PREPARE_TARGET_S:.0f} s",
                  p["seconds"] < PREPARE_TARGET_S),
                 ("prepare: peak RSS", gib(p["maxrss"]), f"< {gib(PREPARE_TARGET_RSS)}",
                  p["maxrss"] < PREPARE_TARGET_RSS)]
    print(f"mix: {args.runs} runs of a 1,000,000-example mix (synthetic inputs under {CACHE}) ...", flush=True)
    m = results["mix"] = bench_mix(args.runs)
    # After the prepare measurement: platform.platform() may run `uname` as a child process.
    results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "platform": platform.platform(), "processor": _cpu_model()}
    m["ok"] = m["seconds"] < MIX_TARGET_S
    rows += [("mix 1M: median wall time", f"{m['seconds']:.2f} s", f"< {MIX_TARGET_S:.0f} s", m["ok"]),
             ("mix 1M: peak RSS", gib(m["maxrss"]), "", None),
             ("cp-equivalent (same bytes)", f"{m['copy_seconds']:.2f} s", "baseline", None),
             ("mix / cp-equivalent", f"{m['ratio_to_copy']:.1f}x", "", None)]

    print()
    print(f"{'measurement':<30} {'value':>12}  {'target':<12} ok")
    print("-" * 60)
    for name, value, target, ok in rows:
        print(f"{name:<30} {value:>12}  {target:<12} {'' if ok is None else ('yes' if ok else 'NO')}")
    if "prepare" in results:
        p = results["prepare"]
        print(f"\nprepare: cpu {p['cpu_seconds']:.1f} s; {p['output']}")
    print(f"mix runs: {m['runs_seconds']} s; cp-equivalent runs: {m['copy_runs_seconds']} s; "
          f"inputs {m['input_bytes'] / 1e6:.0f} MB ({m['mean_line_bytes']} B/line), output {m['output_bytes'] / 1e6:.0f} MB")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {RESULTS.relative_to(REPO)}")
    if not all(r.get("ok", True) for r in (results.get("prepare", {}), results["mix"])):
        sys.exit(1)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
