"""Accelerator benchmark (issue 15): HVP cost, many-query solves, bf16 and sharding on a GPU.

    python -m benchmarks.accelerator [--smoke] [--results DIR] [--deadline 450] [--hard-limit 475]

Written to run unattended on one NVIDIA H100/H200 in under 8 minutes (it runs on
any JAX backend; on CPU use ``--smoke``). Two models, both *untrained* (random
initialisation) on random N(0, 1) inputs with uniform random labels (nothing is
downloaded), 32×32×3 inputs, 10 classes, loss = mean cross-entropy + ½·5e-4·‖θ‖²:

* ``mlp``: 3072 → 2048 → 2048 → 2048 → 10, ReLU (14.7M parameters);
* ``resnet18``: the CIFAR-style ResNet-18 of ``gifjax.experiments.models``
  (11.2M parameters; BatchNorm in eval mode with its initial statistics).

Measurements (each on its own: a failure such as an out-of-memory error is
recorded with its message and the rest still run):

1. **HVP ÷ gradient** on a large batch (MLP 1024, ResNet 256): a fresh
   ``gifjax.hvp`` and the per-product cost inside a solver loop (the operator
   linearised once, as solvers apply it: (T(11) − T(1)) / 10 in one jitted
   loop), each ÷ one ``jax.grad``. Medians after warm-up with
   ``jax.block_until_ready``; compile times reported separately.
2. **Damping** λ = max(2|λ_min|, 0.01·λ_max) from the Ritz values of a
   30-step Lanczos run on the solve batch (as ``benchmarks.solvers``): an
   untrained network's Hessian is indefinite (ResNet-18 here: λ_min ≈ −0.2
   λ_max), and CG needs H + λI positive definite.
3. **Many-query IF solves** s_j = (H + λI)⁻¹ ∇ℓ(test_j), Hessian batch MLP 256
   / ResNet 32, at Q = 1 / 16 / 256 through ``gifjax.estimators.setup(...,
   adjoint=True).solve_many``: CG and MINRES vmapped over the queries, and
   ``BlockCG`` (one Krylov space shared by a block); rtol 1e-3, at most 50
   steps. Per query: wall time (compile excluded), HVPs, the relative
   residual ‖∇ℓ_j − (H + λI)s_j‖ / ‖∇ℓ_j‖ the solver certifies, converged
   share and failure codes. At Q = 256 the vmapped solvers run as 16 calls
   of the Q = 16 program, and BlockCG in blocks of the largest power of two
   whose memory (``memory_analysis`` of the compiled Q = 16 block, scaled)
   fits 80 % of the device's: at 11–15M parameters one [256, n] float32 array
   is 11–15 GB, and a solver keeps several.
4. **bf16 vs f32**: HVP and loop-product time with the model in bfloat16
   (``gifjax.mixed_precision`` around the apply function, cross-entropy and L2
   in float32, float32 solver state) against section 1; Q = 16 CG solves
   with float32 and bfloat16 products at the float32 default tolerance
   (``solvers.default_rtol(float32)`` = 1e-4, what ``rtol=None`` means) and at
   1e-2: relative error against a float32 reference computed at
   ``jax.default_matmul_precision("highest")`` (CG, rtol 1e-5, ≤ 300 steps;
   the default precision may use TF32 on GPUs), converged share and failure
   codes ("precision": the tolerance is below what the products reach).
5. **Sharding** (``gifjax.parallel.adjoint_solve``): fixed work (64 queries
   × 20 CG steps, rtol 0) on one device (t1), then query-parallel (N × 1 mesh)
   and data-parallel (1 × N mesh) on all N local devices: speedup t1 / tN,
   efficiency t1 / (N·tN), agreement with t1's answers. On one device only
   t1 and the device count are recorded.

Order: models, 1, 2, CG and BlockCG at Q ≤ 16, bf16 HVP time, CG and BlockCG
at Q = 256, bf16 accuracy, sharding (MLP), MINRES, sharding (ResNet) — MLP
before ResNet within each. A global deadline (``--deadline``, default 450 s
from the start of the process) skips what remains, and any measurement
predicted (from the measured compile and run times) to end after it; each is
recorded as skipped with its reason. A watchdog ends the process at
``--hard-limit`` (default deadline + 25 s) whatever is running, marking that
measurement aborted. The JSON and Markdown are rewritten after every
measurement, so an interrupted run keeps everything measured so far.

``--smoke``: a tiny MLP (13k parameters) and the small CNN (20k) on 8×8×3
inputs, Q = 1 / 2 (Q = 2 as two calls), 8 steps; MINRES, bf16 and sharding on
the MLP only; about 30 s on a CPU (mostly compiling), the same JSON schema.

Writes benchmarks/results/accelerator.json and accelerator.md (``--results
DIR`` or GIFJAX_BENCH_RESULTS elsewhere). Not in ``benchmarks.run``'s plan:
the full configuration needs an accelerator (on a CPU, ResNet-18 solves take
minutes each).
"""

from __future__ import annotations

import time

T_START = time.perf_counter()  # the deadline counts from here, before JAX's import and start-up

import os  # noqa: E402

# a dedicated benchmark process may use 90 % of the GPU's memory (JAX's default is 75 %); read when
# the GPU backend starts, so it must be set before the first device call (a value already set wins)
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from collections import Counter  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import gifjax  # noqa: E402
from gifjax import parallel, solvers  # noqa: E402
from gifjax.experiments import models  # noqa: E402

