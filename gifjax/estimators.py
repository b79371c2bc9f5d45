r"""Influence estimators IF / PIF / FIF / GIF and influence scores.

This is the one place where curvature operators, masks and solvers meet.
For a gradient ``g`` (of the loss of the data to remove, scaled as you wish)
and H_λ = ∇²loss_fn(params, \*args) + λI, with P the element mask of target
parameters:

======= ==========================================  ===========================
method  parameter change Δ                          solved as
======= ==========================================  ===========================
``if``  Δ = H_λ⁻¹ g (all parameters)                 symmetric  H_λ x = g
``pif`` Δ = P H_λ⁻¹ g (projected IF)                 symmetric, then masked
``fif`` Δ_t = [H_λ]_tt⁻¹ g_t (freeze θ_f)            symmetric  P H_λ P x = P g
``gif`` Δ = argmin_{x = Px} ‖H_λ x − g‖₂ (Lyu+ 24)   least squares, A = H_λ P
======= ==========================================  ===========================

GIF keeps the linearised stationarity condition of *all* parameters
satisfied in least squares while moving only θ_t; its normal equations are
[H_λ²]_tt x = [H_λ g]_t, positive semi-definite even where H is indefinite.
With an all-true mask and invertible H_λ the four coincide.

Sign convention (Koh & Liang 2017): Δ is the parameter change that *removes*
the data behind ``g`` (for one example z of n, g = ∇ℓ(z)/n gives the
leave-one-out change θ̂₋z − θ̂ ≈ Δ). Influence scores use the *upweighting*
sign,

    I[i, j] = −∇ℓ(test_j)ᵀ Δ(∇ℓ(train_i)),

so removing training point i changes test loss j by ≈ −I[i, j] / n.
Scores need one solve per *test* point: ∇ℓ(test)ᵀ Δ(g) = sᵀ g with s the
adjoint solve (H_λ⁻¹ P∇ for PIF; the min-norm solution of P H_λ s = P∇ for
GIF, because (H_λ P)⁺ᵀ = (P H_λ)⁺).

Every function here reads the same way: build the curvature operator
(:class:`gifjax.operators.Curvature` from ``curvature``, ``damping``,
``chunk_size``, ``axis_name``), take the problem from the estimator table
(:class:`gifjax.operators.Estimator` from ``method`` and ``mask``), and call
the solver (``init`` once, ``compute`` per right-hand side; the adjoint is
``transpose``). The options, shared by every estimator:

* ``curvature="hessian"`` (H = ∇²loss_fn), ``gifjax.GGN(apply_fn,
  output_loss)`` (the Gauss–Newton matrix Jᵀ H_out J, PSD by construction),
  or a whole :class:`gifjax.operators.Curvature` value;
* ``damping=λ`` or ``gifjax.AutoDamping(fraction, key=...)``: λ = fraction ×
  the mean eigenvalue of the curvature (a Hutchinson trace estimate),
  reported as ``damping`` in the results;
* ``solver``: ``"auto"`` (if/pif/fif: MINRES for fewer than 8 queries, block
  CG with a MINRES fallback for a chunk of 8 or more; LSTSQ for gif; their
  step caps lowered where a call would exceed
  ``gifjax.solvers.AUTO_FLOP_BUDGET``, about 4 minutes of curvature
  products on 2 CPU cores — see ``gifjax.solvers.auto``), a name, a
  configured value such as ``gifjax.solvers.CG(rtol=1e-8)``, or
  ``gifjax.lowrank.LowRank(factors)`` (one shared rank-k factorisation, no
  HVP per query);
* ``throw=True`` raises ``RuntimeError`` when a solve did not converge
  (outside ``jit``); by default check ``converged`` in the result.

Every result is differentiable: ``jax.grad`` / ``jax.jvp`` with respect to
``params``, ``g``, the data and the damping run implicit differentiation
through the solves (``gifjax.solvers``), for every solver.

This module is ``gifjax.estimators``; its functions are re-exported at the
top level (``gifjax.influence`` is the function).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _checks, _progress, _repr, _tree
from . import curvature as _curv
from . import solvers as _solvers
from ._chunks import map_in_chunks
from .operators import METHODS, Estimator, Problem, curvature_spec
from .solvers import FAILURES, Solution, Solver, SolverState, check_solution, get_solver, warn_failures

__all__ = ["Adjoints", "BLOCK_BYTES", "Influence", "MAX_BLOCK", "METHODS", "QUERY_CHUNK", "Scores", "Setup",
           "adjoint_solve", "adjoint_solves", "influence", "influence_scores", "query_chunk_size",
           "removal_gradient", "self_influence", "setup"]

tree_map = jax.tree_util.tree_map


@_repr.compact_repr()
class Influence(NamedTuple):
    """Result of :func:`influence`.

    Attributes:
      delta: parameter change Δ, a pytree like ``params``; exactly zero
        outside the mask for pif / fif / gif.
      solution: the solver's :class:`gifjax.solvers.Solution` (its ``value``
        is the unmasked solve; for pif that is the full IF update).
      damping: the damping λ actually used (an array): the number given,
        the value :class:`gifjax.AutoDamping` resolved to, or the low-rank factors'.

    ``converged``, ``failure``, ``num_hvps``, ``num_steps``,
    ``residual_norm`` and ``backward_error`` forward to ``solution``.
    """

    delta: Any
    solution: Solution
    damping: Any = None

    converged = property(lambda self: self.solution.converged)
    failure = property(lambda self: self.solution.failure)
    num_hvps = property(lambda self: self.solution.num_matvecs)
    num_steps = property(lambda self: self.solution.num_steps)
    residual_norm = property(lambda self: self.solution.residual_norm)
    backward_error = property(lambda self: self.solution.backward_error)


@_repr.compact_repr()
class Setup(NamedTuple):
    """One estimator's problem and solver state, ready for any number of right-hand sides."""

    problem: Problem
    solver: Solver
    state: SolverState

    @property
    def damping(self):
        return jnp.asarray(self.problem.operator.damping)

    def solve(self, g) -> Solution:
        """The estimator applied to ``g``: ``Solution`` whose value is the answer (Δ, or s)."""
        sol = self.solver.compute(self.state, self.problem.rhs(g))
        return sol._replace(value=self.problem.post(sol.value))

    def solve_many(self, G) -> Solution:
        """:meth:`solve` for a batch ``G`` (leading axis): vmapped, or one block solve for block solvers."""
        sol = self.solver.compute_many(self.state, jax.vmap(self.problem.rhs)(G))
        return sol._replace(value=jax.vmap(self.problem.post)(sol.value))


