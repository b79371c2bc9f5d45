"""Peer comparison: one exact influence job through pyDVL (PyTorch) and gifjax, side by side.

    python -m benchmarks.peer [--quick]

Needs torch and pyDVL: ``pip install -e '.[peer]' && pip install --no-deps 'pydvl==0.10.0'``
(pyDVL 0.10.0 declares numpy<2, which jax ≥ 0.5 cannot use, so it is installed without its
pins; its influence code runs on numpy 2 — this benchmark is the check).

Without torch or pyDVL installed it prints why, writes results/peer.{json,md}
saying "skipped", and exits 0.

The job (float64 throughout, on scikit-learn's 8×8 digits flattened to 64 features):

* models: multinomial logistic regression (64 → 10) and a tanh MLP (64 → H → 10),
  written once in JAX with PyTorch's parameter layout (``weight`` [out, in],
  ``bias`` [out]) and once as the equivalent ``torch.nn.Module``;
* objective L(θ) = mean cross-entropy over the n training examples + ½·wd·‖θ‖²
  (every parameter, biases included), trained once in JAX (L-BFGS); the same
  weights are copied into the torch module;
* Hessian: gifjax differentiates L, so H = H_CE + wd·I. pyDVL's Hessian is that of
  its loss (mean cross-entropy) over the training DataLoader, and its
  ``regularization`` λ adds λ·I before the solve, so ``regularization=wd`` gives
  the identical matrix (checked: both dense Hessians are compared entrywise);
* influence: exact in both — pyDVL ``DirectInfluence`` (dense Hessian,
  ``torch.linalg.solve``) and gifjax ``influence_scores(..., method="if",
  solver="dense")`` (dense Hessian from HVPs, pseudo-inverse by ``eigh``), with per-example loss
  = cross-entropy of one example (no regulariser) on both sides.

Sign and layout. pyDVL's ``influences(x_test, y_test, x, y, mode="up")`` returns
P[j, i] = ∇ℓ(test_j)ᵀ (H_CE + λI)⁻¹ ∇ℓ(train_i), shape [n_test, n_train], with no
minus sign. gifjax returns Koh & Liang's up-weighting sign, I[i, j] =
−∇ℓ(test_j)ᵀ H⁻¹ ∇ℓ(train_i), shape [n_train, n_test]. With the same H:

    I_gifjax = −P_pyDVLᵀ

Reported per job: wall time of the whole influence computation in each library
(pyDVL: fit = Hessian, + influences; gifjax: one jitted call, compilation
excluded and reported separately), medians after a warm-up, in one process on the
same (shared, noisy) CPU cores; max |ΔH| of the dense Hessians; max |I_gifjax +
P_pyDVLᵀ| and that relative to max |I|.

A second job compares the *iterative* solvers (issue 12): a 64-64-10 tanh MLP
(4,810 parameters), 1,000 training × 100 test points, λ = 1e-3, through gifjax's
default (block CG with a MINRES fallback), block CG in one block, vmapped
MINRES and CG, and pyDVL's ``CgInfluence`` (per query, block, block +
Nyström), ``ArnoldiInfluence`` and ``LissaInfluence``; each scored by its
relative error against a dense float64 solve, with the fastest configuration
of each library that reaches 1e-4 compared. Writes benchmarks/results/peer.json
and peer.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import common

SKIP_HINT = ("pip install -e '.[peer]' && pip install --no-deps 'pydvl==0.10.0'  (torch and pyDVL's "
             "dependencies, then pyDVL itself: it declares numpy<2, which jax cannot use; CPU-only "
             "torch: pip install torch --index-url https://download.pytorch.org/whl/cpu)")


def load_peer():
    """Import torch and pyDVL's influence API, or raise ImportError saying what is missing."""
    try:
        with warnings.catch_warnings():  # deprecation notices of torch/pyDVL internals
            warnings.simplefilter("ignore", FutureWarning)
            import torch
    except ImportError as e:
        raise ImportError(f"torch is not installed ({e})") from e
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            import pydvl
            from pydvl.influence import InfluenceMode
            from pydvl.influence.torch import (ArnoldiInfluence, CgInfluence, DirectInfluence, LissaInfluence,
                                               NystroemPreconditioner)
            from pydvl.influence.torch.functional import hessian
    except ImportError as e:
        raise ImportError(f"pyDVL's torch influence API is not importable ({e})") from e
    return {"torch": torch, "pydvl": pydvl, "InfluenceMode": InfluenceMode,
            "DirectInfluence": DirectInfluence, "hessian": hessian, "CgInfluence": CgInfluence,
            "ArnoldiInfluence": ArnoldiInfluence, "LissaInfluence": LissaInfluence,
            "NystroemPreconditioner": NystroemPreconditioner}


