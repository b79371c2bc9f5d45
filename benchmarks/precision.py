"""Mixed precision (issue 6): bfloat16 HVPs with float32 solver state vs float32 throughout.

    python -m benchmarks.precision [--quick]

On the digits MLP of ``benchmarks.lowrank`` (64 → 256 → 64 → 10, 33.7k
parameters, 1,200 training examples, Adam, weight decay 1e-3), three kinds of
curvature products, all with float32 solver state:

* ``f32``:        the plain loss;
* ``bf16 loss``:  ``gifjax.mixed_precision(loss)`` — everything in bfloat16;
* ``bf16 model``: ``gifjax.mixed_precision(apply_fn)`` inside a loss whose
  softmax cross-entropy (and L2) stay float32 — the matmuls in bfloat16;

at damping λ = 2|λ_min| (and, for contrast, λ = 0.1·λ_max):

1. H v: relative error against float64 (and against float32) over 8 random
   v, products taken as solvers take them (linearised once);
2. time per HVP, median after warm-up: a fresh jitted HVP, and the
   per-product cost inside a solver loop ((T(11) − T(1)) / 10, as in
   ``benchmarks.core``);
3. Δ for IF (CG) and GIF (LSTSQ, 20 % random mask) removing 12 examples:
   fixed budgets (rtol = 0) and tolerances 1e-2 / 1e-4; relative error
   against a float32 solve to 1e-6, the true residual (with the float32
   operator), HVPs, the converged flag and the failure code;
4. influence scores (500 train × 16 test, IF with CG rtol 1e-3 and GIF with
   LSTSQ rtol 1e-2): relative Frobenius error, per-test-point Spearman
   correlation and top-10 overlap against the same solver in float32.

Data enter the jitted functions as arguments (closed-over arrays would be
constant-folded by XLA, distorting compile and run times).

Writes benchmarks/results/precision.json and precision.md.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy.stats import spearmanr

import gifjax
from gifjax import masks, solvers, spectrum

from .common import median_time, table, write
from .core import num_params
from .lowrank import trained_digits_mlp

tree_map = jax.tree_util.tree_map


def flat(tree):
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in jax.tree_util.tree_leaves(tree)])


def rel(a, b):
    a, b = flat(a) if not isinstance(a, np.ndarray) else a, flat(b) if not isinstance(b, np.ndarray) else b
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def hvp_accuracy(variants, params, x, y, num=8):
    """Median relative error of H v against float64 (and against float32) over random v."""
    # data as arguments, not closed-over constants: XLA would constant-fold the primal pass
    op = jax.jit(lambda fn, v, p, x, y: gifjax.hessian_operator(fn, p, x, y)(v), static_argnums=0)
    vs = [tree_map(lambda a, k=k: jax.random.normal(k, a.shape, a.dtype), params)
          for k in jax.random.split(jax.random.key(3), num)]
    with jax.enable_x64(True):
        p64, x64 = tree_map(lambda a: jnp.asarray(a, jnp.float64), (params, x))
        ref = [flat(op(variants["f32"], tree_map(lambda a: jnp.asarray(a, jnp.float64), v), p64, x64, y))
               for v in vs]
    got = {name: [flat(op(fn, v, params, x, y)) for v in vs] for name, fn in variants.items()}
    errs = lambda a, b: [np.linalg.norm(u - w) / np.linalg.norm(w) for u, w in zip(a, b)]
    return {name: {"vs_f64_median": float(np.median(errs(h, ref))), "vs_f64_max": float(np.max(errs(h, ref))),
                   "vs_f32_median": float(np.median(errs(h, got["f32"])))} for name, h in got.items()}


def hvp_timing(variants, params, x, y, reps):
    v = tree_map(jnp.ones_like, params)
    out = {}
    for name, fn in variants.items():
        fresh = jax.jit(lambda v, p, x, y, fn=fn: gifjax.hvp(fn, p, v, x, y))

        def products(k, fn=fn):
            def run(v, p, x, y):
                op = gifjax.linearize_hvp(fn, p, x, y)
                return jax.lax.fori_loop(0, k, lambda i, a: tree_map(lambda ai, hi: ai + 1e-4 * hi, a, op(a)), v)
            return jax.jit(run)

        t_fresh = median_time(fresh, v, params, x, y, reps=reps)
        t_loop = (median_time(products(11), v, params, x, y, reps=reps)
                  - median_time(products(1), v, params, x, y, reps=reps)) / 10
        out[name] = {"fresh_hvp_ms": t_fresh * 1e3, "loop_product_ms": t_loop * 1e3}
    for name in variants:
        out[name]["fresh_over_f32"] = out[name]["fresh_hvp_ms"] / out["f32"]["fresh_hvp_ms"]
        out[name]["loop_over_f32"] = out[name]["loop_product_ms"] / out["f32"]["loop_product_ms"]
    return out


def delta_accuracy(variants, params, x, y, g, mask, lam, budgets, tols):
    """Δ of IF (CG) and GIF (LSTSQ) per variant, against a float32 solve to 1e-6."""
    loss = variants["f32"]
    H32 = jax.jit(lambda v, p, x, y, lam: gifjax.hessian_operator(loss, p, x, y, damping=lam)(v))
    H = lambda v: H32(v, params, x, y, lam)  # the float32 operator, for true residuals
    P = lambda v: masks.apply(mask, v)
    sub = lambda a, b: tree_map(jnp.subtract, a, b)
    norm = lambda t: float(np.linalg.norm(flat(t)))

    def true_residual(method, d):
        if method == "if":
            return norm(sub(H(d), g)) / norm(g)
        return norm(P(H(sub(H(P(d)), g)))) / norm(P(H(g)))  # GIF normal equations

    rows, out = [], {}
    for method, Solver in (("if", solvers.CG), ("gif", solvers.LSTSQ)):
        # the solver is a traced argument (rtol traced, max_steps static): few compiles
        solve = jax.jit(lambda fn, solver, p, g, x, y, mask, lam, method=method: gifjax.influence(
            fn, p, g, x, y, mask=mask, method=method, solver=solver, damping=lam), static_argnums=0)
        run = lambda fn, solver: solve(fn, solver, params, g, x, y, mask, lam)
        ref = run(loss, Solver(rtol=1e-6, max_steps=4000))
        configs = [(f"{k} steps", Solver(rtol=0.0, max_steps=k)) for k in budgets]
        configs += [(f"rtol {t:g}", Solver(rtol=t, max_steps=2000)) for t in tols]
        entry = {"reference": {"hvps": int(ref.num_hvps), "converged": bool(ref.converged),
                               "true_residual": true_residual(method, ref.delta)}}
        for label, solver in configs:
            entry[label] = {}
            for name, fn in variants.items():
                o = run(fn, solver)
                r = entry[label][name] = {
                    "hvps": int(o.num_hvps), "converged": bool(o.converged),
                    "failure": solvers.FAILURES[int(o.failure)], "reported_residual": float(o.residual_norm),
                    "true_residual": true_residual(method, o.delta),
                    "rel_err_vs_reference": rel(o.delta, ref.delta),
                    "delta_dtype": str(jax.tree_util.tree_leaves(o.delta)[0].dtype)}
                rows.append([method, label, name, r["hvps"], r["converged"], r["failure"],
                             r["true_residual"], r["rel_err_vs_reference"]])
        out[method] = entry
    md = table(["method", "solver", "products", "HVPs", "converged", "failure", "true rel. residual",
                "rel. error vs f32 1e-6 solve"], rows)
    return out, md


def score_accuracy(variants, params, example_loss, train_ex, test_ex, x, y, mask, lam):
    """Scores of each low-precision variant against float32 with the same solver."""
    out, rows = {}, []
    for method, solver in (("if", solvers.CG(rtol=1e-3, max_steps=2000)),
                           ("gif", solvers.LSTSQ(rtol=1e-2, max_steps=2000))):
        score = jax.jit(lambda fn, p, tr, te, x, y, mask, method=method, solver=solver: gifjax.influence_scores(
            fn, p, example_loss, tr, te, x, y, mask=mask, method=method, solver=solver,
            damping=lam, return_info=True), static_argnums=0)
        res = {name: score(fn, params, train_ex, test_ex, x, y, mask) for name, fn in variants.items()}
        b = np.asarray(res["f32"].scores, np.float64)
        out[method] = {"solver": repr(solver), "mean_hvps_f32": float(jnp.mean(res["f32"].solution.num_matvecs))}
        for name, r in res.items():
            if name == "f32":
                continue
            a = np.asarray(r.scores, np.float64)
            rho = [float(spearmanr(a[:, j], b[:, j])[0]) for j in range(a.shape[1])]
            top = lambda m, j: set(np.argsort(-m[:, j])[:10])
            overlap = [len(top(a, j) & top(b, j)) / 10 for j in range(a.shape[1])]
            e = out[method][name] = {
                "rel_frobenius_error": rel(a, b), "spearman_median": float(np.median(rho)),
                "spearman_min": float(np.min(rho)), "top10_overlap_mean": float(np.mean(overlap)),
                "mean_hvps": float(jnp.mean(r.solution.num_matvecs)),
                "converged_share": float(jnp.mean(r.solution.converged))}
            rows.append([method, repr(solver).split("(")[0] + f" rtol {solver.rtol:g}", name,
                         e["rel_frobenius_error"], e["spearman_median"], e["spearman_min"],
                         e["top10_overlap_mean"], out[method]["mean_hvps_f32"], e["mean_hvps"],
                         e["converged_share"]])
    md = table(["method", "solver", "products", "rel. error (Frobenius)", "Spearman median", "Spearman min",
                "top-10 overlap", "HVPs f32", "HVPs", "converged share"], rows)
    return out, md


def make_variants(model, loss, weight_decay=1e-3):
    """float32; the whole loss in bfloat16; the model in bfloat16 with a float32 loss on its logits."""
    apply16 = gifjax.mixed_precision(lambda p, x: model.apply({"params": p}, x))

    def model16_loss(params, x, y):
        nll = optax.softmax_cross_entropy_with_integer_labels(apply16(params, x), y).mean()
        return nll + 0.5 * weight_decay * sum(jnp.sum(p**2) for p in jax.tree_util.tree_leaves(params))

    return {"f32": loss, "bf16 loss": gifjax.mixed_precision(loss), "bf16 model": model16_loss}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller data, fewer repetitions")
    args = parser.parse_args(argv)
    quick = args.quick
    t_start = time.perf_counter()

    (x, y), (x_test, y_test), (model, params, loss) = trained_digits_mlp(quick)
    n_train = len(y)
    variants = make_variants(model, loss)
    example_loss = lambda p, ex: loss(p, ex[0][None], ex[1][None])
    out = {"quick": quick, "params": num_params(params), "n_train": n_train}
    print(f"MLP with {out['params']} parameters, {n_train} training examples", flush=True)

    eig = jax.jit(lambda p, x, y, which, steps: spectrum.eigenvalues(
        loss, p, x, y, k=1, which=which, num_steps=steps).values[0], static_argnums=(3, 4))
    lam_min, lam_max = float(eig(params, x, y, "smallest", 80)), float(eig(params, x, y, "largest", 40))
    dampings = {"2|λ_min|": 2 * abs(lam_min), "0.1·λ_max": 0.1 * lam_max}
    out["curvature"] = {"lambda_min": lam_min, "lambda_max": lam_max,
                        "dampings": {k: float(v) for k, v in dampings.items()}}
    sections = [f"MLP {out['params']} parameters, {n_train} digits; λ_min = {lam_min:.4g}, "
                f"λ_max = {lam_max:.4g}. Products: `f32` the plain loss; `bf16 loss` = "
                "`gifjax.mixed_precision(loss)` (everything in bfloat16); `bf16 model` = the model "
                "wrapped, `mixed_precision(apply_fn)`, its logits' cross-entropy in float32. Solver "
                "state is float32 in all three.\n"]

    out["hvp_accuracy"] = acc = hvp_accuracy(variants, params, x, y, 4 if quick else 8)
    sections.append("### H v accuracy (relative error, random v)\n\n" + table(
        ["products", "vs f64 (median)", "vs f64 (max)", "vs f32 (median)"],
        [[k, v["vs_f64_median"], v["vs_f64_max"], v["vs_f32_median"]] for k, v in acc.items()]))
    print(sections[-1], flush=True)

    out["hvp_time"] = tm = hvp_timing(variants, params, x, y, 5 if quick else 30)
    sections.append(f"### Time per HVP (batch {n_train}, ms, median after warm-up, XLA:CPU)\n\n" + table(
        ["products", "fresh HVP", "÷ f32", "per product in a solver loop", "÷ f32"],
        [[k, v["fresh_hvp_ms"], v["fresh_over_f32"], v["loop_product_ms"], v["loop_over_f32"]]
         for k, v in tm.items()]))
    print(sections[-1], flush=True)

    g = gifjax.removal_gradient(loss, params, x[:12], y[:12], num_train=n_train)
    mask = masks.random_mask(jax.random.key(2), params, fraction=0.2)
    budgets, tols = ((10, 50) if quick else (10, 50, 200)), (1e-2, 1e-4)
    out["delta"] = {}
    for label, lam in dampings.items():
        out["delta"][label], md = delta_accuracy(variants, params, x, y, g, mask, lam, budgets, tols)
        sections.append(f"### Δ removing 12 examples, damping {label} = {lam:.3g} (GIF: 20 % random mask)\n\n"
                        + md)
        print(sections[-1], flush=True)

    n_tr, n_te = (200, 8) if quick else (500, 16)
    out["scores"], md = score_accuracy(variants, params, example_loss, (x[:n_tr], y[:n_tr]),
                                       (x_test[:n_te], y_test[:n_te]), x, y, mask, dampings["2|λ_min|"])
    sections.append(f"### Influence scores {n_tr} train × {n_te} test, damping 2|λ_min|: against f32 "
                    "with the same solver\n\n" + md)
    print(sections[-1], flush=True)
    out["wall_s"] = time.perf_counter() - t_start
    path = write("precision", out, "\n\n".join(sections))
    print(f"wrote {path} ({out['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
