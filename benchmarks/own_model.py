"""A user's own Flax nnx CNN with the documented defaults (issue 16): does the call finish, and say so?

    python -m benchmarks.own_model [--smoke] [--configs KEY,...] [--results DIR] [--guard SECONDS]

The issue's setting: an nnx CNN with 38,282 parameters (Conv 1→16 3×3 → relu →
Conv 16→32 3×3 → relu → 2×2 average pool → Dense 512→64 → relu → Dense 64→10),
trained with optax (adam 1e-3, batch 64, 20 epochs, seed 0) on scikit-learn's
digits (1,438 training images, ``gifjax.experiments.data.load("digits",
val_fraction=0)``), the losses written the way a user writes them, with
``nnx.split`` / ``nnx.merge`` (:func:`user_losses`: mean cross-entropy +
½·1e-4·‖θ‖², and the per-example cross-entropy), and influence scores of all
1,438 training examples for 64 test points. Everything runs in float32 on the
CPU; the numbers in ``results/own_model.md`` are from 2 CPU cores shared with
other jobs.

Measurements:

1. **Model**: parameters, training time and accuracy; the extreme Hessian
   eigenvalues on all training data (``gifjax.spectrum.eigenvalues``, k = 1,
   both ends), which give the README's damping λ* = 2·max(|λ_min|, 0.05); the
   GIF mask: 5 % of the parameters, ``selection.select`` of
   ``selection.activation_scores`` on the test points.
2. **HVP cost** on all training data vs ``Curvature(subsample=512)`` and
   ``256``: one fresh HVP (jit, median after warm-up), one gradient, and the
   cost of one step of a chunk of 16 vmapped MINRES solves — what one step of
   ``influence_scores`` costs — as (T(k₂ steps) − T(k₁ steps)) / (k₂ − k₁),
   each T a median after warm-up of ``adjoint_solves`` with
   ``MINRES(rtol=0, max_steps=k)``.
3. **Default calls**, each ``influence_scores(loss_fn, params, example_loss_fn,
   train, test, x, y, return_info=True, …)`` on the 64 test points with only
   the keywords named in the table (``solver="auto"``, whose work budget
   ``solvers.AUTO_FLOP_BUDGET`` bounds every one of them), in a *child
   process* that is stopped ``--guard`` seconds (600 in full mode: "finishes
   in minutes") after its call started: *measured*, or *timed out*. Recorded
   per call: wall time, compile time (JAX's trace / lower / compile events,
   intervals merged), converged count, failure names, the step caps the
   budget left (from the warning), HVPs (Σ over queries of ``num_matvecs``,
   and the work a vmapped chunk really does: Σ over chunks of max × chunk
   size), steps, and each query's relative residual ‖r‖ / ‖right-hand side‖
   (‖∇ℓ‖ for IF, ‖P∇ℓ‖ for GIF's min-norm adjoint).
4. **References** on the first 8 test points: tight full-data solves at λ*
   (IF: MINRES, rtol 1e-6; GIF: LSTSQ, rtol 1e-7, the same mask) against
   which every λ* configuration's columns are compared (Spearman per column,
   top-10 overlap by |I|, relative error) — so a subsample's error shows,
   which a reference on the same subsample (``gifjax.check_scores``) cannot
   show; and for λ = 0, where no tight solve is affordable, step budgets
   (MINRES max_steps 100 on all data and on the 512 subsample, 300 on the
   subsample): converged count, relative residual and the Spearman
   correlation between the budgets' scores.

``--smoke``: a 2.6k-parameter CNN on 160 images, 32 test points (two chunks),
subsamples 64 / 32, four of the configurations, guard 25 s: the same code
paths and JSON schema in about four minutes on 2 CPU cores. Results go to
benchmarks/results/own_model.{json,md} (``--results DIR`` or
GIFJAX_BENCH_RESULTS elsewhere); the JSON is rewritten after every section,
so an interrupted run keeps what it measured. Not in ``benchmarks.run``'s
plan: the full run takes about an hour on 2 CPU cores, most of it in the
four λ = 0 default calls that spend their whole budget; ``--configs
if,gif5,if_sub256_star`` runs only the bare defaults and the README recipe.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

WEIGHT_DECAY = 1e-4
NAME = "own_model"
ROOT = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the user's model


class CNN(nnx.Module):
    """Conv(1→c1, 3×3) → relu → Conv(c1→c2, 3×3) → relu → avg pool 2×2 → Dense(→h) → relu → Dense(→10).

    With (c1, c2, h) = (16, 32, 64) on 8×8 digits: 38,282 parameters, the issue's count.
    """

    def __init__(self, rngs: nnx.Rngs, c1: int = 16, c2: int = 32, hidden: int = 64, side: int = 8):
        self.conv1 = nnx.Conv(1, c1, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(c1, c2, (3, 3), rngs=rngs)
        self.hidden = nnx.Linear((side // 2) ** 2 * c2, hidden, rngs=rngs)
        self.head = nnx.Linear(hidden, 10, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.conv1(x))
        x = jax.nn.relu(self.conv2(x))
        x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        return self.head(jax.nn.relu(self.hidden(x)))


def user_losses(graphdef):
    """The losses as a user writes them for gifjax, with nnx.split / nnx.merge."""

    def loss_fn(params, x, y):
        logits = nnx.merge(graphdef, params)(x)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return ce + 0.5 * WEIGHT_DECAY * sum(jnp.sum(p ** 2) for p in jax.tree_util.tree_leaves(params))

    def example_loss_fn(params, example):
        x, y = example
        logits = nnx.merge(graphdef, params)(x[None])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y[None])[0]

    return loss_fn, example_loss_fn


def train(model: CNN, x, y, *, epochs: int, batch: int = 64, lr: float = 1e-3, seed: int = 0):
    """Adam on mean cross-entropy + weight decay, shuffled minibatches; returns (graphdef, params)."""
    graphdef, params = nnx.split(model, nnx.Param)
    loss_fn, _ = user_losses(graphdef)
    opt = optax.adam(lr)
    state = opt.init(params)

    @jax.jit
    def step(params, state, xb, yb):
        grads = jax.grad(loss_fn)(params, xb, yb)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    rng = np.random.default_rng(seed)
    batch = min(batch, len(y))
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for i in range(0, len(y) - batch + 1, batch):
            idx = order[i:i + batch]
            params, state = step(params, state, x[idx], y[idx])
    return graphdef, params


# ----------------------------------------------------------------------------- modes and configurations


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    n_train: int | None       # None: all 1,438 digits training images
    n_test: int
    widths: tuple             # (c1, c2, hidden) of CNN
    epochs: int
    subsamples: tuple         # the two Hessian subsample sizes (512, 256)
    guard: float              # seconds a default call may run in its child process
    ref_queries: int          # test columns of the references
    budgets: tuple            # MINRES step budgets of the λ = 0 probes
    ref_steps: int            # step cap of the tight λ* reference
    cost_steps: tuple         # (k1, k2) of the per-step cost
    reps: int                 # timing repetitions after warm-up
    configs: tuple | None = None  # keys of configurations() to run (None: all)
    chunk: int = 16           # influence_scores' default test_chunk_size


MODES = {
    "full": Mode("full", None, 64, (16, 32, 64), 20, (512, 256), 600.0, 8, (100, 300), 1000, (2, 7), 3),
    "smoke": Mode("smoke", 160, 32, (4, 8, 16), 30, (64, 32), 90.0, 4, (10, 30), 300, (1, 11), 3,
                  configs=("if", "if_sub32_star", "if_star", "gif5_sub32_star")),
}


@dataclasses.dataclass(frozen=True)
class Config:
    key: str
    label: str
    method: str = "if"
    subsample: int | None = None
    damping: object = 0.0     # a number, or "star" for λ* = 2·max(|λ_min|, 0.05)
    mask: bool = False


def configurations(mode: Mode) -> list[Config]:
    big, small = mode.subsamples
    every = [
        Config("if", "IF, all defaults"),
        Config(f"if_sub{big}", f"IF, subsample {big}", subsample=big),
        Config(f"if_sub{big}_1e-3", f"IF, subsample {big}, λ = 1e-3", subsample=big, damping=1e-3),
        Config("gif5", "GIF 5 %, all defaults", method="gif", mask=True),
        Config(f"if_sub{small}_star", f"IF, subsample {small}, λ* (README recipe)", subsample=small, damping="star"),
        Config(f"if_sub{big}_star", f"IF, subsample {big}, λ*", subsample=big, damping="star"),
        Config("if_star", "IF, all data, λ*", damping="star"),
        Config(f"gif5_sub{small}_star", f"GIF 5 %, subsample {small}, λ*", method="gif", mask=True,
               subsample=small, damping="star"),
    ]
    return every if mode.configs is None else [c for c in every if c.key in mode.configs]


def call_keywords(cfg: Config, lam_star: float, mask):
    """The keywords of the influence_scores call (beyond the data), and the same as source text."""
    import gifjax

    kw, text = {}, []
    if cfg.method != "if":
        kw["method"] = cfg.method
        text.append(f'method="{cfg.method}"')
    if cfg.mask:
        kw["mask"] = mask
        text.append("mask=mask")
    damping = lam_star if cfg.damping == "star" else float(cfg.damping)
    if cfg.subsample is not None:
        kw["curvature"] = gifjax.Curvature(subsample=cfg.subsample)
        text.append(f"curvature=Curvature(subsample={cfg.subsample})")
    if damping:
        kw["damping"] = damping
        text.append("damping=λ*" if cfg.damping == "star" else f"damping={damping:g}")
    return kw, ", ".join(text) or "(defaults)"


# ----------------------------------------------------------------------------- shared set-up


class Problem:
    """Data, trained model, losses (and, once known, λ* and the GIF mask) for one mode."""

    def __init__(self, mode: Mode, params=None):
        from gifjax.experiments import data

        self.mode = mode
        ds = data.load("digits", seed=0, val_fraction=0.0, max_train=mode.n_train)
        self.x, self.y = jnp.asarray(ds.train.x), jnp.asarray(ds.train.y)
        self.xt, self.yt = jnp.asarray(ds.test.x[:mode.n_test]), jnp.asarray(ds.test.y[:mode.n_test])
        self.x_all_test, self.y_all_test = jnp.asarray(ds.test.x), jnp.asarray(ds.test.y)
        self.model = CNN(nnx.Rngs(0), *mode.widths)
        self.train_s = 0.0
        if params is None:
            t0 = time.perf_counter()
            self.graphdef, self.params = train(self.model, self.x, self.y, epochs=mode.epochs)
            jax.block_until_ready(self.params)
            self.train_s = time.perf_counter() - t0
        else:
            self.graphdef, like = nnx.split(self.model, nnx.Param)
            self.params = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like),
                                                       [jnp.asarray(a) for a in params])
        nnx.update(self.model, self.params)
        self.loss_fn, self.example_loss_fn = user_losses(self.graphdef)
        self.lam_star = None
        self.mask = None

    @property
    def train_examples(self):
        return (self.x, self.y)

    def test(self, q: int):
        return (self.xt[:q], self.yt[:q])

    def accuracy(self, x, y) -> float:
        return float(jnp.mean(nnx.merge(self.graphdef, self.params)(x).argmax(-1) == y))

    def num_params(self) -> int:
        return int(sum(a.size for a in jax.tree_util.tree_leaves(self.params)))

    def rhs_norms(self, q: int, method: str):
        """‖∇ℓ_j‖ (IF) or ‖P∇ℓ_j‖ (GIF's min-norm adjoint) of the first q test points."""
        G = jax.vmap(jax.grad(self.example_loss_fn), (None, 0))(self.params, self.test(q))
        if method == "gif":
            G = jax.tree_util.tree_map(lambda g, m: g * m, G, self.mask)
        sq = sum(jnp.sum(g.reshape(q, -1) ** 2, axis=1) for g in jax.tree_util.tree_leaves(G))
        return np.sqrt(np.asarray(sq, np.float64))


# ----------------------------------------------------------------------------- measuring helpers

_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_SPANS: list = []
_LISTENING: list = []  # registered once, on the first timed() call (importing this module registers nothing)


def _on_span(event, start, end, **_):
    if event in _COMPILE_EVENTS:
        _SPANS.append((start, end))


def compile_seconds(since: float) -> float:
    """Seconds spent tracing / lowering / compiling since ``since`` (time.time()), overlaps merged."""
    spans = sorted((max(s, since), e) for s, e in _SPANS if e > since)
    total, cur_s, cur_e = 0.0, None, None
    for s, e in spans:
        if cur_e is None or s > cur_e:
            total += 0.0 if cur_e is None else cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    return total + (0.0 if cur_e is None else cur_e - cur_s)


def timed(fn):
    """``(wall seconds, compile seconds, result)`` of one call, the result ready."""
    if not _LISTENING:
        jax.monitoring.register_event_time_span_listener(_on_span)
        _LISTENING.append(True)
    since, t0 = time.time(), time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - t0, compile_seconds(since), out


def median_after_warmup(fn, reps: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def spearman(a, b) -> float:
    ra, rb = (np.argsort(np.argsort(v, kind="stable"), kind="stable").astype(np.float64) for v in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = np.sqrt((ra @ ra) * (rb @ rb))
    return float(ra @ rb / den) if den > 0 else float("nan")


def top_overlap(a, b, k: int = 10) -> float:
    top = lambda v: set(np.argsort(-np.abs(v), kind="stable")[:k].tolist())
    return len(top(a) & top(b)) / k


def budget_steps(result: dict | None) -> str:
    """The steps per query named by a call's budget note (``solver="auto"``), or "—"."""
    found = re.search(r"allow (\d+) steps per query", (result or {}).get("warning") or "")
    return found.group(1) if found else "—"


def solution_summary(sol, rhs_norms, chunk: int) -> dict:
    """Convergence, failures, steps, HVPs and relative residuals of a batched Solution."""
    from gifjax.solvers import FAILURES

    conv = np.asarray(sol.converged, bool)
    fails = [FAILURES[int(f)] for f in np.asarray(sol.failure)]
    hvps = np.asarray(sol.num_matvecs, np.int64)
    steps = np.asarray(sol.num_steps, np.int64)
    rel = np.asarray(sol.residual_norm, np.float64) / np.maximum(rhs_norms, np.finfo(np.float64).tiny)
    chunks = [hvps[i:i + chunk] for i in range(0, len(hvps), chunk)]
    return {"n": int(len(conv)), "converged": int(conv.sum()),
            "failures": {f: fails.count(f) for f in sorted(set(fails)) if f != "none"},
            "steps_max": int(steps.max()), "steps_median": float(np.median(steps)),
            "hvps_sum": int(hvps.sum()), "hvps_vmapped": int(sum(c.max() * chunk for c in chunks)),
            "rel_residual_median": float(np.median(rel)), "rel_residual_max": float(np.max(rel))}


# ----------------------------------------------------------------------------- the child: one guarded call


def child_main(spec_path: str) -> int:
    """Run one configuration's default call on all test points; write JSON + scores."""
    import gifjax

    t_start = time.perf_counter()
    spec = json.loads(pathlib.Path(spec_path).read_text())
    mode = MODES[spec["mode"]]
    saved = np.load(spec["arrays"])
    n_params = int(saved["n_params"])
    prob = Problem(mode, params=[saved[f"p{i}"] for i in range(n_params)])
    mask_leaves = [jnp.asarray(saved[f"m{i}"]) for i in range(n_params)]
    prob.mask = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(prob.params), mask_leaves)
    prob.lam_star = float(spec["lam_star"])
    cfg = Config(**spec["config"])
    kw, _ = call_keywords(cfg, prob.lam_star, prob.mask)
    out_path, scores_path = pathlib.Path(spec["out"]), pathlib.Path(spec["scores"])
    record = {"stages": {}}

    def write():
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1, default=float))
        os.replace(tmp, out_path)

    setup_s = time.perf_counter() - t_start
    record["setup_s"] = setup_s
    record["call_started"] = time.time()  # the parent's guard counts from here
    write()
    for q in (mode.n_test,):
        print(f"[child {cfg.key}] influence_scores on {q} test points …", flush=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            wall, comp, res = timed(lambda: gifjax.influence_scores(
                prob.loss_fn, prob.params, prob.example_loss_fn, prob.train_examples, prob.test(q),
                prob.x, prob.y, return_info=True, **kw))
        stage = {"q": q, "wall_s": wall, "compile_s": comp,
                 **solution_summary(res.solution, prob.rhs_norms(q, cfg.method), mode.chunk),
                 "warning": next((str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)), None),
                 "damping": float(np.asarray(res.damping))}
        record["stages"][str(q)] = stage
        np.save(scores_path.with_name(f"{scores_path.stem}_{q}.npy"), np.asarray(res.scores)[:, :mode.ref_queries])
        write()
        print(f"[child {cfg.key}] {q} points: {wall:.1f} s (compile {comp:.1f} s), "
              f"converged {stage['converged']}/{q}", flush=True)
    record["done"] = True
    write()
    return 0


