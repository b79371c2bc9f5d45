"""Sharded influence scores (gifjax.parallel, issue 6): 1 vs 8 devices, and agreement.

    python -m benchmarks.parallel [--quick]

Runs itself again in a subprocess with 8 fake CPU devices
(``--xla_force_host_platform_device_count=8``; the flag must be set before JAX
starts). On a small MLP trained on scikit-learn's digits (float32), it times
influence scores (median after warm-up, compile excluded) for

* the single-device ``gifjax.influence_scores`` (jitted), the reference;
* ``parallel.influence_scores`` on a 1-device mesh (the wrapper's overhead);
* query parallel on 8 devices (8 × 1 mesh);
* data parallel on 8 devices (1 × 8 mesh: Hessian batch and training set sharded);
* both (2 × 4 mesh);

and records the largest |difference| from the reference. The 8 fake devices
share the machine's cores, so no speedup is expected on a 2-core CPU (at
most the two cores in use at once): the times show the overhead of
sharding, not its gain (on 8 real devices, query
parallel work divides by 8 with no communication; data parallel adds one
all-reduce of a parameter-sized vector per HVP).

Writes benchmarks/results/parallel.json and parallel.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

WORKER_FLAG = "--worker"
NOTE = ("8 fake CPU devices (--xla_force_host_platform_device_count=8) share this machine's "
        "{cores} cores: no speedup from sharding is expected here (at most the {cores} cores used "
        "at once, where a single device runs small ops on one thread); the times show sharding "
        "overhead under shared, noisy load, the diffs that every mode computes the single-device "
        "answer (float32 rounding of a different summation order).")


def run(quick: bool):
    import jax
    import jax.numpy as jnp
    import numpy as np

    import gifjax
    from gifjax import parallel, solvers

    from .common import digits, median_time, table, write
    from .core import num_params, train_small_mlp

    n_train, n_test = (512, 64) if quick else (1024, 128)
    x, y = digits(n_train)
    x, y = jnp.asarray(x), jnp.asarray(y)
    model, params, loss = train_small_mlp(x, y, 100 if quick else 300)
    example_loss = lambda p, ex: loss(p, ex[0][None], ex[1][None])
    train, test = (x, y), (x[:n_test], y[:n_test])
    kw = dict(method="if", damping=0.1, solver=solvers.CG(rtol=1e-5, max_steps=50), return_info=True)
    reps = 7 if quick else 15

    single = jax.jit(lambda p: gifjax.influence_scores(loss, p, example_loss, train, test, x, y, **kw))
    meshes = {
        "single device (gifjax.influence_scores)": None,
        "parallel, 1 device (1 × 1 mesh)": (parallel.make_mesh(1, 1), {}),
        "query parallel, 8 devices (8 × 1)": (parallel.make_mesh(8, 1), {}),
        "data parallel, 8 devices (1 × 8)": (parallel.make_mesh(1, 8), dict(query_axis=None, data_axis="data")),
        "both, 8 devices (2 × 4)": (parallel.make_mesh(2, 4), dict(data_axis="data")),
    }
    ref = single(params)
    ref_scores = np.asarray(ref.scores)
    rows, out = [], {}
    base = None
    for name, spec in meshes.items():
        if spec is None:
            fn = single
        else:
            mesh, extra = spec
            fn = lambda p, mesh=mesh, extra=extra: parallel.influence_scores(
                loss, p, example_loss, train, test, x, y, mesh=mesh, **extra, **kw)
        res = fn(params)
        t = median_time(fn, params, warmup=1, reps=reps)
        base = t if base is None else base
        diff = float(np.max(np.abs(np.asarray(res.scores) - ref_scores)))
        scale = float(np.max(np.abs(ref_scores)))
        steps = float(np.mean(np.asarray(res.solution.num_steps)))
        out[name] = {"seconds": t, "over_single": t / base, "max_abs_diff": diff,
                     "max_rel_diff": diff / scale, "mean_cg_steps": steps,
                     "converged": float(np.mean(np.asarray(res.solution.converged))),
                     "sharding": str(getattr(res.scores.sharding, "spec", "one device"))}
        rows.append([name, t, t / base, diff, diff / scale, steps, out[name]["sharding"]])
        print(rows[-1], flush=True)

    note = NOTE.format(cores=os.cpu_count())
    setup = (f"MLP {num_params(params)} params (digits, float32), {n_train} training examples "
             f"(= Hessian batch), {n_test} test examples, IF with CG (rtol 1e-5, ≤ 50 steps), "
             f"damping 0.1; median of {reps} after warm-up.")
    md = "\n".join(["### Sharded influence scores\n", setup, "", table(
        ["mode", "time s", "÷ single", "max abs. diff", "max rel. diff", "mean CG steps", "output spec"],
        rows), "", note])
    print(md)
    path = write("parallel", {"quick": quick, "setup": setup, "note": note,
                              "devices": len(jax.devices()), "results": out}, md)
    print(f"wrote {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller problem, fewer repetitions")
    parser.add_argument(WORKER_FLAG, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return run(args.quick)
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
    cmd = [sys.executable, "-m", "benchmarks.parallel", WORKER_FLAG] + (["--quick"] if args.quick else [])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.exit(subprocess.call(cmd, env=env, cwd=root))


if __name__ == "__main__":
    main()