# ----------------------------------------------------------------------------- JAX side

def layout(hidden: int | None) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter names and shapes in torch's ``named_parameters`` order."""
    if hidden is None:
        return [("linear.weight", (10, 64)), ("linear.bias", (10,))]
    return [("fc1.weight", (hidden, 64)), ("fc1.bias", (hidden,)),
            ("fc2.weight", (10, hidden)), ("fc2.bias", (10,))]


def apply(params, x):
    if "linear.weight" in params:
        return x @ params["linear.weight"].T + params["linear.bias"]
    h = jnp.tanh(x @ params["fc1.weight"].T + params["fc1.bias"])
    return h @ params["fc2.weight"].T + params["fc2.bias"]


def cross_entropy(logits, y):
    return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, y[..., None], -1)[..., 0]


def make_objective(wd: float):
    def objective(params, x, y):  # mean loss + ½·wd·‖θ‖², every parameter
        reg = sum(jnp.sum(p ** 2) for p in jax.tree_util.tree_leaves(params))
        return jnp.mean(cross_entropy(apply(params, x), y)) + 0.5 * wd * reg
    return objective


def example_loss(params, example):  # ℓ(z): cross-entropy of one example, no regulariser
    x, y = example
    return cross_entropy(apply(params, x[None]), y[None])[0]


def init(hidden, key):
    params = {}
    for (name, shape), k in zip(layout(hidden), jax.random.split(key, 4)):
        fan_in = shape[-1] if len(shape) == 2 else 64
        params[name] = jax.random.normal(k, shape, jnp.float64) / np.sqrt(fan_in)
    return params


def train(objective, params, x, y, steps: int):
    fun = lambda p: objective(p, x, y)
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(fun)

    @jax.jit
    def step(params, state):
        value, grad = value_and_grad(params, state=state)
        updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=fun)
        return optax.apply_updates(params, updates), state

    state = opt.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    grad_norm = float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in
                                   jax.tree_util.tree_leaves(jax.grad(fun)(params)))))
    return params, grad_norm


def flat_hessian(objective, params, names, x, y):
    """Dense Hessian of the objective over parameters flattened in torch order."""
    shapes = [params[n].shape for n in names]
    sizes = [int(np.prod(s)) for s in shapes]

    def unflatten(v):
        parts = jnp.split(v, np.cumsum(sizes)[:-1])
        return {n: p.reshape(s) for n, p, s in zip(names, parts, shapes)}

    flat = jnp.concatenate([params[n].ravel() for n in names])
    f = lambda v: objective(unflatten(v), x, y)
    hvp = lambda e: jax.jvp(jax.grad(f), (flat,), (e,))[1]
    return np.asarray(jax.jit(lambda: jax.lax.map(hvp, jnp.eye(flat.size), batch_size=128))())


# ----------------------------------------------------------------------------- torch side

def torch_model(peer, params, hidden):
    torch = peer["torch"]
    nn = torch.nn

    class LogReg(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(64, 10)

        def forward(self, x):
            return self.linear(x)

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(64, hidden), nn.Linear(hidden, 10)

        def forward(self, x):
            return self.fc2(torch.tanh(self.fc1(x)))

    model = (LogReg() if hidden is None else MLP()).double()
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in params.items()})
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in layout(hidden)]
    return model.eval()


# ----------------------------------------------------------------------------- the job

def torch_data(peer, x, y, x_test, y_test, batch_size):
    """The same data as torch tensors (train, test) and pyDVL's training DataLoader."""
    torch = peer["torch"]
    xt, yt = torch.from_numpy(np.array(x)), torch.from_numpy(np.array(y)).long()
    xs, ys = torch.from_numpy(np.array(x_test)), torch.from_numpy(np.array(y_test)).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xt, yt), batch_size=batch_size)
    return xt, yt, xs, ys, loader