# ----------------------------------------------------------------------------- the parent


class Run:
    def __init__(self, mode: Mode, guard: float):
        self.mode, self.guard, self.t0 = mode, guard, time.perf_counter()
        self.payload = {"benchmark": NAME, "mode": mode.name, "quick": mode.name == "smoke", "status": "running",
                        "guard_s": guard, "chunk": mode.chunk, "cpus": os.cpu_count(),
                        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}

    def log(self, msg: str):
        print(f"[{time.perf_counter() - self.t0:7.1f} s] {msg}", flush=True)

    def save(self):
        from . import common

        self.payload["elapsed_s"] = time.perf_counter() - self.t0
        common.write(NAME, self.payload, markdown(self.payload))


def section_model(run: Run, prob: Problem):
    import gifjax
    from gifjax import selection, solvers

    t0 = time.perf_counter()
    lam_max = float(gifjax.spectrum.eigenvalues(prob.loss_fn, prob.params, prob.x, prob.y, k=1,
                                                which="largest").values[0])
    lam_min = float(gifjax.spectrum.eigenvalues(prob.loss_fn, prob.params, prob.x, prob.y, k=1,
                                                which="smallest").values[0])
    spectrum_s = time.perf_counter() - t0
    prob.lam_star = 2 * max(-lam_min, 0.05)
    scores = selection.activation_scores(prob.model, None, prob.xt)  # the README's rule, on the test points
    prob.mask = selection.select(prob.params, scores, 0.05)
    run.payload["defaults"] = {"max_steps": solvers.DEFAULT_MAX_STEPS,
                               "rtol_symmetric_f32": solvers.default_rtol(jnp.float32),
                               "rtol_normal_f32": solvers.default_rtol(jnp.float32, normal=True),
                               "test_chunk_size": run.mode.chunk,
                               "auto": {"if": "BlockCG, MINRES where indefinite", "gif": "LSTSQ"}}
    run.payload["model"] = {
        "params": prob.num_params(), "n_train": int(len(prob.y)), "n_test": int(len(prob.yt)),
        "train_s": prob.train_s, "epochs": run.mode.epochs,
        "train_accuracy": prob.accuracy(prob.x, prob.y),
        "test_accuracy": prob.accuracy(prob.x_all_test, prob.y_all_test),
        "lambda_max": lam_max, "lambda_min": lam_min, "spectrum_s": spectrum_s, "lambda_star": prob.lam_star,
        "mask_fraction": float(sum(jnp.sum(m) for m in jax.tree_util.tree_leaves(prob.mask)) / prob.num_params()),
    }
    m = run.payload["model"]
    run.log(f"model: {m['params']:,} parameters, {m['n_train']} training images, trained in {m['train_s']:.1f} s, "
            f"test accuracy {m['test_accuracy']:.3f}; λ_max {lam_max:.3f}, λ_min {lam_min:.4f} "
            f"({spectrum_s:.1f} s), λ* = {prob.lam_star:.4f}; GIF mask {m['mask_fraction']:.3%}")


