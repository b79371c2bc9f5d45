"""Quick demo: influence estimates vs actual retraining on a small logistic model.

Run ``python -m gifjax.demo``. Trains an L2-regularised logistic regression on
generated data, removes a group of training points, and compares the
parameter change predicted by IF / PIF / FIF / GIF (with a 50 % mask) to the
change found by retraining. Runs offline in seconds on a CPU.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.flatten_util
import jax.numpy as jnp

import gifjax


def _example_loss(p, xy):
    logit = xy[0] @ p["w"] + p["b"]
    return jnp.logaddexp(0.0, logit) - xy[1] * logit


def _objective(p, X, y, reg=1e-2):
    return jnp.mean(jax.vmap(_example_loss, (None, 0))(p, (X, y))) + 0.5 * reg * p["w"] @ p["w"]


def _fit(X, y, params, steps=200):
    """Newton's method: the objective is smooth and convex, so this converges exactly."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    f = lambda v: _objective(unravel(v), X, y)
    for _ in range(steps // 20):
        flat = flat - jnp.linalg.solve(jax.hessian(f)(flat), jax.grad(f)(flat))
    return unravel(flat)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m gifjax.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400, help="training examples (default 400)")
    parser.add_argument("--remove", type=int, default=20, help="examples removed (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0 < args.remove < args.n:
        parser.error(f"--remove must be in (0, --n); got {args.remove} with --n {args.n}")

    jax.config.update("jax_enable_x64", True)
    kx, kw = jax.random.split(jax.random.key(args.seed))
    X = jax.random.normal(kx, (args.n, 20))
    y = (X @ jax.random.normal(kw, (20,)) + 0.5 * jax.random.normal(kw, (args.n,)) > 0).astype(X.dtype)
    params = _fit(X, y, {"w": jnp.zeros(20), "b": jnp.zeros(())})
    m = args.remove
    truth = jax.tree_util.tree_map(jnp.subtract, _fit(X[m:], y[m:], params), params)
    g = gifjax.removal_gradient(_objective, params, X[:m], y[:m], num_train=args.n)
    mask = {"w": jnp.arange(20) < 10, "b": jnp.array(True)}
    truth_flat = jax.flatten_util.ravel_pytree(truth)[0]

    print(f"removing {m} of {args.n} examples; mask: 11 of 21 parameters")
    print(f"{'method':6s} {'cos(Δ, retrained)':>18s} {'rel. error':>11s} {'HVPs':>5s} {'time s':>7s}")
    for method in gifjax.METHODS:
        t0 = time.perf_counter()
        out = gifjax.influence(_objective, params, g, X[m:], y[m:], mask=mask, method=method)
        d = jax.flatten_util.ravel_pytree(out.delta)[0]
        d.block_until_ready()
        # compare on the coordinates each method may change
        ref = truth_flat if method == "if" else jax.flatten_util.ravel_pytree(gifjax.masks.apply(mask, truth))[0]
        cos = float(d @ ref / (jnp.linalg.norm(d) * jnp.linalg.norm(ref)))
        err = float(jnp.linalg.norm(d - ref) / jnp.linalg.norm(ref))
        print(f"{method:6s} {cos:18.4f} {err:11.4f} {int(out.num_hvps):5d} {time.perf_counter() - t0:7.2f}")


if __name__ == "__main__":
    main()