def run_job(peer, name, hidden, wd, x, y, x_test, y_test, *, train_steps, reps, batch_size):
    torch = peer["torch"]
    F = torch.nn.functional
    out = {"model": name, "hidden": hidden, "weight_decay": wd, "n_train": len(y),
           "n_test": len(y_test)}
    objective = make_objective(wd)
    params, grad_norm = train(objective, init(hidden, jax.random.key(0)), x, y, train_steps)
    names = [n for n, _ in layout(hidden)]
    out["params"] = sum(int(np.prod(s)) for _, s in layout(hidden))
    out["train_grad_norm"] = grad_norm
    out["train_acc"] = float(jnp.mean(jnp.argmax(apply(params, x), -1) == y))
    out["test_acc"] = float(jnp.mean(jnp.argmax(apply(params, x_test), -1) == y_test))

    model = torch_model(peer, params, hidden)
    xt, yt, xs, ys, loader = torch_data(peer, x, y, x_test, y_test, batch_size)

    # 1. the matrices agree: gifjax's H of the objective vs pyDVL's H of its loss + λI
    H_jax = flat_hessian(objective, params, names, x, y)
    H_dvl = peer["hessian"](model, F.cross_entropy, loader).numpy()
    H_dvl = H_dvl + wd * np.eye(len(H_dvl))
    eig = np.linalg.eigvalsh(H_jax)
    out["hessian"] = {"max_abs_diff": float(np.max(np.abs(H_jax - H_dvl))),
                      "max_abs": float(np.max(np.abs(H_jax))),
                      "lambda_min": float(eig[0]), "lambda_max": float(eig[-1]),
                      "condition": float(abs(eig[-1]) / abs(eig).min())}
    with torch.no_grad():
        torch_logits = model(xt).numpy()
    out["max_abs_logit_diff"] = float(np.max(np.abs(torch_logits - np.asarray(apply(params, x)))))

    # 2. gifjax: one jitted call (all test points in one chunk: the dense Hessian is built once)
    gif = jax.jit(lambda p, tr, te: common_scores(objective, p, tr, te, len(y_test)))

    def gifjax_job():
        return np.asarray(jax.block_until_ready(gif(params, (x, y), (x_test, y_test))))

    # 3. pyDVL: DirectInfluence with regularization = wd, fit (Hessian) + influences
    parts = {"fit": [], "influences": []}

    def pydvl_job():
        t0 = time.perf_counter()
        inf = peer["DirectInfluence"](model, F.cross_entropy, regularization=wd).fit(loader)
        t1 = time.perf_counter()
        P = inf.influences(xs, ys, xt, yt, mode=peer["InfluenceMode"].Up)
        parts["fit"].append(t1 - t0)
        parts["influences"].append(time.perf_counter() - t1)
        return P.detach().numpy()

    # first calls (gifjax: compilation), then the two jobs alternate so both see the same load
    t0 = time.perf_counter()
    gifjax_job()
    out["gifjax_first_call_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pydvl_job()
    out["pydvl_first_call_s"] = time.perf_counter() - t0
    times = {"gifjax": [], "pydvl": []}
    for _ in range(reps):
        for key, job in (("gifjax", gifjax_job), ("pydvl", pydvl_job)):
            t, result = common.median_seconds(job, warmup=0, reps=1)
            times[key].append(t)
            if key == "gifjax":
                I_gif = result
            else:
                P = result
    t_gif, t_dvl = float(np.median(times["gifjax"])), float(np.median(times["pydvl"]))
    out["times_s"] = times

    # reference timings of two dense solves on the same H: lstsq (SVD, what gifjax's Dense used
    # before it switched to eigh for symmetric systems) and LU (what pyDVL uses)
    Hj, B = jnp.asarray(H_jax), jnp.asarray(np.random.default_rng(0).normal(size=(len(H_jax), len(y_test))))
    lstsq = jax.jit(lambda A, b: jnp.linalg.lstsq(A, b)[0])
    solve = jax.jit(lambda A, b: jnp.linalg.solve(A, b))
    out["dense_solve_s"] = {
        key: common.median_seconds(lambda: jax.block_until_ready(fn(Hj, B)), warmup=1, reps=1)[0]
        for key, fn in (("jnp_lstsq", lstsq), ("jnp_solve", solve))}

    mapped = -P.T  # gifjax convention: I[i, j] = −P[j, i]
    diff = np.abs(I_gif - mapped)
    scale = float(np.max(np.abs(I_gif)))
    out.update({
        "gifjax_s": t_gif, "pydvl_s": t_dvl,
        "pydvl_fit_s": float(np.median(parts["fit"][1:])),
        "pydvl_influences_s": float(np.median(parts["influences"][1:])),
        "pydvl_over_gifjax": t_dvl / t_gif,
        "max_abs_influence": scale,
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float(diff.max() / scale),
        "rel_fro_diff": float(np.linalg.norm(I_gif - mapped) / np.linalg.norm(I_gif)),
        "max_abs_diff_unmapped_sign": float(np.max(np.abs(I_gif - P.T))),
        "shape": list(I_gif.shape),
    })
    return out


def run_krylov_job(peer, hidden, wd, x, y, x_test, y_test, *, train_steps, reps, batch_size, skip=()):
    """The same influence matrix by every iterative configuration of both libraries, vs a dense reference.

    A tanh MLP big enough that nobody would solve it densely in practice
    (64-64-10: 4,810 parameters), λ = wd. Reference: gifjax's ``Dense`` in
    float64 (eigh of the 4,810² Hessian), checked against pyDVL's
    ``DirectInfluence``. Every configuration is timed end to end (pyDVL: fit +
    influences; gifjax: one jitted call, compilation excluded) and scored by
    the relative Frobenius error of its [n_train × n_test] matrix.
    """
    torch = peer["torch"]
    F = torch.nn.functional
    objective = make_objective(wd)
    params, grad_norm = train(objective, init(hidden, jax.random.key(0)), x, y, train_steps)
    model = torch_model(peer, params, hidden)
    xt, yt, xs, ys, loader = torch_data(peer, x, y, x_test, y_test, batch_size)
    import gifjax
    from gifjax import solvers

    lam_max = float(gifjax.spectrum.eigenvalues(objective, params, x, y, k=1, which="largest").values[0])

    def gif(solver, chunk):
        run = jax.jit(lambda p: gifjax.influence_scores(objective, p, example_loss, (x, y), (x_test, y_test),
                                                         x, y, method="if", solver=solver, damping=0.0,
                                                         test_chunk_size=chunk, progress=False,
                                                         return_info=True))

        def job():
            out = jax.block_until_ready(run(params))
            return np.asarray(out.scores), f"{int(out.solution.converged.sum())}/{len(y_test)}"
        return job

    def dvl(cls, **kw):
        def job():
            inf = peer[cls](model, F.cross_entropy, regularization=wd, **kw).fit(loader)
            return -inf.influences(xs, ys, xt, yt, mode=peer["InfluenceMode"].Up).detach().numpy().T, "n/a"
        return job

    t0 = time.perf_counter()
    reference = gif("dense", len(y_test))()[0]
    reference_s = time.perf_counter() - t0
    direct = dvl("DirectInfluence")()[0]
    n = len(y_test)
    cont = lambda **kw: solvers.BlockCG(negative_curvature="continue", **kw)  # noqa: E731
    configs = [
        ("gifjax", 'default (solver="auto", test_chunk_size=None)', gif("auto", None)),
        ("gifjax", 'default, chunks of 16', gif("auto", 16)),
        ("gifjax", 'BlockCG(negative_curvature="continue"), one block', gif(cont(), n)),
        ("gifjax", 'BlockCG(negative_curvature="continue", rtol=1e-6), one block', gif(cont(rtol=1e-6), n)),
        ("gifjax", 'BlockCG(negative_curvature="continue", rtol=1e-4), one block', gif(cont(rtol=1e-4), n)),
        ("gifjax", 'BlockCG(negative_curvature="continue", rtol=1e-3), one block', gif(cont(rtol=1e-3), n)),
        ("gifjax", 'BlockCG(negative_curvature="continue"), chunks of 16', gif(cont(), 16)),
        ("gifjax", "MINRES (vmap), chunks of 16", gif("minres", 16)),
        ("gifjax", "CG (vmap), chunks of 16", gif("cg", 16)),
        # maxiter: pyDVL's default is 10·dim, which an indefinite system (the --quick model) runs out.
        # pyDVL stops a column when ‖r‖ < max(rtol²·‖b‖, atol²): its rtol 1e-2 asks for 1e-4.
        ("pyDVL", "CgInfluence, rtol 1e-6", dvl("CgInfluence", rtol=1e-6, atol=0.0, maxiter=1000,
                                                warn_on_max_iteration=False)),
        ("pyDVL", "CgInfluence, block (solve_simultaneously), defaults",
         dvl("CgInfluence", solve_simultaneously=True, warn_on_max_iteration=False)),
        ("pyDVL", "CgInfluence, block, rtol 1e-6", dvl("CgInfluence", rtol=1e-6, atol=0.0, maxiter=1000,
                                                       solve_simultaneously=True, warn_on_max_iteration=False)),
        ("pyDVL", "CgInfluence, block, rtol 1e-2", dvl("CgInfluence", rtol=1e-2, atol=0.0, maxiter=1000,
                                                       solve_simultaneously=True, warn_on_max_iteration=False)),
        ("pyDVL", "CgInfluence, block + Nyström(64), rtol 1e-6",
         dvl("CgInfluence", rtol=1e-6, atol=0.0, maxiter=1000, solve_simultaneously=True,
             warn_on_max_iteration=False, preconditioner=peer["NystroemPreconditioner"](rank=64))),
        ("pyDVL", "ArnoldiInfluence, rank 256", dvl("ArnoldiInfluence", rank=256)),
        ("pyDVL", "LissaInfluence, 1000 steps, scale 1.1·λ_max",
         dvl("LissaInfluence", maxiter=1000, scale=1.1 * lam_max, rtol=1e-6, warn_on_max_iteration=False)),
    ]
    rows = []
    for library, label, job in configs:
        if label in skip:
            print(f"  {library:6s} {label:55s} skipped (--skip)", flush=True)
            continue
        # a configuration slower than a minute is timed by its first call alone (compilation
        # included: a few seconds of gifjax's); the others by the median of `reps` more calls
        first = time.perf_counter()
        I, converged = job()
        first = seconds = time.perf_counter() - first
        if first < 60:
            seconds, (I, converged) = common.median_seconds(job, warmup=0, reps=reps)
        err = float(np.linalg.norm(I - reference) / np.linalg.norm(reference))
        rows.append({"library": library, "config": label, "seconds": seconds, "first_call_s": first,
                     "relative_error": err, "converged": converged})
        print(f"  {library:6s} {label:55s} {seconds:8.2f} s (first {first:.1f} s), rel. error {err:.2e}, converged {converged}",
              flush=True)
    accurate = [r for r in rows if r["relative_error"] <= 1e-4]
    best = {lib: min((r for r in accurate if r["library"] == lib), key=lambda r: r["seconds"], default=None)
            for lib in ("gifjax", "pyDVL")}
    ratio = (best["pyDVL"]["seconds"] / best["gifjax"]["seconds"]
             if best["pyDVL"] and best["gifjax"] else None)
    return {"model": f"MLP 64-{hidden}-10 tanh", "params": sum(int(np.prod(s)) for _, s in layout(hidden)),
            "n_train": len(y), "n_test": n, "damping": wd, "train_grad_norm": grad_norm, "lambda_max": lam_max,
            "reference_s": reference_s, "reps": reps,
            "direct_vs_reference": float(np.linalg.norm(direct - reference) / np.linalg.norm(reference)),
            "rows": rows, "skipped": sorted(skip), "fastest_accurate": best, "pydvl_over_gifjax_at_1e-4": ratio}


def krylov_markdown(k: dict) -> str:
    rows = [[r["library"], r["config"], r["seconds"], r["first_call_s"], r["relative_error"], r.get("converged", "")]
            for r in k["rows"]]
    best, ratio = k["fastest_accurate"], k["pydvl_over_gifjax_at_1e-4"]
    verdict = ("no configuration of one library reached relative error 1e-4" if ratio is None else
               f"fastest to relative error ≤ 1e-4: gifjax {best['gifjax']['config']} "
               f"{best['gifjax']['seconds']:.2f} s, pyDVL {best['pyDVL']['config']} "
               f"{best['pyDVL']['seconds']:.2f} s: pyDVL ÷ gifjax = {ratio:.3g} (target ≥ 3)")
    return (f"### Peer comparison: iterative solvers on the same job\n\n{k['model']} ({k['params']} parameters), "
            f"{k['n_train']} training × {k['n_test']} test points, float64, λ = {k['damping']:g} "
            f"(pyDVL `regularization`), the same weights. Error: relative Frobenius error of the whole "
            f"influence matrix against gifjax's dense float64 solve ({k['reference_s']:.1f} s; pyDVL's "
            f"`DirectInfluence` agrees to {k['direct_vs_reference']:.1e}). Wall time: median of {k['reps']} runs "
            "after a first call, or the first call alone where it took over a minute (gifjax: one jitted "
            "call, compilation in the first call; pyDVL: fit + influences).\n\n"
            + common.table(["library", "configuration", "wall s", "first call s", "rel. error", "converged"], rows)
            + (f"\n\nNot run this time (`--skip`): {', '.join(k['skipped'])}." if k.get("skipped") else "")
            + f"\n\n{verdict}.")


def common_scores(objective, params, train, test, n_test):
    import gifjax

    return gifjax.influence_scores(objective, params, example_loss, train, test, *train,
                                   method="if", solver="dense", damping=0.0,
                                   test_chunk_size=n_test)


def skip(reason: str) -> int:
    msg = f"benchmarks.peer: skipped — {reason}. Install the extra to run it: {SKIP_HINT}"
    print(msg)
    common.write("peer", {"skipped": True, "reason": reason},
                 "### Peer comparison: pyDVL vs gifjax\n\n" + msg)
    return 0


def markdown(results: dict) -> str:
    jobs = results["jobs"]
    agree = [[r["model"], r["params"], f"{r['n_train']} × {r['n_test']}",
              r["hessian"]["lambda_min"], r["hessian"]["condition"], r["hessian"]["max_abs_diff"],
              r["max_abs_influence"], r["max_abs_diff"], r["max_rel_diff"]] for r in jobs]
    spread = lambda v: f"{np.median(v):.3g} ({min(v):.3g}–{max(v):.3g})"
    times = [[r["model"], spread(r["times_s"]["gifjax"]), r["gifjax_first_call_s"],
              spread(r["times_s"]["pydvl"]), r["pydvl_fit_s"],
              r["pydvl_influences_s"], r["pydvl_over_gifjax"], r["dense_solve_s"]["jnp_lstsq"],
              r["dense_solve_s"]["jnp_solve"]] for r in jobs]
    return (
        "### Peer comparison: the same exact influence job in pyDVL and gifjax\n\n"
        + common.table(["model", "params", "train × test", "λ_min(H)", "κ(H)", "max \\|ΔH\\|",
                        "max \\|I\\|", "max \\|ΔI\\|", "max \\|ΔI\\| / max \\|I\\|"], agree)
        + "\n\nWall time of the whole influence matrix, s: median (min–max) of "
        f"{results['reps']} runs, the two libraries alternating:\n\n"
        + common.table(["model", "gifjax", "gifjax 1st call (compiles)", "pyDVL", "pyDVL fit",
                        "pyDVL influences", "pyDVL ÷ gifjax", "jnp lstsq on H", "jnp solve on H"],
                       times)
        + f"\n\npyDVL {results['pydvl']} `DirectInfluence(model, cross_entropy, "
        f"regularization={results['weight_decay']:g})` fitted on a DataLoader of batch "
        f"{results['batch_size']}, torch {results['torch']} ({results['torch_threads']} threads), "
        f"vs gifjax `influence_scores(objective, ..., method=\"if\", solver=\"dense\")`, "
        f"jax {results.get('jax', '?')}; float64; the same digits data and the same weights "
        "(trained once in JAX on mean cross-entropy + ½·wd·‖θ‖², L-BFGS); the same Hessian "
        "(pyDVL's H of the mean loss + λI with λ = wd equals gifjax's H of the objective: "
        "max |ΔH| column). Convention: pyDVL's `influences(x_test, y_test, x, y, mode=\"up\")` "
        "is P[j, i] = +∇ℓ(test_j)ᵀ H⁻¹ ∇ℓ(train_i), so I_gifjax = −P_pyDVLᵀ. gifjax's time "
        "excludes compilation (its first call is listed). gifjax's `Dense` solver applies the "
        "pseudo-inverse from an eigendecomposition of the symmetric H (exact min-norm "
        "solutions also for the singular masked operators of PIF/FIF/GIF), pyDVL's is "
        "`torch.linalg.solve` (LU); the last two columns time `lstsq` (SVD) and LU once on "
        "gifjax's H with as many right-hand sides as test points, for reference. "
        "2 shared CPU cores: single runs can vary by up to 3× under load. "
        f"Total runtime {results['runtime_s']:.0f} s."
        + (f" These exact jobs are from the run of {results['exact_jobs_from']}; the iterative job below "
           "was re-run alone (`--iterative-only`)." if results.get("exact_jobs_from") else ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller data and model, fewer repetitions")
    parser.add_argument("--render", action="store_true", help="only rewrite peer.md from peer.json")
    parser.add_argument("--iterative-only", action="store_true",
                        help="run only the iterative job; keep the exact jobs of the existing peer.json")
    parser.add_argument("--skip", nargs="*", default=[], metavar="LABEL",
                        help="configurations of the iterative job not to run (their table labels)")
    args = parser.parse_args(argv)
    if args.render:
        results = json.loads((common.RESULTS / "peer.json").read_text())
        md = markdown(results) if results.get("jobs") else (common.RESULTS / "peer.md").read_text()
        if results.get("krylov"):
            md += "\n\n" + krylov_markdown(results["krylov"])
        (common.RESULTS / "peer.md").write_text(md.rstrip() + "\n")
        print(md)
        return 0
    try:
        peer = load_peer()
    except ImportError as e:
        return skip(str(e))
    torch = peer["torch"]
    t_start = time.perf_counter()
    quick = args.quick
    n_train, n_test = (300, 50) if quick else (1000, 200)
    reps = 2 if quick else 3
    hidden = 8 if quick else 16
    wd = 1e-3
    jobs = [("logistic regression", None), (f"MLP 64-{hidden}-10 tanh", hidden)]
    results = {"quick": quick, "torch": torch.__version__, "pydvl": peer["pydvl"].__version__,
               "torch_threads": torch.get_num_threads(), "reps": reps, "weight_decay": wd,
               "batch_size": 250, "jax": jax.__version__,
               "convention": "I_gifjax[i, j] = -P_pydvl[j, i] (pyDVL mode='up' has no minus sign, "
                             "layout [test, train]); pyDVL regularization = wd = L2 of the "
                             "gifjax objective", "jobs": []}
    if args.iterative_only:  # the exact jobs stay those of the last full run
        old = json.loads((common.RESULTS / "peer.json").read_text())
        results.update({key: old[key] for key in ("jobs", "reps", "runtime_s", "torch", "torch_threads", "jax")
                        if key in old},
                       exact_jobs_from=old.get("environment", {}).get("time", "an earlier run"))
    with jax.enable_x64(True):
        x_all, y_all = common.digits()
        x_all = x_all.reshape(len(x_all), -1).astype(np.float64)
        x, y = jnp.asarray(x_all[:n_train]), jnp.asarray(y_all[:n_train])
        x_test = jnp.asarray(x_all[n_train:n_train + n_test])
        y_test = jnp.asarray(y_all[n_train:n_train + n_test])
        for name, h in ([] if args.iterative_only else jobs):
            r = run_job(peer, name, h, wd, x, y, x_test, y_test, train_steps=200 if quick else 500,
                        reps=reps, batch_size=results["batch_size"])
            results["jobs"].append(r)
            print(f"{name}: {r['params']} params, influence [{n_train} × {n_test}]: gifjax "
                  f"{r['gifjax_s']:.3f} s, pyDVL {r['pydvl_s']:.3f} s; max |ΔI| "
                  f"{r['max_abs_diff']:.3g} (rel. {r['max_rel_diff']:.3g}); max |ΔH| "
                  f"{r['hessian']['max_abs_diff']:.3g}", flush=True)
        k_train, k_test = (300, 20) if quick else (1000, 100)
        x_k = jnp.asarray(x_all[:k_train])
        y_k = jnp.asarray(y_all[:k_train])
        print(f"iterative job: MLP 64-{16 if quick else 64}-10, {k_train} × {k_test}", flush=True)
        results["krylov"] = run_krylov_job(peer, 16 if quick else 64, wd, x_k, y_k,
                                           jnp.asarray(x_all[k_train:k_train + k_test]),
                                           jnp.asarray(y_all[k_train:k_train + k_test]),
                                           train_steps=200 if quick else 500, reps=1 if quick else 2,
                                           batch_size=results["batch_size"], skip=set(args.skip))
    results["krylov"].update(runtime_s=time.perf_counter() - t_start, torch=torch.__version__,
                             torch_threads=torch.get_num_threads())
    if not args.iterative_only:
        results["runtime_s"] = results["krylov"]["runtime_s"]

    md = markdown(results) + "\n\n" + krylov_markdown(results["krylov"])
    path = common.write("peer", results, md)
    print(md)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