def section_hvp_cost(run: Run, prob: Problem):
    import gifjax
    from gifjax import solvers

    mode, out = run.mode, {}
    q = min(mode.chunk, mode.n_test)
    v = jax.tree_util.tree_map(jnp.ones_like, prob.params)
    k1, k2 = mode.cost_steps
    for sub in (None, *mode.subsamples):
        spec = gifjax.Curvature(subsample=sub)
        xs, ys = spec.subsampled((prob.x, prob.y))
        grad = jax.jit(jax.grad(prob.loss_fn))
        fresh = jax.jit(lambda p, v: spec.resolve(prob.loss_fn, p, prob.x, prob.y)(v))
        t_grad = median_after_warmup(lambda: grad(prob.params, xs, ys), mode.reps)
        t_hvp = median_after_warmup(lambda: fresh(prob.params, v), mode.reps)
        steps = {}
        with warnings.catch_warnings():  # rtol=0 ends in "precision": only the time matters here
            warnings.simplefilter("ignore", RuntimeWarning)
            for k in (k1, k2):
                solve = lambda k=k: gifjax.estimators.adjoint_solves(
                    prob.loss_fn, prob.params, prob.example_loss_fn, prob.test(q), prob.x, prob.y, method="if",
                    solver=solvers.MINRES(rtol=0.0, max_steps=k), curvature=spec).solution.value
                steps[k] = median_after_warmup(solve, mode.reps)
        per_step = max(steps[k2] - steps[k1], 0.0) / (k2 - k1)
        key = "all" if sub is None else str(sub)
        out[key] = {"examples": int(len(ys)), "grad_ms": 1e3 * t_grad, "fresh_hvp_ms": 1e3 * t_hvp,
                    "hvp_over_grad": t_hvp / t_grad, "chunk_step_s": per_step, "queries_per_chunk": q,
                    "per_query_hvp_ms": 1e3 * per_step / q}
        run.log(f"HVP cost ({key}: {len(ys)} examples): grad {1e3 * t_grad:.1f} ms, fresh HVP {1e3 * t_hvp:.1f} ms, "
                f"one step of a {q}-query chunk {per_step:.3f} s ({1e3 * per_step / q:.1f} ms per query)")
        run.payload["hvp_cost"] = out
        run.save()