from . import common  # noqa: E402
from .common import median_seconds, median_time, table  # noqa: E402

NAME = "accelerator"
SCHEMA_VERSION = 1
WEIGHT_DECAY = 5e-4
tree_map = jax.tree_util.tree_map


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    kind: str            # a gifjax.experiments.models name
    kwargs: tuple        # its fields, as (name, value) pairs
    cost_batch: int      # batch of the HVP ÷ gradient timing
    solve_batch: int     # the Hessian batch of the solves


@dataclasses.dataclass(frozen=True)
class Config:
    mode: str
    image: tuple
    models: tuple                # (name, ModelSpec) pairs, in priority order
    queries: tuple               # Q values of the solves
    chunk: int                   # queries per compiled call of the vmapped solvers (and the bf16 Q)
    max_block: int | None        # cap on BlockCG's block (None: from the device memory)
    max_steps: int
    rtol: float
    reference_rtol: float
    reference_steps: int
    lanczos_steps: int
    loop_products: int           # K of (T(1 + K) − T(1)) / K
    cost_reps: int
    time_budget_s: float         # wall time spent on repetitions of one solve timing
    max_reps: int
    parallel_queries: int
    parallel_steps: int
    first_model_only: tuple = ()  # sections run for the first model only ("MINRES (vmap)", "bf16", "parallel")


FULL = Config(
    mode="full", image=(32, 32, 3),
    models=(("mlp", ModelSpec("mlp", (("hidden", (2048, 2048, 2048)),), 1024, 256)),
            ("resnet18", ModelSpec("resnet18", (("width", 64),), 256, 32))),
    queries=(1, 16, 256), chunk=16, max_block=None, max_steps=50, rtol=1e-3,
    reference_rtol=1e-5, reference_steps=300, lanczos_steps=30, loop_products=10, cost_reps=10,
    time_budget_s=3.0, max_reps=5, parallel_queries=64, parallel_steps=20)

SMOKE = Config(
    mode="smoke", image=(8, 8, 3),
    models=(("mlp", ModelSpec("mlp", (("hidden", (64,)),), 64, 32)),
            ("cnn", ModelSpec("cnn", (), 32, 16))),
    queries=(1, 2), chunk=1, max_block=1, max_steps=8, rtol=1e-3,
    reference_rtol=1e-5, reference_steps=8, lanczos_steps=8, loop_products=10, cost_reps=3,
    time_budget_s=0.2, max_reps=3, parallel_queries=2, parallel_steps=4,
    first_model_only=("MINRES (vmap)", "bf16", "parallel"))


# ----------------------------------------------------------------------------- bookkeeping


class Recorder:
    """The result payload, written after every measurement; deadline, predictions, watchdog."""

    def __init__(self, cfg: Config, deadline_s: float, hard_limit_s: float):
        self.cfg = cfg
        self.deadline = T_START + deadline_s
        self.hard_limit = T_START + hard_limit_s
        self.lock = threading.RLock()
        self.current = None
        dev = jax.devices()[0]
        stats = _memory_stats(dev)
        self.payload = {
            "benchmark": NAME, "schema_version": SCHEMA_VERSION, "mode": cfg.mode, "status": "running",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "elapsed_s": 0.0,
            "deadline_s": deadline_s, "hard_limit_s": hard_limit_s, "jax_version": jax.__version__,
            "device": {"platform": dev.platform, "device_kind": dev.device_kind,
                       "count": jax.device_count(), "local_count": jax.local_device_count(),
                       "memory_bytes_limit": stats.get("bytes_limit")},
            "matmul_precision": str(jax.config.jax_default_matmul_precision or "default"),
            "config": _jsonable(dataclasses.asdict(cfg)),
            "notes": ["Parameters are an untrained random initialisation; inputs are random N(0, 1), "
                      "labels uniform random (no data downloaded).",
                      "Times: median wall time after warm-up with jax.block_until_ready; compile "
                      "time excluded and reported separately.",
                      "float32 products use JAX's default matmul precision (which may be TF32 on "
                      "NVIDIA GPUs); the bf16 section's reference uses 'highest'."],
            "models": {}, "hvp_cost": {}, "damping": {}, "solves": {},
            "bf16": {"hvp_cost": {}, "accuracy": {}}, "parallel": {}}

    def elapsed(self) -> float:
        return time.perf_counter() - T_START

    def log(self, msg: str):
        print(f"[{self.elapsed():7.1f} s] {msg}", flush=True)

    def _set(self, path, value):
        node = self.payload
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value

    def write(self):
        with self.lock:
            self.payload["elapsed_s"] = self.elapsed()
            common.write(NAME, self.payload, markdown(self.payload))

    def measure(self, path: tuple, fn, predict=None):
        """Run ``fn() → dict`` and record it under ``path``; skip past the deadline or when predicted late."""
        label = "/".join(path)
        left = self.deadline - time.perf_counter()
        reason = None
        if left <= 0:
            reason = f"deadline ({self.deadline - T_START:.0f} s) passed"
        elif predict is not None:
            try:
                guess = predict()
            except Exception:  # noqa: BLE001 — a prediction that cannot be made does not block
                guess = None
            if guess is not None and guess > left:
                reason = f"predicted {guess:.0f} s > {left:.0f} s left before the deadline"
        if reason:
            entry = {"status": "skipped", "reason": reason}
            self.log(f"{label}: skipped ({reason})")
        else:
            with self.lock:
                self.current = path
            self.log(f"{label} ...")
            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # non-convergence is recorded, not warned
                    entry = {"status": "ok", **fn()}
            except Exception as e:  # noqa: BLE001 — an OOM or any failure is a result too
                entry = {"status": "error", "error": f"{type(e).__name__}: {e}"[:3000],
                         "traceback": traceback.format_exc(limit=4)[-3000:]}
            entry["wall_s"] = time.perf_counter() - t0
            self.log(f"{label}: {entry['status']} in {entry['wall_s']:.1f} s" + (
                f" — {entry['error'].splitlines()[0][:200]}" if entry["status"] == "error" else ""))
        with self.lock:
            self.current = None
            self._set(path, _jsonable(entry))
            self.write()
        return entry

    def watchdog(self):
        """End the process at the hard limit, whatever is running, keeping the results so far."""
        def wait():
            time.sleep(max(0.0, self.hard_limit - time.perf_counter()))
            with self.lock:
                if self.current is not None:
                    self._set(self.current, {"status": "aborted", "reason": "hard limit reached"})
                self.payload["status"] = "aborted (hard limit)"
                self.write()
            print(f"[{self.elapsed():7.1f} s] hard limit reached: results written, exiting", flush=True)
            os._exit(3)

        threading.Thread(target=wait, daemon=True).start()


