"""What the benchmarks share: the machine's matmul ceiling, measured in the same run as the figure it bounds."""

from __future__ import annotations

import statistics
import time


def matmul_ceiling(dtype: str = "bf16", n: int = 2048, reps: int = 10) -> float:
    """FLOP/s of an n x n matmul at `dtype` (bf16 or fp32), the median of `reps`."""
    import torch

    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
    a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def model_matmuls(config, lora_r: int = 0) -> list[tuple[int, int]]:
    """(in, out) of every matmul a decoder layer of `config` runs per token: attention q, k, v, o, the MLP's
    gate, up and down, and with `lora_r` each LoRA adapter's A (in -> r) and B (r -> out) on them."""
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    base = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]
    if not lora_r:
        return base
    return base + [(a, lora_r) for a, _ in base] + [(lora_r, b) for _, b in base]


def shape_ceiling(shapes: list[tuple[int, int]], rows: int, dtype: str = "fp32", reps: int = 10) -> float:
    """FLOP/s of a model's own matmuls: `rows` x in @ in x out for each (in, out) in `shapes`, their times summed,
    the median of `reps`. What a forward pass's matmuls can reach on this machine at these widths, beside the
    square 2048 x 2048 ceiling (narrow and rank-16 matmuls run far below it). Each entry has a weight of its own
    (a shape listed once per layer reads its weights from memory as the model does; listed once, from cache);
    entries of the same input width share their input."""
    import torch

    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    inputs = {a: torch.randn(rows, a, dtype=dt) for a in {a for a, _ in shapes}}
    pairs = [(inputs[a], torch.randn(a, b, dtype=dt)) for a, b in shapes]
    for x, w in pairs:
        x @ w
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for x, w in pairs:
            x @ w
        times.append(time.perf_counter() - t)
    return 2 * rows * sum(a * b for a, b in shapes) / statistics.median(times)