SETUP_LIMIT_S = 300.0  # a child that has not started its call by then is stopped (an error, not a guard)


def _guarded_child(spec_path: pathlib.Path, out: pathlib.Path, guard: float, env: dict, log: pathlib.Path):
    """Run the child; stop it ``guard`` seconds after its call started. ``(returncode, timed_out, output)``."""
    with open(log.with_suffix(".log"), "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.own_model", "--child", str(spec_path)],
                                cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, text=True)
        t0, started, timed_out = time.time(), None, False
        while proc.poll() is None:
            time.sleep(0.5)
            if started is None and out.exists():
                try:
                    started = json.loads(out.read_text()).get("call_started")
                except ValueError:
                    pass
            now = time.time()
            if (started is not None and now > started + guard) or (started is None and now > t0 + SETUP_LIMIT_S):
                timed_out = started is not None
                proc.kill()
                proc.wait()
                break
    return proc.returncode, timed_out, log.with_suffix(".log").read_text(errors="replace")


def section_calls(run: Run, prob: Problem, workdir: pathlib.Path):
    mode = run.mode
    arrays = workdir / "arrays.npz"
    p_leaves = jax.tree_util.tree_leaves(prob.params)
    m_leaves = jax.tree_util.tree_leaves(prob.mask)
    np.savez(arrays, n_params=len(p_leaves), **{f"p{i}": np.asarray(a) for i, a in enumerate(p_leaves)},
             **{f"m{i}": np.asarray(a) for i, a in enumerate(m_leaves)})
    run.payload["calls"] = calls = {}
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    for cfg in configurations(mode):
        _, text = call_keywords(cfg, prob.lam_star, prob.mask)
        rec = {"label": cfg.label, "method": cfg.method, "keywords": text, "subsample": cfg.subsample,
               "damping": prob.lam_star if cfg.damping == "star" else float(cfg.damping)}
        spec = {"mode": mode.name, "arrays": str(arrays), "lam_star": prob.lam_star, "guard": run.guard,
                "config": dataclasses.asdict(cfg), "out": str(workdir / f"{cfg.key}.json"),
                "scores": str(workdir / f"{cfg.key}.npy")}
        spec_path = workdir / f"{cfg.key}.spec.json"
        spec_path.write_text(json.dumps(spec))
        run.log(f"call {cfg.key}: influence_scores(…, {text}) in a child process, guard {run.guard:.0f} s")
        t0 = time.perf_counter()
        rc, timed_out, tail = _guarded_child(spec_path, pathlib.Path(spec["out"]), run.guard, env, workdir / cfg.key)
        rec["child_s"] = time.perf_counter() - t0
        child = json.loads(pathlib.Path(spec["out"]).read_text()) if pathlib.Path(spec["out"]).exists() else {}
        rec["child_setup_s"] = child.get("setup_s")
        stages = child.get("stages", {})
        full = stages.get(str(mode.n_test))
        rec["stages"] = stages
        bar = [line.strip() for line in tail.replace("\r", "\n").splitlines() if "converged" in line and "|" in line]
        if bar:
            rec["progress_bar"] = bar[-1]
        if full is not None:
            rec.update(status="measured", wall_s=full["wall_s"], compile_s=full["compile_s"], result=full)
        elif timed_out:
            rec.update(status="timed out", wall_s=None,
                       note=f"the call ran past the {run.guard:.0f} s guard")
        else:
            rec.update(status="error", wall_s=None, returncode=rc, output_tail=tail[-2000:])
        calls[cfg.key] = rec
        res = rec.get("result")
        summary = (f"{rec['status']}: {rec['wall_s']:.1f} s for {mode.n_test} points, converged "
                   f"{res['converged']}/{res['n']}, failures {res['failures'] or 'none'}") if res else rec["status"]
        run.log(f"call {cfg.key}: {summary}")
        run.save()


