"""Core benchmarks (issue 2): HVP cost, solver HVP counts for GIF, vmap vs loop.

    python -m benchmarks.core [--quick]

1. masked HVP time ÷ gradient time on one batch (median after warm-up) for an
   MLP and a CNN with ≥ 50k parameters (target ≤ 2.0);
2. HVPs needed by LSTSQ, CG (normal equations) and the paper's Richardson to
   reach a relative normal-equation residual of 1e-6 for GIF at 5 % and 20 %
   masks on an MLP trained on scikit-learn's digits (float64; target: LSTSQ
   ≥ 20× fewer HVPs than Richardson, whose budget is 20× LSTSQ's count);
3. one vmapped solve over 32 test points vs a Python loop of 32 jitted solves.

Writes benchmarks/results/core.json and core.md.
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import gifjax
from gifjax import masks, solvers

from .common import digits, median_time, table, write


class MLP(nn.Module):
    hidden: tuple = (256, 256)

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        for h in self.hidden:
            x = jnp.tanh(nn.Dense(h)(x))
        return nn.Dense(10)(x)


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        x = nn.relu(nn.Conv(64, (3, 3))(x))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def make_loss(model, weight_decay=1e-3):
    def loss(params, x, y):
        logits = model.apply({"params": params}, x)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return nll + 0.5 * weight_decay * sum(jnp.sum(p**2) for p in jax.tree_util.tree_leaves(params))
    return loss


def num_params(params):
    return sum(p.size for p in jax.tree_util.tree_leaves(params))


def hvp_cost(quick: bool):
    """Part 1: masked HVP time relative to one gradient on the same batch.

    Two numbers per model: a fresh masked HVP P H P v (jvp of grad, primal
    recomputed), and the per-product cost inside a solver loop, where gifjax
    linearises once and each product runs only the tangent passes; the latter
    is measured as (T(11 products) − T(1 product)) / 10 in one jitted loop.
    """
    x, y = digits(512)
    rows, out = [], {}
    reps = 5 if quick else 20
    for name, model in {"mlp": MLP(), "cnn": CNN()}.items():
        params = model.init(jax.random.key(0), x[:1])["params"]
        loss = make_loss(model)
        mask = masks.random_mask(jax.random.key(1), params, fraction=0.05)
        v = jax.tree_util.tree_map(jnp.ones_like, params)
        grad = jax.jit(jax.grad(loss))
        masked = jax.jit(lambda p, v, m: gifjax.masked_hvp(loss, p, v, m, x, y))

        def products(k):
            def run(p, v, m):
                op = gifjax.linearize_hvp(loss, p, x, y)
                step = lambda i, a: jax.tree_util.tree_map(
                    lambda ai, hi: ai + 1e-4 * hi, a, masks.apply(m, op(masks.apply(m, a))))
                return jax.lax.fori_loop(0, k, step, v)
            return jax.jit(run)

        t_grad = median_time(grad, params, x, y, reps=reps)
        t_hvp = median_time(masked, params, v, mask, reps=reps)
        t_loop = (median_time(products(11), params, v, mask, reps=reps)
                  - median_time(products(1), params, v, mask, reps=reps)) / 10
        out[name] = {"params": num_params(params), "batch": len(y), "grad_s": t_grad,
                     "masked_hvp_s": t_hvp, "loop_product_s": t_loop,
                     "masked_hvp_over_grad": t_hvp / t_grad, "loop_product_over_grad": t_loop / t_grad}
        rows.append([name, num_params(params), t_grad * 1e3, t_hvp * 1e3, t_hvp / t_grad,
                     t_loop * 1e3, t_loop / t_grad])
    md = table(["model", "params", "grad ms", "masked HVP ms", "HVP / grad",
                "per product in a solver loop ms", "loop product / grad"], rows)
    return out, md


def train_small_mlp(x, y, steps):
    model = MLP(hidden=(32,))
    params = model.init(jax.random.key(0), x[:1])["params"]
    loss = make_loss(model)
    opt = optax.adam(1e-2)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss)(params, x, y)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    return model, params, loss


def gif_hvp_counts(quick: bool):
    """Part 2: HVPs to a relative normal residual of 1e-6 for GIF (float64)."""
    with jax.enable_x64(True):
        x, y = digits(600 if quick else 1200)
        x, y = jnp.asarray(x, jnp.float64), jnp.asarray(y)
        model, params, loss = train_small_mlp(x, y, 200 if quick else 500)
        params = jax.tree_util.tree_map(lambda p: p.astype(jnp.float64), params)
        g = gifjax.removal_gradient(loss, params, x[y == 0], y[y == 0], num_train=len(y))
        rows, out = [], {}
        for ratio in (0.05, 0.2):
            mask = masks.random_mask(jax.random.key(2), params, fraction=ratio)
            run = lambda s: gifjax.influence(loss, params, g, x, y, mask=mask, method="gif", solver=s)
            ls = run(solvers.LSTSQ(rtol=1e-6, max_steps=20000))
            cg = run(solvers.CG(rtol=1e-6, max_steps=20000))
            # Richardson's best case: a normaliser set from the top eigenvalue of the normal operator
            H = gifjax.hessian_operator(loss, params, x, y)
            normal = lambda v: masks.apply(mask, H(H(masks.apply(mask, v))))
            lam = float(solvers.power_iteration(normal, params, key=jax.random.key(0), num_steps=50))
            budget = 20 * int(ls.num_hvps)
            rich = run(solvers.Richardson(normalizer=0.6 * lam, normalizer_step=0.1 * lam, rtol=1e-6,
                                          max_steps=budget // 2))
            rhs = jnp.sqrt(sum(jnp.sum(a**2) for a in jax.tree_util.tree_leaves(
                masks.apply(mask, H(g)))))
            ref = ls.delta
            err = lambda d: float(jnp.sqrt(sum(jnp.sum((a - b) ** 2) for a, b in zip(
                jax.tree_util.tree_leaves(d), jax.tree_util.tree_leaves(ref)))) / jnp.sqrt(
                sum(jnp.sum(b**2) for b in jax.tree_util.tree_leaves(ref))))
            entry = {}
            for name, res in (("lstsq", ls), ("cg_normal", cg), ("richardson", rich)):
                entry[name] = {"hvps": int(res.num_hvps), "converged": bool(res.converged),
                               "rel_normal_residual": float(res.residual_norm / rhs),
                               "rel_diff_to_lstsq": err(res.delta)}
                rows.append([f"{ratio:.0%}", name, int(res.num_hvps), bool(res.converged),
                             float(res.residual_norm / rhs), err(res.delta)])
            entry["richardson_over_lstsq_hvps"] = int(rich.num_hvps) / int(ls.num_hvps)
            entry["richardson_budget_hvps"] = budget
            out[f"{ratio:.2f}"] = entry
        out["params"] = num_params(params)
    md = table(["mask", "solver", "HVPs", "converged", "rel. normal residual", "rel. diff to LSTSQ"], rows)
    return out, md


def vmap_vs_loop(quick: bool):
    """Part 3: 32 GIF solves (one per test point) vmapped vs a Python loop."""
    x, y = digits(512)
    x, y = jnp.asarray(x), jnp.asarray(y)
    model, params, loss = train_small_mlp(x, y, 100)
    mask = masks.random_mask(jax.random.key(2), params, fraction=0.2)
    example_loss = lambda p, xi, yi: loss(p, xi[None], yi[None])
    G = jax.vmap(jax.grad(example_loss), (None, 0, 0))(params, x[:32], y[:32])
    solve = jax.jit(lambda g: gifjax.influence(loss, params, g, x, y, mask=mask, method="gif",
                                               solver=solvers.LSTSQ(rtol=1e-4, max_steps=100)).delta)
    batched = jax.jit(jax.vmap(lambda g: gifjax.influence(
        loss, params, g, x, y, mask=mask, method="gif",
        solver=solvers.LSTSQ(rtol=1e-4, max_steps=100)).delta))
    singles = [jax.tree_util.tree_map(lambda a: a[i], G) for i in range(32)]
    reps = 2 if quick else 5
    t_loop = median_time(lambda: [solve(gi) for gi in singles], warmup=1, reps=reps)
    t_vmap = median_time(batched, G, warmup=1, reps=reps)
    out = {"queries": 32, "loop_s": t_loop, "vmap_s": t_vmap, "loop_over_vmap": t_loop / t_vmap}
    md = table(["queries", "Python loop s", "vmap s", "loop / vmap"], [[32, t_loop, t_vmap, t_loop / t_vmap]])
    return out, md


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and training steps")
    args = parser.parse_args(argv)
    results, sections = {}, []
    for key, title, fn in (("hvp_cost", "Masked HVP cost relative to one gradient (batch 512)", hvp_cost),
                           ("gif_hvp_counts", "GIF: HVPs to a relative normal residual of 1e-6 (float64)",
                            gif_hvp_counts),
                           ("vmap_vs_loop", "32 GIF solves: vmap vs Python loop", vmap_vs_loop)):
        results[key], md = fn(args.quick)
        sections.append(f"### {title}\n\n{md}\n")
        print(sections[-1], flush=True)
    path = write("core", {"quick": args.quick, **results}, "\n".join(sections))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