def _memory_stats(dev) -> dict:
    try:
        return dev.memory_stats() or {}
    except Exception:  # noqa: BLE001 — backends without memory statistics
        return {}


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.generic, jax.Array)):
        return np.asarray(obj).item() if np.ndim(obj) == 0 else np.asarray(obj).tolist()
    if isinstance(obj, float) and not np.isfinite(obj):
        return str(obj)  # JSON has no inf / nan
    return obj


# ----------------------------------------------------------------------------- models and programs


def num_params(params) -> int:
    return int(sum(p.size for p in jax.tree_util.tree_leaves(params)))


def row_norms(tree):
    """[Q] Euclidean norms of the rows (leading axis) of a batched pytree, in float32."""
    leaves = jax.tree_util.tree_leaves(tree)
    sq = sum(jnp.sum(jnp.square(a.reshape(a.shape[0], -1).astype(jnp.float32)), axis=1) for a in leaves)
    return jnp.sqrt(sq)


@jax.jit
def relative_errors(a, b):
    """Per row ‖a_j − b_j‖ / ‖b_j‖."""
    return row_norms(tree_map(jnp.subtract, a, b)) / row_norms(b)


class Bench:
    """One model: parameters, random data on the device, losses and compiled programs."""

    def __init__(self, name: str, spec: ModelSpec, cfg: Config, seed: int = 0):
        self.name, self.spec, self.cfg = name, spec, cfg
        self.module = models.create(spec.kind, 10, **dict(spec.kwargs))
        rng = np.random.default_rng(seed)
        n = max(spec.cost_batch, spec.solve_batch)
        q = max(max(cfg.queries), cfg.parallel_queries)
        self.x = jnp.asarray(rng.standard_normal((n,) + cfg.image, np.float32))
        self.y = jnp.asarray(rng.integers(0, 10, n).astype(np.int32))
        self.xq = jnp.asarray(rng.standard_normal((q,) + cfg.image, np.float32))
        self.yq = jnp.asarray(rng.integers(0, 10, q).astype(np.int32))
        # models.init, jitted: one compile instead of ResNet-18's hundreds of eager ops
        variables = dict(jax.jit(lambda key, x: self.module.init(key, x, train=False))(
            jax.random.key(seed), self.x[:1]))
        self.params, rest = models.split_variables(variables)
        self.loss = models.make_loss_fn(self.module, variables, weight_decay=WEIGHT_DECAY)
        self.example_loss = models.make_example_loss_fn(self.module, variables)
        # bfloat16 model (parameters, inputs and BatchNorm statistics cast), float32 loss on its logits
        apply16 = gifjax.mixed_precision(
            lambda p, rest, x: self.module.apply({"params": p, **rest}, x, train=False))
        self.loss16 = lambda p, x, y: (models.cross_entropy_loss(apply16(p, rest, x), y)
                                       + models.l2_penalty(p, WEIGHT_DECAY))
        self.n = num_params(self.params)
        self.damping = None
        # (variant, label, chunk, precision, solver treedef) → (executable, compile s, memory bytes)
        self.compiled = {}
        self.cost = {}         # "f32" / "bf16" → hvp_cost entry (for predictions)
        self._solve_fns = {}

    @property
    def solve_data(self):
        return self.x[:self.spec.solve_batch], self.y[:self.spec.solve_batch]

    def solve_fn(self, variant: str):
        """jit of: test gradients → setup(...).solve_many → (Solution, ‖∇ℓ_j‖)."""
        if variant not in self._solve_fns:
            loss = self.loss if variant == "f32" else self.loss16
            example_loss = self.example_loss  # test gradients stay in full precision

            def solve(solver, params, xq, yq, x, y, damping):
                G = jax.vmap(jax.grad(example_loss), in_axes=(None, 0))(params, (xq, yq))
                s = gifjax.estimators.setup(loss, params, x, y, method="if", solver=solver, damping=damping,
                                            adjoint=True)
                return s.solve_many(G), row_norms(G)

            self._solve_fns[variant] = jax.jit(solve)
        return self._solve_fns[variant]

    def program(self, variant: str, label: str, solver, chunk: int, precision: str | None = None):
        """The compiled solve for ``chunk`` queries (cached: Q = 256 reuses Q = 16's program)."""
        key = (variant, label, chunk, precision, jax.tree_util.tree_structure(solver))  # static fields too
        if key not in self.compiled:
            x, y = self.solve_data
            args = (solver, self.params, self.xq[:chunk], self.yq[:chunk], x, y, jnp.float32(self.damping))
            t0 = time.perf_counter()
            with jax.default_matmul_precision(precision) if precision else _nothing():
                exe = self.solve_fn(variant).lower(*args).compile()
            mem = exe.memory_analysis()
            self.compiled[key] = (exe, time.perf_counter() - t0, _program_bytes(mem))
            return self.compiled[key]
        exe, _, nbytes = self.compiled[key]
        return exe, 0.0, nbytes

    def per_example_product_s(self) -> float | None:
        c = self.cost.get("f32")
        if not c:
            return None
        return max(c["loop_product_ms"], c["hvp_ms"] / 2) / 1e3 / c["batch"]

    def compile_guess_s(self) -> float:
        c = self.cost.get("f32")
        return 2.0 * c["compile_s"]["loop"] if c else 0.0


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _program_bytes(mem) -> dict:
    if mem is None:
        return {}
    return {k: int(getattr(mem, f"{k}_size_in_bytes", 0) or 0) for k in ("argument", "output", "temp")}