def setup(loss_fn: Callable, params, *args, mask=None, method: str = "gif", solver="auto", damping=0.0,
          chunk_size: int | None = None, curvature="hessian", axis_name: str | None = None,
          adjoint: bool = False, progress: bool = False, fn: str = "setup") -> Setup:
    r"""Build operator → take the problem from the estimator table → initialise the solver.

    The one path every estimator function takes (arguments as in
    :func:`influence`). ``adjoint=True`` gives the scores' system, the
    transpose: ``setup(...).solve(∇ℓ_test)`` is the s with ∇ᵀΔ(g) = sᵀg.
    ``progress=True`` ticks the open progress bar once per curvature product.
    Build it once and ``jax.vmap`` ``.solve`` over many right-hand sides: the
    solver's shared work (a matrix, factors, :class:`gifjax.AutoDamping`'s
    trace) is done once.

    Example:
      >>> import jax, jax.numpy as jnp, gifjax
      >>> loss = lambda w: 0.5 * jnp.sum(jnp.array([1.0, 2.0, 4.0]) * w ** 2)
      >>> s = gifjax.estimators.setup(loss, jnp.zeros(3), method="if", solver="dense")
      >>> jax.vmap(s.solve)(jnp.eye(3)).value.diagonal()
      Array([1.  , 0.5 , 0.25], dtype=float32)
    """
    estimator, solver, spec = _configure(fn, params, mask, method, solver, curvature, damping, chunk_size,
                                         axis_name)
    spec = solver.configure(spec, estimator, fn)
    C = spec.resolve(loss_fn, params, *args, trace_mask=estimator.trace_mask)
    problem = estimator.problem(_progress.counting(C, progress))
    state = solver.init(problem.operator, problem.form)
    if adjoint:
        problem, state = problem.T, solver.transpose(state)
    return Setup(problem, solver, state)


def _configure(fn, params, mask, method, solver, curvature, damping, chunk_size, axis_name):
    """The estimator, the solver value and the curvature spec behind the public keywords (checked)."""
    estimator = Estimator(method, mask).check(fn, params)
    solver = get_solver(solver, form=estimator.form, fn=fn)
    return estimator, solver, curvature_spec(fn, curvature, damping=damping, chunk_size=chunk_size,
                                             axis_name=axis_name)