def _probe(prob: Problem, q: int, method: str, solver, subsample, damping, mask=None):
    import gifjax

    kw = {"curvature": gifjax.Curvature(subsample=subsample)}
    if damping:
        kw["damping"] = damping
    if method != "if":
        kw.update(method=method, mask=mask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return timed(lambda: gifjax.influence_scores(
            prob.loss_fn, prob.params, prob.example_loss_fn, prob.train_examples, prob.test(q), prob.x, prob.y,
            solver=solver, return_info=True, progress=False, **kw))


def _compare(A, R) -> dict:
    """Per column: Spearman, top-10 overlap (by |I|) and relative error of A against the reference R."""
    q = R.shape[1]
    return {"spearman": [spearman(A[:, j], R[:, j]) for j in range(q)],
            "top10_overlap": [top_overlap(A[:, j], R[:, j]) for j in range(q)],
            "relative_error": [float(np.linalg.norm(A[:, j] - R[:, j]) / max(np.linalg.norm(R[:, j]), 1e-300))
                               for j in range(q)]}


def section_references(run: Run, prob: Problem, workdir: pathlib.Path):
    from gifjax import solvers

    mode = run.mode
    q = min(mode.ref_queries, mode.n_test)
    norms = prob.rhs_norms(q, "if")
    out = run.payload["references"] = {"queries": q}
    # the tight λ* reference on all training data
    wall, comp, ref = _probe(prob, q, "if", solvers.MINRES(rtol=1e-6, max_steps=mode.ref_steps), None,
                             prob.lam_star)
    R = np.asarray(ref.scores, np.float64)
    out["star"] = {"solver": f"MINRES(rtol=1e-6, max_steps={mode.ref_steps})", "curvature": "all data",
                   "damping": prob.lam_star, "wall_s": wall, "compile_s": comp,
                   **solution_summary(ref.solution, norms, q)}
    run.log(f"IF reference at λ*: {wall:.1f} s, converged {out['star']['converged']}/{q}, "
            f"median steps {out['star']['steps_median']:.0f}")
    for key, rec in run.payload.get("calls", {}).items():
        path = workdir / f"{key}_{mode.n_test}.npy"
        if rec["method"] != "if" or rec["damping"] != prob.lam_star or not path.exists():
            continue
        A = np.load(path).astype(np.float64)[:, :q]
        rec["vs_reference"] = _compare(A, R)
        run.log(f"  {key} vs reference: Spearman min {min(rec['vs_reference']['spearman']):.4f}")
    run.save()
    # the same for GIF at λ*: a tight LSTSQ on all data with the same mask
    gif_keys = [key for key, rec in run.payload.get("calls", {}).items()
                if rec["method"] == "gif" and rec["damping"] == prob.lam_star
                and (workdir / f"{key}_{mode.n_test}.npy").exists()]
    if gif_keys:
        wall, comp, ref = _probe(prob, q, "gif", solvers.LSTSQ(rtol=1e-7, max_steps=mode.ref_steps), None,
                                 prob.lam_star, mask=prob.mask)
        G = np.asarray(ref.scores, np.float64)
        out["gif_star"] = {"solver": f"LSTSQ(rtol=1e-7, max_steps={mode.ref_steps})", "curvature": "all data",
                           "damping": prob.lam_star, "wall_s": wall, "compile_s": comp,
                           **solution_summary(ref.solution, prob.rhs_norms(q, "gif"), q)}
        run.log(f"GIF reference at λ*: {wall:.1f} s, converged {out['gif_star']['converged']}/{q}, "
                f"median steps {out['gif_star']['steps_median']:.0f}")
        for key in gif_keys:
            rec = run.payload["calls"][key]
            A = np.load(workdir / f"{key}_{mode.n_test}.npy").astype(np.float64)[:, :q]
            rec["vs_reference"] = _compare(A, G)
            run.log(f"  {key} vs GIF reference: Spearman min {min(rec['vs_reference']['spearman']):.4f}")
        run.save()
    # λ = 0: step budgets (no tight solve is affordable)
    big = mode.subsamples[0]
    b1, b2 = mode.budgets
    probes = out["budgets"] = {}
    scores = {}
    for name, sub, steps in ((f"all data, {b1} steps", None, b1), (f"subsample {big}, {b1} steps", big, b1),
                             (f"subsample {big}, {b2} steps", big, b2)):
        wall, comp, res = _probe(prob, q, "if", solvers.MINRES(max_steps=steps), sub, 0.0)
        scores[name] = np.asarray(res.scores, np.float64)
        probes[name] = {"subsample": sub, "max_steps": steps, "damping": 0.0, "wall_s": wall, "compile_s": comp,
                        **solution_summary(res.solution, norms, q)}
        run.log(f"λ = 0 budget ({name}): {wall:.1f} s, converged {probes[name]['converged']}/{q}, "
                f"median rel. residual {probes[name]['rel_residual_median']:.3g}")
        run.save()
    a, b = f"subsample {big}, {b1} steps", f"subsample {big}, {b2} steps"
    probes[b]["spearman_vs_fewer_steps"] = [spearman(scores[a][:, j], scores[b][:, j]) for j in range(q)]
    c = f"all data, {b1} steps"
    probes[a]["spearman_vs_all_data"] = [spearman(scores[a][:, j], scores[c][:, j]) for j in range(q)]
    run.save()


# ----------------------------------------------------------------------------- markdown


def _fmt(v, spec=".3g"):
    return "—" if v is None else format(v, spec)


def markdown(p: dict) -> str:
    from .common import table

    mode = p.get("mode", "?")
    lines = [f"## Own nnx model, documented defaults ({mode}, {p.get('status', '?')})", ""]
    m = p.get("model")
    if m:
        lines += [f"nnx CNN, {m['params']:,} parameters, {m['n_train']} training / {m['n_test']} test points, "
                  f"trained in {m['train_s']:.1f} s (test accuracy {m['test_accuracy']:.3f}). Hessian on all "
                  f"data: λ_max {m['lambda_max']:.3f}, λ_min {m['lambda_min']:.4f} ({m['spectrum_s']:.1f} s); "
                  f"λ* = 2·max(|λ_min|, 0.05) = {m['lambda_star']:.4f}. GIF mask: {m['mask_fraction']:.2%} of "
                  f"the parameters. {p.get('cpus')} CPUs, load average at start "
                  f"{', '.join(f'{x:.1f}' for x in (p.get('load_average_start') or []))}.", ""]
    cost = p.get("hvp_cost")
    if cost:
        rows = [[k, c["examples"], c["grad_ms"], c["fresh_hvp_ms"], c["hvp_over_grad"], c["chunk_step_s"],
                 c["per_query_hvp_ms"]] for k, c in cost.items()]
        lines += ["### HVP cost (Hessian batch: all data vs subsample)", "",
                  table(["Hessian data", "examples", "grad ms", "fresh HVP ms", "HVP / grad",
                         f"one solver step, {next(iter(cost.values()))['queries_per_chunk']} queries (s)",
                         "per query ms"], rows), ""]
    calls = p.get("calls")
    if calls:
        n = m["n_test"] if m else "?"
        rows = []
        for key, r in calls.items():
            res = r.get("result") or {}
            vs = r.get("vs_reference")
            wall = _fmt(r["wall_s"], ".1f") if r.get("wall_s") is not None else f"> {p['guard_s']:.0f}"
            fails = ", ".join(f"{k}: {v}" for k, v in (res.get("failures") or {}).items()) or ("none" if res else "—")
            rows.append([r["label"], f"`{r['keywords']}`", r["status"], wall,
                         _fmt(r.get("compile_s"), ".1f"),
                         f"{res['converged']}/{res['n']}" if res else "—", fails,
                         res.get("hvps_sum", "—"), res.get("steps_max", "—"),
                         _fmt(res.get("rel_residual_median")) if res else "—",
                         _fmt(min(vs["spearman"]), ".4f") if vs else "—", budget_steps(res)])
        lines += [f"### influence_scores on {n} test points (child process, guard {p['guard_s']:.0f} s)", "",
                  table(["configuration", "keywords", "how", f"wall s ({n} pts)", "compile s", "converged",
                         "failures", "HVPs Σ", "max steps", "median rel. res.", "Spearman vs ref (min)",
                         "budget (steps/query)"], rows), "",
                  "*how*: measured = the call ran to its end; timed out = it did not finish within the guard. "
                  "*budget*: the steps per query that solvers.AUTO_FLOP_BUDGET left the call (from its warning; "
                  "— where the default caps fit and no warning named the budget).", ""]
    refs = p.get("references")
    if refs and "star" in refs:
        lines += [f"### References ({refs['queries']} test points)", ""]
        for name, method in (("star", "if"), ("gif_star", "gif")):
            s = refs.get(name)
            if not s:
                continue
            lines += [f"{method.upper()} reference at λ*: {s['solver']} on {s['curvature']}, {s['wall_s']:.1f} s, "
                      f"converged {s['converged']}/{s['n']}, median {s['steps_median']:.0f} steps, median rel. "
                      f"residual {s['rel_residual_median']:.2g}. Each λ* call above against it, per column "
                      "(Spearman; top-10 overlap by |I|; relative error):", ""]
            for key, r in (calls or {}).items():
                vs = r.get("vs_reference")
                if vs and r["method"] == method:
                    lines.append(f"- {r['label']}: Spearman " + " ".join(f"{v:.3f}" for v in vs["spearman"])
                                 + "; top-10 " + " ".join(f"{v:.1f}" for v in vs["top10_overlap"])
                                 + f"; rel. error {min(vs['relative_error']):.2g}–{max(vs['relative_error']):.2g}")
            lines.append("")
        budgets = refs.get("budgets") or {}
        if budgets:
            per_col = lambda v: " ".join(f"{x:.2f}" for x in v) if v else "—"
            rows = [[name, b["wall_s"], f"{b['converged']}/{b['n']}",
                     ", ".join(f"{k}: {v}" for k, v in b["failures"].items()) or "none",
                     b["rel_residual_median"], b["rel_residual_max"],
                     per_col(b.get("spearman_vs_fewer_steps")), per_col(b.get("spearman_vs_all_data"))]
                    for name, b in budgets.items()]
            lines += ["λ = 0, where no tight solve is affordable: MINRES step budgets, compile included. "
                      "Spearman per column of the subsample's scores against its own shorter budget, and "
                      "against all data at the same budget:", "",
                      table(["budget", "wall s", "converged", "failures", "median rel. res.", "max rel. res.",
                             "Spearman vs fewer steps", "Spearman vs all data"], rows), ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- entry point


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", "--quick", action="store_true", dest="smoke", help="tiny sizes (~2 min)")
    parser.add_argument("--results", help="results folder (default benchmarks/results or $GIFJAX_BENCH_RESULTS)")
    parser.add_argument("--guard", type=float, default=None, help="seconds per guarded default call")
    parser.add_argument("--configs", help="comma-separated configuration keys to run (default: the mode's)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args.child)
    from . import common

    if args.results:
        common.RESULTS = pathlib.Path(args.results)
    mode = MODES["smoke" if args.smoke else "full"]
    if args.configs:
        mode = dataclasses.replace(mode, configs=tuple(args.configs.split(",")))
    run = Run(mode, args.guard if args.guard is not None else mode.guard)
    run.log(f"own_model ({mode.name}), results → {common.RESULTS}")
    prob = Problem(mode)
    section_model(run, prob)
    run.save()
    section_hvp_cost(run, prob)
    with tempfile.TemporaryDirectory(prefix="own_model_") as tmp:
        workdir = pathlib.Path(tmp)
        section_calls(run, prob, workdir)
        section_references(run, prob, workdir)
    run.payload["status"] = "complete"
    run.save()
    run.log(f"done; wrote {common.RESULTS / (NAME + '.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