# ----------------------------------------------------------------------------- 1. HVP ÷ gradient


def hvp_cost(b: Bench, variant: str) -> dict:
    cfg, loss = b.cfg, (b.loss if variant == "f32" else b.loss16)
    x, y = b.x[:b.spec.cost_batch], b.y[:b.spec.cost_batch]
    v = tree_map(lambda a: jnp.full_like(a, 1e-2), b.params)

    def loop(p, v, x, y, k):  # the operator exactly as a solver loop applies it (linearised once)
        op = solvers.prepared(gifjax.operators.Curvature().resolve(loss, p, x, y))
        return jax.lax.fori_loop(0, k, lambda i, a: tree_map(lambda ai, hi: ai + 1e-4 * hi, a, op(a)), v)

    programs = {"grad": (jax.grad(loss), (b.params, x, y)),
                "hvp": (lambda p, v, x, y: gifjax.hvp(loss, p, v, x, y), (b.params, v, x, y)),
                "loop": (loop, (b.params, v, x, y, np.int32(1)))}
    compiled, compile_s = {}, {}
    for key, (fn, args) in programs.items():
        t0 = time.perf_counter()
        compiled[key] = jax.jit(fn).lower(*args).compile()
        compile_s[key] = time.perf_counter() - t0
    reps = cfg.cost_reps
    t_grad = median_time(compiled["grad"], b.params, x, y, warmup=2, reps=reps)
    t_hvp = median_time(compiled["hvp"], b.params, v, x, y, warmup=2, reps=reps)
    k = cfg.loop_products
    t_1 = median_time(compiled["loop"], b.params, v, x, y, np.int32(1), warmup=2, reps=reps)
    t_k = median_time(compiled["loop"], b.params, v, x, y, np.int32(1 + k), warmup=1, reps=reps)
    t_loop = (t_k - t_1) / k
    out = {"params": b.n, "batch": b.spec.cost_batch, "grad_ms": 1e3 * t_grad, "hvp_ms": 1e3 * t_hvp,
           "loop_product_ms": 1e3 * t_loop, "hvp_over_grad": t_hvp / t_grad,
           "loop_product_over_grad": t_loop / t_grad, "reps": reps, "compile_s": compile_s}
    b.cost[variant] = out
    return out


# ----------------------------------------------------------------------------- 2. damping


def damping(b: Bench) -> dict:
    """λ = max(2|λ_min|, 0.01·λ_max) from the Ritz values of one Lanczos run on the solve batch."""
    x, y = b.solve_data
    steps = b.cfg.lanczos_steps

    def ritz(p, x, y):
        return gifjax.spectrum.eigenvalues(b.loss, p, x, y, k=steps, which="largest", num_steps=steps).values

    t0 = time.perf_counter()
    exe = jax.jit(ritz).lower(b.params, x, y).compile()
    compile_s = time.perf_counter() - t0
    values = np.asarray(exe(b.params, x, y))
    lam_max, lam_min = float(values.max()), float(values.min())
    b.damping = max(2 * max(-lam_min, 0.0), 0.01 * lam_max)
    return {"lambda_max_estimate": lam_max, "lambda_min_estimate": lam_min, "damping": b.damping,
            "rule": "max(2·|λ_min|, 0.01·λ_max)", "lanczos_steps": steps, "batch": b.spec.solve_batch,
            "condition_estimate": (lam_max + b.damping) / (lam_min + b.damping), "compile_s": compile_s}


def ensure_damping(b: Bench):
    if b.damping is None:  # the estimate failed or was skipped: a fixed moderate value
        b.damping = 1.0


# ----------------------------------------------------------------------------- 3. many-query solves