def _checked(fn, loss_fn, params, args, *, mask, method, solver, curvature, damping, chunk_size, axis_name,
             queries: int = 1, block: int | None = 1):
    """Every check of :func:`setup`, run now in Python: ``(solver value, curvature spec, budget note, block)``.

    Inside the compiled program (:func:`_compiled`) values are traced, so the
    checks that read them (an empty mask, a negative damping, a summed loss
    with ``chunk_size``, low-rank factors built for another damping) happen
    here first, with the concrete values. ``solver="auto"`` is resolved for a
    call of ``queries`` solves, ``block`` at a time (``None``: :func:`query_chunk_size`),
    within :data:`gifjax.solvers.AUTO_FLOP_BUDGET`; the note (``""`` when the
    default caps fit) says what that cost the call, for its failure warning.
    """
    estimator, value, spec = _configure(fn, params, mask, method, solver, curvature, damping, chunk_size,
                                        axis_name)
    block = query_chunk_size(queries, params, value) if block is None else block
    note = ""
    if isinstance(solver, str) and solver == "auto":
        flops = _product_flops(loss_fn, params, args, spec, block)
        steps = _solvers.auto_steps(flops, queries=queries, form=estimator.form)
        if steps is not None:
            value = _solvers.auto(estimator.form, steps=steps)
            note = (f"solver='auto' kept this call within its work budget (solvers.AUTO_FLOP_BUDGET: "
                    f"{queries} queries × {flops:.2g} FLOPs per curvature product allow {steps} steps per "
                    f"query); to spend more pass solver=gifjax.solvers.auto(steps=...), or make the system "
                    f"cheaper or better conditioned: damping, curvature=gifjax.Curvature(subsample=512)")
    value.configure(spec, estimator, fn)
    if spec.chunk_size is not None and spec.ggn is None:
        _curv.check_mean_loss(loss_fn, params, args, spec.chunk_size)
    return value, spec, note, block


#: Queries per chunk (``test_chunk_size=None``) for solvers that solve each query on its own.
QUERY_CHUNK = 16
#: A block solver's chunk (``test_chunk_size=None``): as many queries as keep one block
#: (chunk × dim θ values) within this many bytes, between QUERY_CHUNK and MAX_BLOCK.
BLOCK_BYTES = 32 * 2**20
MAX_BLOCK = 128


