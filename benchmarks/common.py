"""Shared benchmark helpers: timing medians after warm-up, results I/O, digits data."""

from __future__ import annotations

import json
import os
import pathlib
import platform
import statistics
import time

import jax
import numpy as np

# Where results go; GIFJAX_BENCH_RESULTS overrides it (benchmarks.run --results, the tests).
RESULTS = pathlib.Path(os.environ.get("GIFJAX_BENCH_RESULTS")
                       or pathlib.Path(__file__).resolve().parent / "results")


def median_time(fn, *args, warmup: int = 3, reps: int = 20) -> float:
    """Median wall time (seconds) of ``fn(*args)`` after ``warmup`` calls (compile excluded)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def median_seconds(fn, *, warmup: int = 1, reps: int = 5) -> tuple[float, object]:
    """Median wall time of ``fn()`` after ``warmup`` calls, for any framework (``fn`` must
    finish its work before returning); also returns the last result."""
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def environment() -> dict:
    return {"jax": jax.__version__, "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "python": platform.python_version(),
            "machine": platform.machine(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def write(name: str, payload: dict, markdown: str) -> pathlib.Path:
    """Write results/<name>.json (with the environment) and results/<name>.md."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"environment": environment(), **payload}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2, default=float) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown.rstrip() + "\n")
    return RESULTS / f"{name}.json"


def digits(n: int | None = None, seed: int = 0):
    """scikit-learn's bundled 8×8 digits as (x [N, 8, 8, 1] standardised float32, y int32)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)
    x = (x - x.mean()) / x.std()
    y = data.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(y))[:n]
    return x[order, :, :, None], y[order]


def table(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