def solver_for(label: str, cfg: Config, rtol=None, max_steps=None):
    rtol = cfg.rtol if rtol is None else rtol
    steps = cfg.max_steps if max_steps is None else max_steps
    cls = {"CG (vmap)": solvers.CG, "MINRES (vmap)": solvers.MINRES, "BlockCG": solvers.BlockCG}[label]
    return cls(rtol=rtol, max_steps=steps)


def block_size(b: Bench, label: str, q: int) -> tuple[int, str]:
    """Queries per compiled call: the chunk for vmapped solvers, the largest block that fits for BlockCG."""
    cfg = b.cfg
    if q <= cfg.chunk:
        return q, "all queries in one call"
    if label != "BlockCG":
        c = math.gcd(q, cfg.chunk)
        return c, f"vmapped solves in calls of {c} (the Q = {c} program)"
    cap = min(q, cfg.max_block or q)
    limit = _memory_stats(jax.devices()[0]).get("bytes_limit")
    if not limit:  # no memory statistics (CPU): one block, or the configured cap
        cap = math.gcd(q, cap)
        return cap, f"block capped at {cap}" if cap < q else "one block"
    key = ("f32", label, cfg.chunk, None, jax.tree_util.tree_structure(solver_for(label, cfg)))
    if key in b.compiled and b.compiled[key][2]:
        mem = b.compiled[key][2]
        per_column, fixed = (mem["temp"] + mem["output"]) / cfg.chunk, mem["argument"]
        how = f"compiled memory of the Q = {cfg.chunk} block, {_gib(per_column)} per query"
    else:
        per_column, fixed = 16 * 4 * b.n, 4 * b.n
        how = "16 float32 parameter vectors per query (no compiled program to measure)"
    block = 1
    while block * 2 <= cap and q % (block * 2) == 0 and fixed + block * 2 * per_column <= 0.8 * limit:
        block *= 2
    return block, f"block {block}: {how}, 80 % of {_gib(limit)}"


def _gib(nbytes) -> str:
    return f"{nbytes / 2**30:.3g} GiB"


