"""Parameter selection on a small linen CNN: selected vs requested fraction, and cost.

Writes benchmarks/results/selection.json with

* for ratios 0.02 … 0.5 and rule="highest" (per-layer budget): the selected
  fraction of all parameters and per layer, next to the requested ratio;
* the wall time of scores + mask (activation and gradient scores) relative to
  one jitted gradient of the loss on the same batch (medians after warm-up).

Run: python -m benchmarks.selection_bench [--quick] [--batch 128] [--repeats 30]
(``--quick``: 5 repeats). Also writes results/selection.md (a table of the same numbers).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

import gifjax.masks
import gifjax.selection as sel

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, table  # noqa: E402

RATIOS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)


class CNN(nn.Module):
    """28×28×1 → Conv 3×3 (8) → relu → pool → Conv 3×3 (16) → relu → pool → Dense(10)."""

    @nn.compact
    def __call__(self, x):
        x = nn.avg_pool(nn.relu(nn.Conv(8, (3, 3))(x)), (2, 2), (2, 2))
        x = nn.avg_pool(nn.relu(nn.Conv(16, (3, 3))(x)), (2, 2), (2, 2))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def median_seconds(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats (default 30; 5 with --quick)")
    parser.add_argument("--quick", action="store_true", help="5 timing repeats")
    parser.add_argument("--out", default=str(RESULTS / "selection.json"),
                        help="JSON path; the Markdown table goes next to it (.md)")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 5 if args.quick else 30

    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (args.batch, 28, 28, 1))
    y = jax.random.randint(ky, (args.batch,), 0, 10)
    model = CNN()
    variables = model.init(kp, x)
    params = variables["params"]

    def xent(logits):
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    def loss(p):
        return xent(model.apply({"params": p}, x))

    grad = jax.jit(jax.grad(loss))
    scores = sel.gradient_scores(model, variables, x, xent)

    fractions = []
    for ratio in RATIOS:
        mask = sel.select(params, scores, ratio, rule="highest", key=jax.random.key(1))
        rep = sel.report(mask, scores)
        fractions.append({
            "ratio": ratio,
            "selected_fraction": rep.fraction,
            "selected": rep.parameters,
            "total": rep.size,
            "per_layer": {"/".join(p): {"fraction": r.fraction, "parameters": r.parameters, "size": r.size,
                                        "whole_units": r.units, "partial_units": r.partial_units}
                          for p, r in rep.layers.items()},
        })

    def grad_once():
        jax.block_until_ready(grad(params))

    def scores_and_mask(kind):
        def run():
            s = (sel.gradient_scores(model, variables, x, xent) if kind == "gradient"
                 else sel.activation_scores(model, variables, x))
            jax.block_until_ready(sel.select(params, s, 0.05, key=jax.random.key(1)))
        return run

    def scores_only(kind):
        def run():
            jax.block_until_ready(sel.gradient_scores(model, variables, x, xent) if kind == "gradient"
                                  else sel.activation_scores(model, variables, x))
        return run

    t_grad = median_seconds(grad_once, args.repeats)
    timing = {"jitted_grad_s": t_grad}
    for kind in ("gradient", "activation"):
        t_total = median_seconds(scores_and_mask(kind), args.repeats)
        t_scores = median_seconds(scores_only(kind), args.repeats)
        timing[kind] = {"scores_plus_mask_s": t_total, "scores_s": t_scores,
                        "scores_plus_mask_over_grad": t_total / t_grad, "scores_over_grad": t_scores / t_grad}

    result = {
        "model": "linen CNN 28x28x1: Conv3x3(8)-relu-pool-Conv3x3(16)-relu-pool-Dense(10)",
        "parameters": gifjax.masks.size(params),
        "batch": args.batch,
        "rule": "highest (gradient scores), per-layer budget",
        "fractions": fractions,
        "timing": timing,
        "mask_ratio_for_timing": 0.05,
        "repeats": args.repeats,
        "quick": args.quick,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "jax": jax.__version__,
        "python": platform.python_version(),
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown(result) + "\n")
    for f in fractions:
        print(f"ratio {f['ratio']:.2f}: selected {f['selected_fraction']:.4f} ({f['selected']}/{f['total']})")
    print(json.dumps(timing, indent=2))


def markdown(result: dict) -> str:
    frac = table(["requested ratio", "selected fraction", "selected / total"],
                 [[f["ratio"], f["selected_fraction"], f"{f['selected']} / {f['total']}"]
                  for f in result["fractions"]])
    t = result["timing"]
    timing = table(["scores", "scores ms", "scores + mask ms", "scores ÷ grad", "scores + mask ÷ grad"],
                   [[kind, t[kind]["scores_s"] * 1e3, t[kind]["scores_plus_mask_s"] * 1e3,
                     t[kind]["scores_over_grad"], t[kind]["scores_plus_mask_over_grad"]]
                    for kind in ("gradient", "activation")])
    return (f"### Selection: selected vs requested fraction ({result['rule']})\n\n{frac}\n\n"
            f"### Scores + mask (ratio {result['mask_ratio_for_timing']:g}) vs one jitted gradient "
            f"({t['jitted_grad_s'] * 1e3:.3g} ms), batch {result['batch']}, median of "
            f"{result['repeats']}\n\n{timing}\n\n{result['model']}, {result['parameters']:,} "
            f"parameters, {result['backend']}.")


if __name__ == "__main__":
    main()
