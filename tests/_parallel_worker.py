"""Multi-device checks of gifjax.parallel, run by tests/test_parallel.py in a subprocess.

    python tests/_parallel_worker.py OUT.json

JAX sees 8 CPU devices only if XLA_FLAGS is set before it is imported, which
the pytest process (one device) cannot do; this script sets it, checks every
sharded mode against the single-device functions on a tiny float64 MLP, and
writes one JSON of relative differences, output shardings and flags (the
assertions live in the test). Several modes share one process to amortise
start-up and compilation.
"""

import os

# 8 CPU devices; low XLA optimisation: compiles ~1.5x faster, and every comparison here is
# between programs compiled under the same flags
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + (
    " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    " --xla_llvm_disable_expensive_passes=true")

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import gifjax  # noqa: E402
from gifjax import parallel, solvers  # noqa: E402

N = 24        # Hessian batch = training set (divisible by 1, 2, 4, 8)
DAMPING = 0.1
CG = solvers.CG(rtol=1e-11, max_steps=200)
LSTSQ = solvers.LSTSQ(rtol=1e-11, max_steps=200)


def _apply(params, x):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]


def _xent(logits, y):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None], axis=-1)[..., 0]


def loss(p, x, y):  # the mean over the (local) batch plus L2: what data parallelism needs
    # the strong L2 (Hessian + 2I) makes this untrained MLP's H positive definite, so CG converges
    return jnp.mean(_xent(_apply(p, x), y)) + sum(jnp.sum(a ** 2) for a in jax.tree.leaves(p))


def example_loss(p, ex):
    return _xent(_apply(p, ex[0][None]), ex[1][None])[0]


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def tree_rel(a, b):
    return max(rel(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def spec(x):
    return str(tuple(x.sharding.spec)) if isinstance(x.sharding, jax.sharding.NamedSharding) else None


def main(out_path):
    start = time.time()
    # NumPy inputs and jitted references: op-by-op JAX calls would each compile (slow on 2 cores)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(N, 4)), rng.integers(0, 3, N).astype(np.int32)
    params = {"w1": 0.8 * rng.normal(size=(4, 5)), "b1": np.zeros(5), "w2": 0.8 * rng.normal(size=(5, 3))}
    mask = jax.tree.map(lambda a: np.arange(a.size).reshape(a.shape) % 3 != 1, params)
    train, test = (x, y), (x[:16], y[:16])
    common = dict(damping=DAMPING, return_info=True)
    auto = gifjax.AutoDamping(0.5)  # λ from a Hutchinson trace: reduced over the data axis too

    @jax.jit
    def references(params):
        """Single-device answers: scores (16 test points), the removal gradient g and its Δ."""
        g = gifjax.removal_gradient(loss, params, x[:3], y[:3], num_train=N)
        return dict(
            scores={"if": gifjax.influence_scores(loss, params, example_loss, train, test, x, y,
                                                  solver=CG, **common),
                    "gif": gifjax.influence_scores(loss, params, example_loss, train, test, x, y,
                                                   solver=LSTSQ, method="gif", mask=mask, **common)},
            g=g, grads=jax.vmap(jax.grad(example_loss), (None, 0))(params, (x[:6], y[:6])),
            one=gifjax.influence(loss, params, g, x, y, method="gif", mask=mask, solver=LSTSQ,
                                 damping=auto),
            self=gifjax.self_influence(loss, params, example_loss, (x[:10], y[:10]), x, y,
                                       solver=CG, damping=DAMPING))

    refs = jax.tree.map(np.asarray, references(params))
    ref = refs["scores"]
    res = {"devices": jax.device_count(),
           "ref_converged": bool(all(np.all(r.solution.converged) for r in ref.values()))}
    q8, d8, qd = parallel.make_mesh(), parallel.make_mesh(1, 8), parallel.make_mesh(2, 4)

    def scores(name, mesh, method, n_train, n_test, solver=None, **kw):
        solver = solver or (CG if method == "if" else LSTSQ)
        extra = dict(mask=mask) if method == "gif" else {}
        out = parallel.influence_scores(loss, params, example_loss, (x[:n_train], y[:n_train]),
                                        (x[:n_test], y[:n_test]), x, y, mesh=mesh, method=method,
                                        solver=solver, **extra, **common, **kw)
        r = ref[method]
        res[name] = {"diff": rel(out.scores, r.scores[:n_train, :n_test]),
                     "adjoint_diff": tree_rel(out.solution.value,
                                              jax.tree.map(lambda a: a[:n_test], r.solution.value)),
                     "shape": list(out.scores.shape), "spec": spec(out.scores),
                     "solution_spec": spec(out.solution.converged),
                     "converged": bool(np.all(out.solution.converged))}

    # query parallel: 13 test points on 8 devices (padded to 16, trimmed: replicated output)
    scores("query_if_13", q8, "if", N, 13)
    # data parallel: Hessian batch 3 per device (chunked HVPs: 2 + remainder 1), 22 train (padded)
    scores("data_if_1x8", d8, "if", 22, 5, query_axis=None, data_axis="data", chunk_size=2)
    # both: 2 query shards × 4 data shards, even sizes: sharded P("data", "queries")
    scores("both_gif_2x4", qd, "gif", N, 6, data_axis="data")
    # the default solver (block CG, MINRES fallback: a lax.cond per shard) with a data-parallel Hessian
    scores("both_auto_if_2x4", qd, "if", N, 6, data_axis="data", solver="auto")

    # batched adjoint solves, query- and data-parallel
    sol = parallel.adjoint_solve(loss, params, refs["grads"], x, y, mesh=qd, data_axis="data",
                                 method="gif", mask=mask, solver=LSTSQ, damping=DAMPING,
                                 test_chunk_size=2)
    res["adjoint_2x4"] = {"diff": tree_rel(sol.value, jax.tree.map(lambda a: a[:6], ref["gif"].solution.value)),
                          "spec": spec(sol.value["w1"]), "converged": bool(np.all(sol.converged))}

    # self-influence, 10 examples on 2 query shards (even) × 4 data shards
    si = parallel.self_influence(loss, params, example_loss, (x[:10], y[:10]), x, y, mesh=qd,
                                 data_axis="data", solver=CG, damping=DAMPING, example_chunk_size=2)
    res["self_2x4"] = {"diff": rel(si, refs["self"]), "spec": spec(si)}

    # one Δ with a data-parallel Hessian and AutoDamping
    par = parallel.influence(loss, params, refs["g"], x, y, mesh=qd, method="gif", mask=mask,
                             solver=LSTSQ, damping=auto)
    one = refs["one"]
    res["influence_2x4"] = {"diff": tree_rel(par.delta, one.delta),
                            "damping": float(one.damping), "damping_diff": rel(par.damping, one.damping),
                            "spec": spec(par.delta["w1"]), "converged": bool(par.converged)}

    # an error that needs a data axis larger than one device
    try:
        parallel.influence_scores(loss, params, example_loss, train, test, x[:21], y[:21], mesh=d8,
                                  data_axis="data")
        res["indivisible_error"] = None
    except ValueError as e:
        res["indivisible_error"] = str(e)

    res["seconds"] = time.time() - start
    with open(out_path, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
