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