def query_chunk_size(n: int, params, solver) -> int:
    """The ``test_chunk_size`` / ``example_chunk_size`` that ``None`` means for ``n`` queries.

    A block solver (``BlockCG``, or the default's ``Fallback`` to it) shares
    one Krylov space per chunk, so a bigger chunk converges in fewer steps
    (the peer benchmark's 100 queries: one block 6.3 s, chunks of 16 28 s):
    it gets as many queries as keep one block within :data:`BLOCK_BYTES`
    (between :data:`QUERY_CHUNK` and :data:`MAX_BLOCK`), split evenly over
    the chunks and rounded up to a multiple of 8 (one compile serves 8 sizes
    of n; the padding queries are zero and leave the block at once). Any
    other solver vmaps single solves: :data:`QUERY_CHUNK`.

    Example:
      >>> import jax.numpy as jnp, gifjax
      >>> p = jnp.zeros(4810)                       # 4,810 float32 parameters: ≥ 128 fit 32 MiB
      >>> size = lambda n, solver: gifjax.estimators.query_chunk_size(n, p, solver)
      >>> size(100, gifjax.solvers.auto()), size(300, gifjax.solvers.auto()), size(100, gifjax.solvers.MINRES())
      (104, 104, 16)
    """
    first = solver.first if isinstance(solver, _solvers.Fallback) and n >= solver.min_batch else solver
    if not isinstance(first, _solvers.BlockCG):
        return QUERY_CHUNK
    size = sum(np.size(a) * jnp.result_type(a).itemsize for a in jax.tree_util.tree_leaves(params))
    cap = int(min(MAX_BLOCK, max(QUERY_CHUNK, BLOCK_BYTES // max(size, 1))))
    per_chunk = -(-n // -(-n // cap))
    return min(cap, -(-per_chunk // 8) * 8)


def _product_flops(loss_fn, params, args, spec, block: int) -> float | None:
    """XLA's estimate of one curvature product's floating-point operations (per vector), or None.

    Lowered, not compiled, for ``block`` vectors at once (the primal pass is
    shared by a block, as in the solves), on abstract values: it works under
    a caller's ``jit`` too. None when the estimate is unavailable (e.g. a
    loss closing over an outer transformation's tracer).
    """
    spec = spec.replace(axis_name=None)  # the estimate is per device: no collective to lower
    product = lambda p, V, *a: jax.vmap(spec.undamped(loss_fn, p, *a)[0])(V)
    shape = lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))
    params_ = tree_map(shape, params)
    V = tree_map(lambda x: jax.ShapeDtypeStruct((block,) + x.shape, x.dtype), params_)
    try:
        cost = jax.jit(product).lower(params_, V, *tree_map(shape, args)).cost_analysis()
    except Exception:  # noqa: BLE001 — only an estimate: without it the default caps apply
        return None
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = (cost or {}).get("flops")
    return float(flops) / block if flops else None


def _compiled(*static_argnames):
    """Run the decorated body as one jitted program, compiled once per static configuration.

    Called eagerly, the loops inside (``lax.map`` over chunks, the solvers'
    ``while_loop``) would compile afresh on every call, because every call
    builds new closures; one jitted program compiles once per loss functions,
    method, chunk sizes, solver kind, shapes and dtypes, and a second call
    only runs it (tiny models: seconds → milliseconds). Only top-level calls
    with concrete inputs compile: under a caller's ``jit`` / ``vmap`` /
    ``grad`` / ``shard_map`` the body runs inline, as do calls with an
    unhashable static value or an input that is not a pytree of arrays (e.g.
    a solver class of your own that is not registered as a pytree). A loss
    that closes over a tracer of an outer transformation (``jax.grad`` of a
    weight decay captured in ``loss_fn``) cannot be compiled on its own: the
    body then runs inline too.
    """

    def wrap(body):
        jitted = jax.jit(body, static_argnames=static_argnames)

        @functools.wraps(body)
        def call(*args, **kw):
            leaves = jax.tree_util.tree_leaves([args] + [v for k, v in kw.items() if k not in static_argnames])
            try:
                hash(tuple(kw[k] for k in static_argnames))
            except TypeError:
                return body(*args, **kw)
            if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves) or not all(
                    isinstance(leaf, (jax.Array, np.ndarray, np.generic, int, float, complex)) for leaf in leaves):
                return body(*args, **kw)  # inside a transformation (or not arrays): inline, as before
            try:
                return jitted(*args, **kw)
            except (TypeError, jax.errors.UnexpectedTracerError):
                # loss_fn closes over a tracer of an outer jax.grad / vmap: run inline (a genuine
                # TypeError is raised again there). Other errors (XLA runtime, OOM) are not retried.
                return body(*args, **kw)

        return call

    return wrap


def removal_gradient(loss_fn: Callable, params, *removed, num_train: int):
    r"""g for removing a group U of m of ``num_train`` = n training examples.

        g = m / (n − m) · ∇_θ loss_fn(θ̂, \*removed)

    with ``loss_fn`` the training objective (mean loss + regulariser R) and
    ``removed`` U's data (leading axis m). Then Δ = H⁻¹ g with H the Hessian on
    the *remaining* n − m examples is the Newton step to the retrained optimum
    — exact for quadratic objectives (see ``tests/test_influence.py``): at θ̂,
    ∇L_remaining = −m/(n − m) · (∇ mean_U ℓ + ∇R). With H of all n examples,
    use m/n instead (the difference is second order).

    Example:
      >>> import jax.numpy as jnp, gifjax
      >>> loss = lambda w, x: jnp.mean((x - w) ** 2)
      >>> float(gifjax.removal_gradient(loss, jnp.zeros(()), jnp.ones(2), num_train=10))
      -0.5
    """
    m = _curv.batch_size_of("removal_gradient", removed)
    if isinstance(num_train, bool) or not isinstance(num_train, (int, np.integer)) or num_train <= m:
        raise _checks.error("removal_gradient", "num_train", repr(num_train),
                            f"an int larger than the {m} removed examples",
                            "pass the size of the whole training set.")
    return _tree.scale(m / (int(num_train) - m), jax.grad(loss_fn)(params, *removed))


def influence(loss_fn: Callable, params, g, *args, mask=None, method: str = "gif",
              solver="auto", damping=0.0, chunk_size: int | None = None,
              curvature="hessian", axis_name: str | None = None, throw: bool = False) -> Influence:
    r"""Parameter change Δ that removes the data behind ``g`` (IF / PIF / FIF / GIF).

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar``, the training objective
        whose Hessian H is used (mean loss, plus any regulariser).
      params: trained parameters θ̂ (any pytree).
      g: pytree like ``params`` (traced); e.g. for removing a group U of m
        of n examples with H on the remaining data, g = m/(n − m) · ∇ mean_U ℓ.
      *args: data for ``loss_fn``.
      mask: boolean element mask like ``params`` (traced), or ``None`` for
        all parameters; ignored (but validated) by ``method="if"``.
      method: ``"if"``, ``"pif"``, ``"fif"`` or ``"gif"`` (static).
      solver: ``"auto"`` (if/pif/fif: MINRES for fewer than 8 queries, block
        CG with a MINRES fallback for a chunk of 8 or more — see
        ``gifjax.solvers.AUTO``; for gif LSTSQ, or block CG on the normal
        system with an LSTSQ fallback for 8 or more; step caps lowered to keep
        the call within ``gifjax.solvers.AUTO_FLOP_BUDGET``, see
        ``gifjax.solvers.auto``), a name from
        ``gifjax.solvers.SOLVERS``, or a configured value such as
        ``gifjax.solvers.CG(rtol=1e-8, max_steps=500)``, or
        ``gifjax.lowrank.LowRank(factors)`` (shared low-rank factorisation).
      damping: λ ≥ 0 (traced), H → H + λI; or :class:`gifjax.AutoDamping`.
      chunk_size: if set (static), HVPs average over chunks of that many
        examples of ``args`` (all leaves batched), bounding memory.
      curvature: ``"hessian"`` (default), ``gifjax.GGN(apply_fn,
        output_loss)`` for the PSD Gauss–Newton matrix (static), or a
        :class:`gifjax.operators.Curvature` value.
      axis_name: data parallelism inside ``jax.shard_map`` (static): ``args``
        is this device's equal-sized shard, ``loss_fn`` its mean, and every
        curvature product is ``pmean`` ed over this axis before damping
        (see :class:`gifjax.operators.Curvature`; ready-made: :mod:`gifjax.parallel`).
      throw: raise ``RuntimeError`` if the solve did not converge (static;
        outside ``jit`` only).

    Returns:
      :class:`Influence` with ``delta`` and the solver's diagnostics.

    Example:
      >>> import jax, jax.numpy as jnp, gifjax
      >>> X = jnp.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]); y = jnp.array([1.0, 2.0, 0.0])
      >>> loss = lambda w, X, y: 0.5 * jnp.mean((X @ w - y) ** 2) + 0.05 * w @ w
      >>> w = jnp.zeros(2)
      >>> g = jax.grad(loss)(w, X[:1], y[:1])
      >>> out = gifjax.influence(loss, w, g, X, y, method="gif", solver="dense")
      >>> out.delta.shape, bool(out.converged)
      ((2,), True)
      >>> # differentiable: how Δ's first entry moves with the damping
      >>> d = jax.grad(lambda lam: gifjax.influence(loss, w, g, X, y, method="if", damping=lam).delta[0])
      >>> bool(d(0.1) > 0)
      True

    Warning:
      CG and BlockCG need H_λ positive definite (or P H_λ P for fif); on a
      non-convex model they stop with ``failure="indefinite"`` — add damping,
      use the default MINRES (or ``"lsmr"``), or use GIF, whose least-squares
      system is PSD.
    """
    fn = "influence"
    _checks.check_like(fn, "g", g, params)
    solver, spec, note, _ = _checked(fn, loss_fn, params, args, mask=mask, method=method, solver=solver,
                                     curvature=curvature, damping=damping, chunk_size=chunk_size,
                                     axis_name=axis_name)
    out = _influence(params, g, args, mask, solver, spec, loss_fn=loss_fn, method=method, fn=fn)
    if throw:
        check_solution(fn, out.solution)
    warn_failures(fn, out.solution, note)
    return out


@_compiled("loss_fn", "method", "fn")
def _influence(params, g, args, mask, solver, spec, *, loss_fn, method, fn) -> Influence:
    s = setup(loss_fn, params, *args, mask=mask, method=method, solver=solver, curvature=spec, fn=fn)
    sol = s.solver.compute(s.state, s.problem.rhs(g))
    return Influence(s.problem.post(sol.value), sol, s.damping)


def adjoint_solve(loss_fn: Callable, params, test_grad, *args, mask=None, method: str = "if",
                  solver="auto", damping=0.0, chunk_size: int | None = None,
                  curvature="hessian", axis_name: str | None = None, throw: bool = False) -> Solution:
    """s with ``test_gradᵀ Δ(g) = sᵀ g`` for every g — the one solve per test point.

    ``value`` is s: H_λ⁻¹∇ (if), H_λ⁻¹P∇ (pif), (P H_λ P)⁺P∇ (fif), and
    H_λ P (P H_λ² P)⁺ P∇ (gif; min-norm solution of P H_λ s = P∇). Arguments
    as in :func:`influence`. For many test points use :func:`adjoint_solves`
    (or :func:`setup` with ``adjoint=True``): the set-up is then shared.
    """
    fn = "adjoint_solve"
    _checks.check_like(fn, "test_grad", test_grad, params)
    solver, spec, note, _ = _checked(fn, loss_fn, params, args, mask=mask, method=method, solver=solver,
                                     curvature=curvature, damping=damping, chunk_size=chunk_size,
                                     axis_name=axis_name)
    sol = _adjoint_solve(params, test_grad, args, mask, solver, spec, loss_fn=loss_fn, method=method, fn=fn)
    if throw:
        check_solution(fn, sol)
    warn_failures(fn, sol, note)
    return sol


@_compiled("loss_fn", "method", "fn")
def _adjoint_solve(params, test_grad, args, mask, solver, spec, *, loss_fn, method, fn) -> Solution:
    return setup(loss_fn, params, *args, mask=mask, method=method, solver=solver, curvature=spec,
                 adjoint=True, fn=fn).solve(test_grad)


@_repr.compact_repr()
class Adjoints(NamedTuple):
    """Result of :func:`adjoint_solves`: per-test-point solutions and the λ used."""

    solution: Solution   # batched over test points; value: the adjoint vectors s_j
    damping: Any


def adjoint_solves(loss_fn: Callable, params, example_loss_fn: Callable, test_examples, *args,
                   mask=None, method: str = "if", solver="auto", damping=0.0,
                   chunk_size: int | None = None, curvature="hessian", axis_name: str | None = None,
                   test_chunk_size: int | None = None, progress: bool | None = None,
                   fn: str = "adjoint_solves") -> Adjoints:
    """The adjoint vectors s_j = Δᵀ∇ℓ(test_j) of many test examples: one shared set-up.

    The solver is initialised once; the solves run vmapped in chunks of
    ``test_chunk_size`` under ``lax.map`` (one compile for any n). Arguments
    as in :func:`influence_scores`.
    """
    _checks.check_example_loss(fn, example_loss_fn, params, test_examples, "test_examples")
    n = _checks.leading_size(fn, "test_examples", test_examples)
    solver, spec, _, test_chunk_size = _checked(
        fn, loss_fn, params, args, mask=mask, method=method, solver=solver, curvature=curvature, damping=damping,
        chunk_size=chunk_size, axis_name=axis_name, queries=n, block=test_chunk_size)
    emit, show = _progress.wanted(progress, fn, _progress.chunks(n, test_chunk_size), params, test_examples, args,
                                  queries=n)
    with _bar(fn, n, test_chunk_size, show, solver, method, mask):
        return _adjoint_solves(params, test_examples, args, mask, solver, spec, loss_fn=loss_fn,
                               example_loss_fn=example_loss_fn, method=method, test_chunk_size=test_chunk_size,
                               progress=emit, fn=fn)


@_compiled("loss_fn", "example_loss_fn", "method", "test_chunk_size", "progress", "fn")
def _adjoint_solves(params, test_examples, args, mask, solver, spec, *, loss_fn, example_loss_fn, method,
                    test_chunk_size, progress, fn) -> Adjoints:
    s = setup(loss_fn, params, *args, mask=mask, method=method, solver=solver, curvature=spec, adjoint=True,
              progress=progress, fn=fn)

    def chunk(batch, valid):
        sol = _solve_visibly(s, _example_grads(example_loss_fn, params, batch))
        _progress.report(sol.converged, valid, progress)
        return sol

    sols = map_in_chunks(chunk, test_examples, test_chunk_size, caller=fn, arg="test_examples", with_valid=True)
    return Adjoints(sols, s.damping)


def _bar(fn, n, chunk_size, show, solver, method, mask):
    """The bar of a many-query call: its chunks, and its curvature products against their worst case."""
    per_query = solver.matvec_budget(Estimator(method, mask).form)
    budget = None if per_query is None else _progress.chunks(n, chunk_size) * chunk_size * per_query
    return _progress.bar(fn, _progress.chunks(n, chunk_size), show, budget=budget)


def _example_grads(example_loss_fn, params, examples):
    """∇ℓ of each example (leading axis), stacked like ``params``."""
    return jax.vmap(jax.grad(example_loss_fn), in_axes=(None, 0))(params, examples)


def _solve_visibly(s: Setup, G) -> Solution:
    """``s.solve_many(G)``, with a NaN answer (never the solvers' zeros) for a non-finite query.

    A test example whose gradient is NaN/Inf would otherwise get the zero
    vector a solver returns for a non-finite right-hand side (or after a
    non-finite step) — a plausible column of zero scores. Its failure code
    is ``"nonfinite"``.
    """
    sol = s.solve_many(G)
    ok = (_tree.rows_finite(G) & _tree.rows_finite(sol.value)
          & (sol.failure != FAILURES.index("nonfinite")))
    nan = lambda a: jnp.where(ok.reshape((-1,) + (1,) * (a.ndim - 1)), a, jnp.nan)
    return sol._replace(value=tree_map(nan, sol.value), converged=sol.converged & ok,
                        failure=jnp.where(ok, sol.failure, jnp.int32(FAILURES.index("nonfinite"))))


def contract(grads, adjoints):
    """−G Sᵀ: [n_train, n_test] from stacked training gradients and adjoint vectors."""
    leaves = jax.tree_util.tree_leaves(tree_map(
        lambda gl, sl: -jnp.einsum("i...,j...->ij", gl, sl, precision=jax.lax.Precision.HIGHEST),
        grads, adjoints))
    return sum(leaves[1:], leaves[0])


@_repr.compact_repr()
class Scores(NamedTuple):
    """Influence scores with the per-test-point solver diagnostics."""

    scores: jax.Array  # [n_train, n_test]
    solution: Solution  # batched over test points
    damping: Any = None  # the λ used (see Influence.damping)


def influence_scores(loss_fn: Callable, params, example_loss_fn: Callable, train_examples,
                     test_examples, *args, mask=None, method: str = "if", solver="auto",
                     damping=0.0, chunk_size: int | None = None, test_chunk_size: int | None = None,
                     train_chunk_size: int = 256, return_info: bool = False,
                     curvature="hessian", axis_name: str | None = None, throw: bool = False,
                     progress: bool | None = None):
    r"""Influence of each training example on each test example, [n_train, n_test].

        I[i, j] = −∇ℓ(test_j)ᵀ Δ(∇ℓ(train_i)),

    Δ the chosen estimator's parameter-change map (see module docstring).
    Removing training point i of n changes test loss j by ≈ −I[i, j] / n.

    Work: one solve per *test* point, in chunks of ``test_chunk_size``
    under ``lax.map`` (:func:`adjoint_solves`): vmapped single solves, or
    one block solve per chunk (the default for 8 or more queries); training
    gradients are computed chunk by chunk (``train_chunk_size``) and
    contracted with the stacked solutions, never solved for. Both chunk
    sizes are static; the last chunk is padded and trimmed.
    ``test_chunk_size=None`` (default) is :func:`query_chunk_size`: 16, or
    for a block solver as many queries as keep one block within 32 MiB (at
    most 128, a multiple of 8: one compile serves 8 sizes of n). ``loss_fn`` defines H; an :class:`gifjax.AutoDamping` is
    resolved once for all test points.

    With ``solver=gifjax.lowrank.LowRank(factors)`` the solves are two
    projections each: the factorisation's k HVPs are shared by all test points.

    Args:
      loss_fn, params, \*args, mask, method, solver, damping, chunk_size, curvature, throw:
        as in :func:`influence`.
      example_loss_fn: ``example_loss_fn(params, example) -> scalar`` for
        one example (a pytree without batch axis).
      train_examples, test_examples: pytrees with a leading batch axis.
      return_info: also return the per-test :class:`~gifjax.solvers.Solution`
        (as :class:`Scores`) — check ``converged`` on real models.
      axis_name: inside ``jax.shard_map``, the axis over which ``args`` (the
        Hessian batch) is sharded; curvature products are ``pmean`` ed over
        it. The training and test examples stay this device's own: the
        result is their local block. :func:`gifjax.parallel.influence_scores`
        does the sharding for you.
      progress: a tqdm bar on stderr over the test chunks, with the number
        of converged queries so far. ``None`` (default): shown outside
        ``jit`` / ``vmap`` / ``grad`` when there is more than one chunk or
        more than 16 queries,
        unless the environment variable ``GIFJAX_PROGRESS=0``; ``False``:
        never. The program reports each finished chunk through
        ``jax.debug.callback`` (only when a bar is wanted).

    Failed solves are never silent: outside ``jit`` one ``RuntimeWarning``
    says how many test points did not converge and why (``throw=True``
    raises instead; inside ``jit`` the diagnostics travel in
    ``return_info``). A test example with a non-finite gradient gets a NaN
    column (failure ``"nonfinite"``), never zeros; a non-finite training
    gradient gives a NaN row.

    Example:
      >>> import jax, jax.numpy as jnp, gifjax
      >>> X = jax.random.normal(jax.random.key(0), (20, 3)); y = X @ jnp.ones(3)
      >>> loss = lambda w, X, y: 0.5 * jnp.mean((X @ w - y) ** 2) + 0.01 * w @ w
      >>> ex = lambda w, xy: 0.5 * (xy[0] @ w - xy[1]) ** 2
      >>> I = gifjax.influence_scores(loss, jnp.ones(3), ex, (X, y), (X[:4], y[:4]), X, y)
      >>> I.shape
      (20, 4)
    """
    fn = "influence_scores"
    _checks.check_example_loss(fn, example_loss_fn, params, train_examples, "train_examples")
    _checks.check_example_loss(fn, example_loss_fn, params, test_examples, "test_examples")
    n = _checks.leading_size(fn, "test_examples", test_examples)
    solver, spec, note, test_chunk_size = _checked(
        fn, loss_fn, params, args, mask=mask, method=method, solver=solver, curvature=curvature, damping=damping,
        chunk_size=chunk_size, axis_name=axis_name, queries=n, block=test_chunk_size)
    emit, show = _progress.wanted(progress, fn, _progress.chunks(n, test_chunk_size), params, train_examples,
                                  test_examples, args, queries=n)
    with _bar(fn, n, test_chunk_size, show, solver, method, mask):
        scores, adj = _influence_scores(params, train_examples, test_examples, args, mask, solver, spec,
                                        loss_fn=loss_fn, example_loss_fn=example_loss_fn, method=method,
                                        test_chunk_size=test_chunk_size, train_chunk_size=train_chunk_size,
                                        progress=emit, fn=fn)
    if throw:
        check_solution(fn, adj.solution)
    warn_failures(fn, adj.solution, note)
    if not return_info:
        return scores
    return Scores(scores, adj.solution, adj.damping)


@_compiled("loss_fn", "example_loss_fn", "method", "test_chunk_size", "train_chunk_size", "progress", "fn")
def _influence_scores(params, train_examples, test_examples, args, mask, solver, spec, *, loss_fn,
                      example_loss_fn, method, test_chunk_size, train_chunk_size, progress, fn):
    adj = _adjoint_solves(params, test_examples, args, mask, solver, spec, loss_fn=loss_fn,
                          example_loss_fn=example_loss_fn, method=method, test_chunk_size=test_chunk_size,
                          progress=progress, fn=fn)
    S = adj.solution.value  # pytree with leading n_test axis
    scores = map_in_chunks(lambda chunk: contract(_example_grads(example_loss_fn, params, chunk), S),
                           train_examples, train_chunk_size, caller=fn, arg="train_examples")
    return scores, adj


def self_influence(loss_fn: Callable, params, example_loss_fn: Callable, examples, *args,
                   mask=None, method: str = "if", solver="auto", damping=0.0,
                   chunk_size: int | None = None, example_chunk_size: int | None = None,
                   curvature="hessian", axis_name: str | None = None, throw: bool = False,
                   return_info: bool = False, progress: bool | None = None):
    """Self-influence I[i, i] = −∇ℓ(z_i)ᵀ Δ(∇ℓ(z_i)) for each example, shape [n].

    One solve per example (unavoidable), sharing one solver set-up. With the
    upweighting sign I[i, i] ≤ 0 for positive-definite H; −I[i, i] =
    ∇ℓᵀH⁻¹∇ℓ (for IF) is large for atypical or mislabelled points — rank by
    it. Arguments as in :func:`influence_scores` (with ``axis_name``,
    ``examples`` are this device's own; ``progress`` counts chunks of
    ``example_chunk_size``); ``return_info=True`` returns
    :class:`Scores` (``scores`` = the [n] values) with the per-example
    solver diagnostics.
    """
    fn = "self_influence"
    _checks.check_example_loss(fn, example_loss_fn, params, examples, "examples")
    n = _checks.leading_size(fn, "examples", examples)
    solver, spec, note, example_chunk_size = _checked(
        fn, loss_fn, params, args, mask=mask, method=method, solver=solver, curvature=curvature, damping=damping,
        chunk_size=chunk_size, axis_name=axis_name, queries=n, block=example_chunk_size)
    emit, show = _progress.wanted(progress, fn, _progress.chunks(n, example_chunk_size), params, examples, args,
                                  queries=n)
    with _bar(fn, n, example_chunk_size, show, solver, method, mask):
        out = _self_influence(params, examples, args, mask, solver, spec, loss_fn=loss_fn,
                              example_loss_fn=example_loss_fn, method=method,
                              example_chunk_size=example_chunk_size, progress=emit, fn=fn)
    if throw:
        check_solution(fn, out.solution)
    warn_failures(fn, out.solution, note)
    return out if return_info else out.scores


@_compiled("loss_fn", "example_loss_fn", "method", "example_chunk_size", "progress", "fn")
def _self_influence(params, examples, args, mask, solver, spec, *, loss_fn, example_loss_fn, method,
                    example_chunk_size, progress, fn) -> Scores:
    s = setup(loss_fn, params, *args, mask=mask, method=method, solver=solver, curvature=spec, adjoint=True,
              progress=progress, fn=fn)

    def chunk(batch, valid):
        G = _example_grads(example_loss_fn, params, batch)
        sol = _solve_visibly(s, G)
        _progress.report(sol.converged, valid, progress)
        return -jax.vmap(_tree.vdot)(sol.value, G), sol

    values, sols = map_in_chunks(chunk, examples, example_chunk_size, caller=fn, arg="examples",
                                 with_valid=True)
    return Scores(values, sols, s.damping)