def solve_queries(b: Bench, label: str, q: int) -> dict:
    cfg = b.cfg
    ensure_damping(b)
    solver = solver_for(label, cfg)
    c, why = block_size(b, label, q)
    exe, compile_s, mem = b.program("f32", label, solver, c)
    calls = -(-q // c)
    x, y = b.solve_data
    lam = jnp.float32(b.damping)
    chunks = [(b.xq[i * c:(i + 1) * c], b.yq[i * c:(i + 1) * c]) for i in range(calls)]

    def run():
        outs = []
        for xq, yq in chunks:
            sol, g = exe(solver, b.params, xq, yq, x, y, lam)
            outs.append((sol._replace(value=None), g))  # each call's answers are freed once computed
        return jax.block_until_ready(outs)

    seconds, outs, reps = timed(run, cfg)
    diag = lambda f: np.concatenate([np.asarray(f(sol, g)) for sol, g in outs])[:q]
    rel = diag(lambda s, g: s.residual_norm / g)
    hvps = diag(lambda s, g: s.num_matvecs)
    return {"Q": q, "queries_per_call": c, "calls": calls, "layout": why, "rtol": cfg.rtol,
            "max_steps": cfg.max_steps, "damping": b.damping, "compile_s": compile_s,
            "program_bytes": mem, "seconds": seconds, "reps": reps, "ms_per_query": 1e3 * seconds / q,
            "hvps_per_query": float(hvps.mean()), "max_hvps": int(hvps.max()),
            "steps_mean": float(diag(lambda s, g: s.num_steps).mean()),
            "rel_residual_median": float(np.median(rel)), "rel_residual_max": float(rel.max()),
            "converged_share": float(diag(lambda s, g: s.converged).mean()),
            "failures": failure_counts(diag(lambda s, g: s.failure))}


def timed(run, cfg: Config):
    """(median seconds, last result, reps): the first run after compiling is the warm-up; a run longer
    than half the time budget is timed once (its warm-up run is the measurement)."""
    t0 = time.perf_counter()
    out = run()
    first = time.perf_counter() - t0
    if 2 * first > cfg.time_budget_s:
        return first, out, 1
    reps = int(min(cfg.max_reps, max(2, cfg.time_budget_s // max(first, 1e-6))))
    seconds, out = median_seconds(run, warmup=0, reps=reps)
    return seconds, out, reps


def failure_counts(codes) -> dict:
    return {solvers.FAILURES[int(k)]: int(v) for k, v in sorted(Counter(np.asarray(codes).tolist()).items())}


def predict_solve(b: Bench, label: str, q: int, rec: Recorder):
    """Seconds for a fresh compile (if needed) and two runs: from the same solver's Q = chunk
    measurement when there is one, else from the product time and ``max_steps``."""
    def guess():
        c, _ = block_size(b, label, q)
        fresh = ("f32", label, c, None, jax.tree_util.tree_structure(solver_for(label, b.cfg))) not in b.compiled
        small = rec.payload["solves"].get(b.name, {}).get(label, {}).get(str(b.cfg.chunk), {})
        if small.get("status") == "ok":
            compile_s = max(small["compile_s"], b.compile_guess_s()) if fresh else 0.0
            return compile_s + 2 * small["ms_per_query"] / 1e3 * q
        per = b.per_example_product_s()
        if per is None:
            return None
        run = per * b.spec.solve_batch * -(-q // c) * c * (b.cfg.max_steps + 3)
        return (b.compile_guess_s() if fresh else 0.0) + 2 * run
    return guess


def predict_work(b: Bench, products_per_query: int, queries: int, programs: int):
    """Seconds for ``programs`` fresh compiles and ``products_per_query`` HVPs for each of ``queries``."""
    def guess():
        per = b.per_example_product_s()
        if per is None:
            return None
        return programs * b.compile_guess_s() + per * b.spec.solve_batch * queries * products_per_query
    return guess


# ----------------------------------------------------------------------------- 4. bf16 vs f32


def bf16_accuracy(b: Bench) -> dict:
    cfg = b.cfg
    ensure_damping(b)
    q = cfg.chunk
    x, y = b.solve_data
    lam = jnp.float32(b.damping)
    xq, yq = b.xq[:q], b.yq[:q]

    ref_solver = solvers.CG(rtol=cfg.reference_rtol, max_steps=cfg.reference_steps)
    # XLA:CPU multiplies float32 exactly; on GPUs the default may use TF32 for float32 products
    precision = None if jax.default_backend() == "cpu" else "highest"
    exe, ref_compile, _ = b.program("f32", "CG (vmap)", ref_solver, q, precision=precision)
    ref, ref_norm = exe(ref_solver, b.params, xq, yq, x, y, lam)
    out = {"Q": q, "damping": b.damping, "reference": {
        "solver": f"CG rtol {cfg.reference_rtol:g}, ≤ {cfg.reference_steps} steps, float32, "
                  f"matmul precision {precision or 'default (exact float32 on CPU)'}", "compile_s": ref_compile,
        "hvps_per_query": float(jnp.mean(ref.num_matvecs)),
        "rel_residual_max": float(jnp.max(ref.residual_norm / ref_norm)),
        "converged_share": float(jnp.mean(ref.converged)), "failures": failure_counts(ref.failure)}}
    f32_default = solvers.default_rtol(jnp.float32)
    runs = {}
    for variant in ("f32", "bf16"):
        for tag, rtol in ((f"default rtol ({f32_default:g})", f32_default), ("rtol 0.01", 1e-2)):
            solver = solvers.CG(rtol=rtol, max_steps=cfg.max_steps)
            exe, compile_s, _ = b.program(variant, "CG (vmap)", solver, q)
            sol, gnorm = exe(solver, b.params, xq, yq, x, y, lam)
            err = np.asarray(relative_errors(sol.value, ref.value))
            runs[f"{variant}, {tag}"] = {
                "variant": variant, "rtol": rtol, "max_steps": cfg.max_steps, "compile_s": compile_s,
                "rel_error_median": float(np.median(err)), "rel_error_max": float(err.max()),
                "hvps_per_query": float(jnp.mean(sol.num_matvecs)),
                "rel_residual_median": float(jnp.median(sol.residual_norm / gnorm)),
                "converged_share": float(jnp.mean(sol.converged)), "failures": failure_counts(sol.failure)}
            del sol
    out["runs"] = runs
    return out


# ----------------------------------------------------------------------------- 5. sharding


def sharded(b: Bench) -> dict:
    cfg = b.cfg
    ensure_damping(b)
    devices = jax.devices()
    n_dev = len(devices)
    q = cfg.parallel_queries
    x, y = b.solve_data
    grads = jax.jit(jax.vmap(jax.grad(b.example_loss), in_axes=(None, 0)))(b.params, (b.xq[:q], b.yq[:q]))
    solver = solvers.CG(rtol=0.0, max_steps=cfg.parallel_steps)  # fixed work: every query runs all steps

    def timing(mesh, chunk, **axes):
        call = lambda: parallel.adjoint_solve(b.loss, b.params, grads, x, y, mesh=mesh, method="if",
                                              solver=solver, damping=b.damping, test_chunk_size=chunk, **axes)
        t0 = time.perf_counter()
        jax.block_until_ready(call())  # compile + first run
        first = time.perf_counter() - t0
        seconds, sol = median_seconds(lambda: jax.block_until_ready(call()), warmup=0,
                                      reps=2 if first > cfg.time_budget_s else 3)
        return seconds, sol, first

    chunk1 = min(cfg.chunk, q)
    t1, sol1, first1 = timing(parallel.make_mesh(1, 1, devices=devices[:1]), chunk1)
    out = {"devices": n_dev, "Q": q, "steps": cfg.parallel_steps, "batch": b.spec.solve_batch,
           "single": {"seconds": t1, "ms_per_query": 1e3 * t1 / q, "first_call_s": first1,
                      "queries_per_call": chunk1,
                      "hvps_per_query": float(jnp.mean(sol1.num_matvecs))}}
    if n_dev == 1:
        out["note"] = "one device: only the single-device time (speedup and efficiency need N > 1)"
        return out
    modes = {"query": (parallel.make_mesh(n_dev, 1), max(1, min(cfg.chunk, q // n_dev)), {}),
             "data": (parallel.make_mesh(1, n_dev), chunk1, {"query_axis": None, "data_axis": "data"})}
    for mode, (mesh, chunk, axes) in modes.items():
        if mode == "data" and b.spec.solve_batch % n_dev:
            out[mode] = {"status": "skipped", "reason": f"batch {b.spec.solve_batch} not a multiple of {n_dev}"}
            continue
        try:
            tn, soln, first = timing(mesh, chunk, **axes)
            on_first = lambda t: jax.device_put(t, devices[0])  # gather the sharded answers to compare
            diff = float(jnp.max(relative_errors(on_first(soln.value), on_first(sol1.value))))
            out[mode] = {"status": "ok", "seconds": tn, "ms_per_query": 1e3 * tn / q, "first_call_s": first,
                         "queries_per_call": chunk, "speedup": t1 / tn, "efficiency": t1 / (n_dev * tn),
                         "max_rel_diff_vs_single": diff}
        except Exception as e:  # noqa: BLE001 — recorded, the other mode still runs
            out[mode] = {"status": "error", "error": f"{type(e).__name__}: {e}"[:3000]}
    return out


# ----------------------------------------------------------------------------- Markdown


def markdown(p: dict) -> str:
    dev = p["device"]
    lines = [f"## Accelerator benchmark ({p['mode']}, {p['status']})", "",
             f"{dev['count']} × {dev['device_kind']} ({dev['platform']}), jax {p['jax_version']}, "
             f"matmul precision {p['matmul_precision']}, started {p['started']}, "
             f"{p['elapsed_s']:.0f} s (deadline {p['deadline_s']:.0f} s). " + " ".join(p["notes"]), ""]
    ok = lambda e: isinstance(e, dict) and e.get("status") == "ok"
    rows = [[m, e.get("params", ""), e.get("cost_batch", ""), e.get("solve_batch", ""), e.get("status")]
            for m, e in p["models"].items()]
    if rows:
        lines += [table(["model", "params", "cost batch", "solve batch", "built"], rows), ""]

    def cost_rows(section):
        return [[m, e["batch"], e["grad_ms"], e["hvp_ms"], e["hvp_over_grad"], e["loop_product_ms"],
                 e["loop_product_over_grad"]] for m, e in section.items() if ok(e)]
    cost_header = ["model", "batch", "grad ms", "HVP ms", "HVP ÷ grad", "loop product ms", "loop ÷ grad"]
    if cost_rows(p["hvp_cost"]):
        lines += ["### HVP ÷ gradient (float32)", "", table(cost_header, cost_rows(p["hvp_cost"])), ""]
    rows = [[m, e["lambda_max_estimate"], e["lambda_min_estimate"], e["damping"], e["condition_estimate"]]
            for m, e in p["damping"].items() if ok(e)]
    if rows:
        lines += ["### Damping λ = max(2|λ_min|, 0.01·λ_max) (Lanczos Ritz values, solve batch)", "",
                  table(["model", "λ_max", "λ_min", "λ", "κ(H + λI) estimate"], rows), ""]
    rows = []
    for m, by_solver in p["solves"].items():
        for s, by_q in by_solver.items():
            for q, e in by_q.items():
                if ok(e):
                    rows.append([m, s, int(q), f"{e['calls']} × {e['queries_per_call']}", e["ms_per_query"],
                                 e["hvps_per_query"], e["rel_residual_median"], e["rel_residual_max"],
                                 e["converged_share"], _fmt_failures(e["failures"])])
    if rows:
        lines += [f"### IF solves per query (rtol {p['config']['rtol']:g}, ≤ {p['config']['max_steps']} steps)",
                  "", table(["model", "solver", "Q", "calls × queries", "ms / query", "HVPs / query",
                             "rel. residual (median)", "(max)", "converged", "failures"], rows), ""]
    if cost_rows(p["bf16"]["hvp_cost"]):
        rows = []
        for m, e in p["bf16"]["hvp_cost"].items():
            f = p["hvp_cost"].get(m, {})
            if ok(e):
                rows.append([m, e["batch"], e["hvp_ms"], e["loop_product_ms"],
                             f["hvp_ms"] / e["hvp_ms"] if ok(f) else "—",
                             f["loop_product_ms"] / e["loop_product_ms"] if ok(f) else "—"])
        lines += ["### bf16 model (mixed_precision) vs float32: HVP time", "",
                  table(["model", "batch", "bf16 HVP ms", "bf16 loop product ms", "f32 ÷ bf16 HVP",
                         "f32 ÷ bf16 loop"], rows), ""]
    rows = []
    for m, e in p["bf16"]["accuracy"].items():
        if ok(e):
            for name, r in e["runs"].items():
                rows.append([m, name, r["rel_error_median"], r["rel_error_max"], r["hvps_per_query"],
                             r["converged_share"], _fmt_failures(r["failures"])])
    if rows:
        ref = next(e["reference"]["solver"] for e in p["bf16"]["accuracy"].values() if ok(e))
        lines += [f"### bf16 vs float32 CG solves (Q = {p['config']['chunk']}, ≤ {p['config']['max_steps']} "
                  f"steps): relative error against a float32 reference ({ref})", "",
                  table(["model", "products, tolerance", "rel. error (median)", "(max)", "HVPs / query",
                         "converged", "failures"], rows), ""]
    rows = []
    for m, e in p["parallel"].items():
        if ok(e):
            rows.append([m, e["devices"], "single", e["single"]["ms_per_query"], "—", "—"])
            for mode in ("query", "data"):
                r = e.get(mode)
                if isinstance(r, dict) and r.get("status") == "ok":
                    rows.append([m, e["devices"], mode, r["ms_per_query"], r["speedup"], r["efficiency"]])
    if rows:
        lines += ["### Sharded adjoint solves (gifjax.parallel, fixed work)", "",
                  table(["model", "devices", "mode", "ms / query", "speedup t1/tN", "efficiency t1/(N·tN)"],
                        rows), ""]
    other = [("/".join(path), e) for path, e in _leaves(p) if e.get("status") in ("error", "skipped", "aborted")]
    if other:
        lines += ["### Not measured", ""]
        lines += [f"* `{k}`: {e['status']} — {(e.get('error') or e.get('reason', '')).splitlines()[0][:300]}"
                  for k, e in other]
    return "\n".join(lines)


def _fmt_failures(f: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in f.items())


def _leaves(node, path=()):
    """(path, entry) of every measurement entry (a dict with a 'status') in the payload."""
    if isinstance(node, dict):
        if "status" in node and path and path[0] != "status":
            yield path, node
            return
        for k, v in node.items():
            if isinstance(v, dict):
                yield from _leaves(v, path + (k,))


# ----------------------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", "--quick", action="store_true", dest="smoke",
                        help="tiny models, Q = 1 / 2, a few steps (CPU, ~30 s); --quick is the same")
    parser.add_argument("--results", help="results folder (default benchmarks/results or $GIFJAX_BENCH_RESULTS)")
    parser.add_argument("--deadline", type=float, default=450.0,
                        help="seconds from the start after which remaining measurements are skipped")
    parser.add_argument("--hard-limit", type=float, default=None,
                        help="seconds from the start at which the process exits (default deadline + 25)")
    args = parser.parse_args(argv)
    if args.results:
        common.RESULTS = pathlib.Path(args.results)
    cfg = SMOKE if args.smoke else FULL
    if args.smoke:  # compile time dominates a smoke run: skip LLVM's optimisations (before the backend starts)
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = (flags + " --xla_backend_optimization_level=0").strip()
    rec = Recorder(cfg, args.deadline, args.hard_limit or args.deadline + 25.0)
    rec.watchdog()
    run(rec)
    return 0


def run(rec: Recorder) -> dict:
    """Every measurement, in priority order; returns the payload (also written after each step)."""
    cfg = rec.cfg
    d = rec.payload["device"]
    rec.log(f"{cfg.mode}: {d['count']} × {d['device_kind']} ({d['platform']}), jax {jax.__version__}, "
            f"deadline {rec.deadline - T_START:.0f} s, results → {common.RESULTS}")

    benches = {}
    for name, spec in cfg.models:
        def build(name=name, spec=spec):
            b = Bench(name, spec, cfg)
            benches[name] = b
            return {"kind": spec.kind, "fields": dict(spec.kwargs), "params": b.n,
                    "cost_batch": spec.cost_batch, "solve_batch": spec.solve_batch,
                    "weight_decay": WEIGHT_DECAY, "init": "untrained (random initialisation)",
                    "data": "random N(0, 1) inputs, uniform random labels"}
        rec.measure(("models", name), build)
    names = list(benches)
    only_first = lambda section: names[:1] if section in cfg.first_model_only else names

    for m in names:
        rec.measure(("hvp_cost", m), lambda m=m: hvp_cost(benches[m], "f32"))
    for m in names:
        rec.measure(("damping", m), lambda m=m: damping(benches[m]))

    small = [q for q in cfg.queries if q <= cfg.chunk]
    large = [q for q in cfg.queries if q > cfg.chunk]

    def solves(qs, labels):
        for q in qs:
            for m in names:
                for label in labels:
                    if m in only_first(label):
                        rec.measure(("solves", m, label, str(q)), lambda m=m, label=label, q=q: solve_queries(
                            benches[m], label, q), predict=predict_solve(benches[m], label, q, rec))

    cg_block = ("CG (vmap)", "BlockCG")
    solves(small, cg_block)
    for m in only_first("bf16"):
        rec.measure(("bf16", "hvp_cost", m), lambda m=m: hvp_cost(benches[m], "bf16"))
    solves(large, cg_block)
    for m in only_first("bf16"):  # reference at 'highest' precision (≈ 4× the products' cost) + 4 solves
        rec.measure(("bf16", "accuracy", m), lambda m=m: bf16_accuracy(benches[m]),
                    predict=predict_work(benches[m], 4 * cfg.reference_steps + 4 * cfg.max_steps, cfg.chunk, 3))

    def shard(m):
        n_dev = jax.device_count()
        rec.measure(("parallel", m), lambda: sharded(benches[m]), predict=predict_work(
            benches[m], 4 * (cfg.parallel_steps + 3) * (1 if n_dev == 1 else 2), cfg.parallel_queries,
            1 if n_dev == 1 else 3))

    for m in only_first("parallel")[:1]:
        shard(m)
    solves(small + large, ("MINRES (vmap)",))
    for m in only_first("parallel")[1:]:
        shard(m)

    with rec.lock:
        skipped = sum(1 for _, e in _leaves(rec.payload) if e.get("status") == "skipped")
        failed = sum(1 for _, e in _leaves(rec.payload) if e.get("status") == "error")
        rec.payload["status"] = "complete" if not skipped else "deadline: some measurements skipped"
        rec.payload["counts"] = {"skipped": skipped, "errors": failed}
        rec.write()
    rec.log(f"done: {rec.payload['status']}, {failed} error(s); wrote {common.RESULTS / (NAME + '.json')}")
    print(markdown(rec.payload), flush=True)
    return rec.payload


if __name__ == "__main__":
    raise SystemExit(main())
