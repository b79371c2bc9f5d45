r"""Influence estimators IF / PIF / FIF / GIF and influence scores.

This is the one place where curvature operators, masks and solvers meet.
For a gradient ``g`` (of the loss of the data to remove, scaled as you wish)
and H_λ = ∇²loss_fn(params, \*args) + λI, with P the element mask of target
parameters:

======  ==========================================  ===========================
method  parameter change Δ                          solved as
======  ==========================================  ===========================
``if``  Δ = H_λ⁻¹ g (all parameters)                 symmetric  H_λ x = g
``pif`` Δ = P H_λ⁻¹ g (projected IF)                 symmetric, then masked
``fif`` Δ_t = [H_λ]_tt⁻¹ g_t (freeze θ_f)            symmetric  P H_λ P x = P g
``gif`` Δ = argmin_{x = Px} ‖H_λ x − g‖₂ (Lyu+ 24)   least squares, A = H_λ P
======  ==========================================  ===========================

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

Options shared by every estimator here:

* ``curvature="hessian"`` (H = ∇²loss_fn) or ``gifjax.GGN(apply_fn,
  output_loss)``: the Gauss–Newton matrix Jᵀ H_out J, PSD by construction —
  same masks, solvers and damping;
* ``damping=λ`` or ``gifjax.AutoDamping(fraction, key=...)``: λ = fraction ×
  the mean eigenvalue of the curvature (a Hutchinson trace estimate),
  reported as ``damping`` in the results;
* ``solver=gifjax.lowrank.LowRank(factors)``: answer every query from one
  shared rank-k factorisation (:mod:`gifjax.lowrank`), no HVP per query.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _checks, _tree
from ._chunks import map_in_chunks
from . import curvature as _curv
from . import lowrank as _lowrank
from . import masks as _masks
from . import solvers as _solvers

METHODS = ("if", "pif", "fif", "gif")
tree_map = jax.tree_util.tree_map


class Influence(NamedTuple):
    """Result of :func:`influence`.

    Attributes:
      delta: parameter change Δ, a pytree like ``params``; exactly zero
        outside the mask for pif / fif / gif.
      solution: the solver's :class:`gifjax.solvers.Solution` (its ``value``
        is the unmasked solve; for pif that is the full IF update).
      damping: the damping λ actually used (an array): the number given,
        the value :class:`AutoDamping` resolved to, or the low-rank factors'.

    ``converged``, ``failure``, ``num_hvps``, ``num_steps`` and
    ``residual_norm`` forward to ``solution``.
    """

    delta: Any
    solution: _solvers.Solution
    damping: Any = None  # the λ used (resolved from AutoDamping, or the factors')

    converged = property(lambda self: self.solution.converged)
    failure = property(lambda self: self.solution.failure)
    num_hvps = property(lambda self: self.solution.num_matvecs)
    num_steps = property(lambda self: self.solution.num_steps)
    residual_norm = property(lambda self: self.solution.residual_norm)


class _Problem(NamedTuple):
    matvec: Callable
    rmatvec: Callable | None
    form: str
    rhs: Callable       # g ↦ right-hand side
    post: Callable      # solver value ↦ Δ (or adjoint s)


def _problem(method: str, H: Callable, mask, *, adjoint: bool) -> _Problem:
    """The linear problem behind ``method``; ``adjoint`` gives the scores' system."""
    P = lambda v: _masks.apply(mask, v)
    ident = lambda v: v
    if method == "if":
        return _Problem(H, None, "symmetric", ident, ident)
    if method == "pif":
        return (_Problem(H, None, "symmetric", P, ident) if adjoint
                else _Problem(H, None, "symmetric", ident, P))
    PHP = lambda v, **kw: P(H(P(v), **kw))
    if method == "fif":
        return _Problem(PHP, None, "symmetric", P, P)
    HP = lambda v, **kw: H(P(v), **kw)
    PH = lambda v, **kw: P(H(v, **kw))
    if adjoint:  # (H P)⁺ᵀ = (P H)⁺: min ‖s‖ s.t. P H s = P ∇
        return _Problem(PH, HP, "min_norm", P, ident)
    return _Problem(HP, PH, "least_squares", ident, P)


def _resolve_solver(solver, method: str, fn: str) -> _solvers.Solver:
    if isinstance(solver, str) and solver == "auto":
        return _solvers.LSTSQ() if method == "gif" else _solvers.CG()
    return _solvers.get_solver(solver, fn=fn)


@_solvers._pytree_dataclass(static=("num_samples",))
class AutoDamping:
    r"""Damping as a fraction of the mean eigenvalue: ``damping=gifjax.AutoDamping(0.1, key=k)``.

        λ = fraction · max(tr(P C P), 0) / |t|,

    C the curvature (Hessian or GGN), P the mask for ``fif`` / ``gif`` (all
    parameters, |t| = p, for ``if`` / ``pif``), the trace by
    :func:`gifjax.hutchinson_trace` with ``num_samples`` Rademacher probes
    drawn from ``key`` — deterministic given the key. The resolved λ is
    reported as ``damping`` in :class:`Influence` / :class:`Scores`, or get it
    with :func:`resolve_damping`.

    Fields: ``fraction`` (traced, ≥ 0), ``num_samples`` (static),
    ``key`` (traced; default ``jax.random.key(0)``).

    Example:
      >>> import jax, jax.numpy as jnp, gifjax
      >>> loss = lambda w: 0.5 * jnp.sum(jnp.arange(1.0, 5.0) * w ** 2)
      >>> float(gifjax.resolve_damping(loss, jnp.zeros(4), damping=gifjax.AutoDamping(0.1)))
      0.25

    Warning:
      The mean eigenvalue of a deep-network Hessian is dominated by a few
      large outliers and the bulk sits near 0 (or below): the same fraction
      means different things on different models; Hutchinson's error is
      ∝ 1/sqrt(num_samples). Where the trace is negative λ becomes 0.
    """

    fraction: Any = 0.1
    num_samples: int = 16
    key: Any = None


def _check_damping(fn: str, damping):
    if isinstance(damping, AutoDamping):
        _checks.check_nonnegative(fn, "damping.fraction", damping.fraction)
        if not isinstance(damping.num_samples, int) or damping.num_samples < 1:
            raise _checks.error(fn, "damping.num_samples", repr(damping.num_samples), "a positive int",
                                "pass e.g. AutoDamping(0.1, num_samples=16).")
        return
    try:
        _checks.check_nonnegative(fn, "damping", damping)
    except TypeError:
        raise _checks.error(fn, "damping", repr(damping), "a number >= 0 or gifjax.AutoDamping(...)",
                            "pass damping=0.01 or damping=gifjax.AutoDamping(0.1, key=key).") from None


def _check_curvature(fn: str, curvature, chunk_size=None):
    if isinstance(curvature, str) and curvature == "hessian":
        return
    _curv.check_ggn(fn, curvature)
    if chunk_size is not None:
        raise _checks.error(fn, "chunk_size", chunk_size, "None with a GGN curvature",
                            "drop chunk_size (GGN products are linearised over the whole batch), "
                            "or use curvature='hessian'.")


def _resolve_damping(damping, H, params, method, mask):
    if not isinstance(damping, AutoDamping):
        return damping
    on = mask if method in ("fif", "gif") else None
    key = jax.random.key(0) if damping.key is None else damping.key
    trace = _curv.hutchinson_trace(H, params, key=key, num_samples=damping.num_samples, mask=on)
    count = _masks.size(params) if on is None else _masks.count(on)
    return damping.fraction * jnp.maximum(trace, 0) / count


def _operator(fn, loss_fn, params, args, method, mask, damping, curvature, chunk_size, sample_size=None,
              axis_name=None):
    """The damped curvature operator of ``method`` and the λ it uses (inputs checked)."""
    _check_damping(fn, damping)
    _check_curvature(fn, curvature, chunk_size)
    H = curvature_operator(loss_fn, params, *args, curvature=curvature, chunk_size=chunk_size,
                           sample_size=sample_size, axis_name=axis_name)
    lam = _resolve_damping(damping, H, params, method, mask)
    return (lambda v, **kw: _curv._damp(H(v, **kw), v, lam)), lam


def resolve_damping(loss_fn: Callable, params, *args, damping, method: str = "if", mask=None,
                    curvature="hessian", chunk_size: int | None = None, axis_name: str | None = None):
    """The damping λ an estimator will use: ``damping`` itself, or :class:`AutoDamping` resolved.

    Arguments as in :func:`influence`. Resolve once and pass the number when
    calling :func:`adjoint_solve` many times (its ``Solution`` does not
    report λ).
    """
    fn = "resolve_damping"
    _checks.check_choice(fn, "method", method, METHODS)
    mask = _masks.validate(mask, params, fn=fn)
    return jnp.asarray(_operator(fn, loss_fn, params, args, method, mask, damping, curvature,
                                 chunk_size, axis_name=axis_name)[1])


def curvature_operator(loss_fn: Callable, params, *args, curvature="hessian", damping=0.0,
                       chunk_size: int | None = None, sample_size: int | None = None,
                       axis_name: str | None = None):
    """The operator ``v ↦ (C + λI) v`` with C the Hessian (default) or a :class:`gifjax.GGN`.

    ``curvature="hessian"`` is :func:`hessian_operator`; a GGN spec is
    linearised once (:func:`gifjax.linearize_ggn`; ``chunk_size`` is not
    supported) and honours ``sample_size`` and ``axis_name`` like the
    Hessian operator.
    """
    fn = "curvature_operator"
    _check_curvature(fn, curvature, chunk_size)
    if isinstance(curvature, str):
        return hessian_operator(loss_fn, params, *args, damping=damping, chunk_size=chunk_size,
                                sample_size=sample_size, axis_name=axis_name)
    full = _curv.linearize_ggn(curvature, params, *args)
    sample = lambda v, *sub: _curv.ggn_product(curvature, params, v, *sub)
    op = _minibatch_operator(fn, full, sample, args, sample_size)
    return _reduce_and_damp(fn, op, damping, axis_name)


def _minibatch_operator(fn, full, product, args, sample_size):
    """``op(v)`` = full; ``op(v, key=k)`` = ``product(v, *minibatch)`` of ``sample_size`` examples."""
    if sample_size is None:
        return full
    n = _curv.batch_size_of(fn, args)

    def op(v, key=None):
        if key is None:
            return full(v)
        idx = jax.random.choice(key, n, (min(sample_size, n),), replace=False)
        return product(v, *tree_map(lambda a: a[idx], args))

    return op


def _reduce_and_damp(fn, op, damping, axis_name):
    """v ↦ pmean_d(C_d v) + λv: the data-parallel mean of the *undamped* products, then λ.

    The reduction acts on the product's output only (nothing is
    differentiated through the collective); λ is added once, after it.
    """
    _checks.check_nonnegative(fn, "damping", damping)
    if axis_name is not None:
        local = op
        op = lambda v, **kw: jax.lax.pmean(local(v, **kw), axis_name)
    if isinstance(damping, (int, float)) and damping == 0:
        return op
    return lambda v, **kw: _curv._damp(op(v, **kw), v, damping)


def hessian_operator(loss_fn: Callable, params, *args, damping=0.0, chunk_size: int | None = None,
                     sample_size: int | None = None, axis_name: str | None = None):
    r"""The curvature operator ``v ↦ (H + λI) v`` used by the estimators.

    Linearised once at ``params`` (:func:`gifjax.linearize_hvp`), or, with
    ``chunk_size``, averaged over fixed-size chunks of ``args``
    (:func:`gifjax.batched_hvp`). With ``sample_size`` the operator also
    accepts ``key=``: ``op(v, key=k)`` uses a random minibatch of that many
    examples of ``args`` (stochastic LiSSA); ``op(v)`` stays the full one.

    Data parallelism: with ``axis_name`` (a mapped axis of an enclosing
    ``jax.shard_map``, ``pmap`` or named ``vmap``; static), ``args`` is this device's shard
    of the batch and every product — full and minibatch — becomes

        H v = pmean_d(H_d v) + λv = (1/D) Σ_d ∇²loss_fn(θ, *args_d) v + λv,

    the mean over the D devices of the local products, with λ added once
    after the reduction (the collective acts on the product's output only;
    nothing is differentiated through it). This is the global Hessian of
    the mean loss only if ``loss_fn`` is the *mean* over the local batch and
    every shard has the same number of examples (a regulariser in
    ``loss_fn`` is then averaged over identical copies: unchanged). With
    ``sample_size`` each device draws its own ``sample_size`` examples from
    its shard (same key), a global minibatch of D·``sample_size``. Every
    device on the axis must run the same sequence of products (solvers do:
    their decisions depend only on reduced, identical values).
    See :mod:`gifjax.parallel` for ready-made sharded estimators.
    """
    fn = "hessian_operator"
    if chunk_size is not None:
        full = _curv.batched_hvp_fn(loss_fn, params, *args, chunk_size=chunk_size)
    else:
        full = _curv.linearize_hvp(loss_fn, params, *args)
    sample = lambda v, *sub: _curv.hvp(loss_fn, params, v, *sub)
    op = _minibatch_operator(fn, full, sample, args, sample_size)
    return _reduce_and_damp(fn, op, damping, axis_name)


def _setup(fn, loss_fn, params, args, mask, method, solver, damping, chunk_size,
           curvature="hessian", adjoint=False, axis_name=None):
    """Checked inputs → (solver, mask, damped operator, λ)."""
    _checks.check_choice(fn, "method", method, METHODS)
    _check_damping(fn, damping)
    _check_curvature(fn, curvature, chunk_size)
    solver = _resolve_solver(solver, method, fn)
    mask = None if mask is None else _masks.validate(mask, params, fn=fn)
    if mask is None and method != "if":
        mask = _masks.full_mask(params)
    if isinstance(solver, _lowrank.LowRank):
        solver, lam = _lowrank_setup(fn, solver, method, adjoint, damping, curvature)
        return solver, mask, _lowrank.no_operator, lam
    sample = solver.batch_size if isinstance(solver, _solvers.LiSSA) else None
    H, lam = _operator(fn, loss_fn, params, args, method, mask, damping, curvature, chunk_size,
                       sample, axis_name)
    return solver, mask, H, lam


def _lowrank_setup(fn, solver, method, adjoint, damping, curvature):
    """Factors fix the operator: check method / damping / curvature; transpose for gif's adjoint."""
    f = solver.factors
    if f.method is None:
        raise _checks.error(fn, "solver", "LowRank factors without a method",
                            "factors from gifjax.lowrank.factorize(..., method=...)",
                            "build the factors with gifjax.lowrank.factorize so they know their operator.")
    if _lowrank.OPERATORS[f.method] != _lowrank.OPERATORS[method]:
        raise _checks.error(fn, "method", repr(method), f"a method served by the {f.method!r} factors",
                            f"pass method={f.method!r}, or factorize again with method={method!r}.")
    if isinstance(damping, AutoDamping) or (
            _checks.is_concrete(damping) and _checks.is_concrete(f.damping)
            and float(np.asarray(damping)) != 0 and not np.isclose(float(np.asarray(damping)),
                                                                   float(np.asarray(f.damping)))):
        raise _checks.error(fn, "damping", repr(damping),
                            f"0 (default) or the factors' damping {float(np.asarray(f.damping))!r}",
                            "leave damping out: the factors already include theirs "
                            "(factorize again to change it).")
    if not isinstance(curvature, str) and f.curvature != "ggn":
        raise _checks.error(fn, "curvature", "a GGN spec", f"the factors' curvature {f.curvature!r}",
                            "leave curvature out, or factorize with the same curvature.")
    if adjoint and method == "gif":  # (H P)⁺ᵀ = (P H)⁺: the same factors, transposed
        solver = _lowrank.LowRank(f.T, solver.complement)
    return solver, f.damping


def removal_gradient(loss_fn: Callable, params, *removed, num_train: int):
    r"""g for removing a group U of m of ``num_train`` = n training examples.

        g = m / (n − m) · ∇_θ loss_fn(θ̂, *removed)

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
    if not isinstance(num_train, int) or num_train <= m:
        raise _checks.error("removal_gradient", "num_train", repr(num_train),
                            f"an int larger than the {m} removed examples",
                            "pass the size of the whole training set.")
    return _tree.scale(m / (num_train - m), jax.grad(loss_fn)(params, *removed))


def influence(loss_fn: Callable, params, g, *args, mask=None, method: str = "gif",
              solver="auto", damping=0.0, chunk_size: int | None = None,
              curvature="hessian", axis_name: str | None = None) -> Influence:
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
      solver: ``"auto"`` (CG for if/pif/fif, LSTSQ for gif), a name from
        ``gifjax.solvers.SOLVERS``, or a configured value such as
        ``gifjax.solvers.CG(rtol=1e-8, max_steps=500)``, or
        ``gifjax.lowrank.LowRank(factors)`` (shared low-rank factorisation).
      damping: λ ≥ 0 (traced), H → H + λI; or :class:`AutoDamping`.
      chunk_size: if set (static), HVPs average over chunks of that many
        examples of ``args`` (all leaves batched), bounding memory.
      curvature: ``"hessian"`` (default) or ``gifjax.GGN(apply_fn,
        output_loss)`` for the PSD Gauss–Newton matrix (static).
      axis_name: data parallelism inside ``jax.shard_map`` (static): ``args``
        is this device's equal-sized shard, ``loss_fn`` its mean, and every
        curvature product is ``pmean`` ed over this axis before damping
        (see :func:`hessian_operator`; ready-made: :mod:`gifjax.parallel`).

    Returns:
      :class:`Influence` with ``delta`` and the solver's diagnostics.

    Example:
      >>> import jax.numpy as jnp, gifjax
      >>> X = jnp.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]); y = jnp.array([1.0, 2.0, 0.0])
      >>> loss = lambda w, X, y: 0.5 * jnp.mean((X @ w - y) ** 2) + 0.05 * w @ w
      >>> w = jnp.zeros(2)
      >>> g = jax.grad(loss)(w, X[:1], y[:1])
      >>> out = gifjax.influence(loss, w, g, X, y, method="gif", solver="dense")
      >>> out.delta.shape, bool(out.converged)
      ((2,), True)

    Warning:
      CG needs H_λ positive definite (or P H_λ P for fif); on a non-convex
      model it stops with ``failure="indefinite"`` — add damping, use
      ``solver="lstsq"``, or use GIF, whose least-squares system is PSD.
    """
    fn = "influence"
    _checks.check_like(fn, "g", g, params)
    solver, mask, H, lam = _setup(fn, loss_fn, params, args, mask, method, solver, damping,
                                  chunk_size, curvature, axis_name=axis_name)
    prob = _problem(method, H, mask, adjoint=False)
    sol = solver(prob.matvec, prob.rhs(g), rmatvec=prob.rmatvec, form=prob.form)
    return Influence(prob.post(sol.value), sol, jnp.asarray(lam))


def adjoint_solve(loss_fn: Callable, params, test_grad, *args, mask=None, method: str = "if",
                  solver="auto", damping=0.0, chunk_size: int | None = None,
                  curvature="hessian", axis_name: str | None = None) -> _solvers.Solution:
    """s with ``test_gradᵀ Δ(g) = sᵀ g`` for every g — the one solve per test point.

    ``value`` is s: H_λ⁻¹∇ (if), H_λ⁻¹P∇ (pif), (P H_λ P)⁺P∇ (fif), and
    H_λ P (P H_λ² P)⁺ P∇ (gif; min-norm solution of P H_λ s = P∇). Arguments
    as in :func:`influence`. ``jax.vmap`` it over test gradients. With
    :class:`AutoDamping`, λ is re-estimated on every call and not reported:
    resolve it once with :func:`resolve_damping` and pass the number.
    """
    fn = "adjoint_solve"
    _checks.check_like(fn, "test_grad", test_grad, params)
    solver, mask, H, _ = _setup(fn, loss_fn, params, args, mask, method, solver, damping,
                                chunk_size, curvature, adjoint=True, axis_name=axis_name)
    prob = _problem(method, H, mask, adjoint=True)
    sol = solver(prob.matvec, prob.rhs(test_grad), rmatvec=prob.rmatvec, form=prob.form)
    return sol._replace(value=prob.post(sol.value))


class Scores(NamedTuple):
    """Influence scores with the per-test-point solver diagnostics."""

    scores: jax.Array            # [n_train, n_test]
    solution: _solvers.Solution  # batched over test points
    damping: Any = None          # the λ used (see Influence.damping)


def influence_scores(loss_fn: Callable, params, example_loss_fn: Callable, train_examples,
                     test_examples, *args, mask=None, method: str = "if", solver="auto",
                     damping=0.0, chunk_size: int | None = None, test_chunk_size: int = 16,
                     train_chunk_size: int = 256, return_info: bool = False,
                     curvature="hessian", axis_name: str | None = None):
    r"""Influence of each training example on each test example, [n_train, n_test].

        I[i, j] = −∇ℓ(test_j)ᵀ Δ(∇ℓ(train_i)),

    Δ the chosen estimator's parameter-change map (see module docstring).
    Removing training point i of n changes test loss j by ≈ −I[i, j] / n.

    Work: one (vmapped) solve per *test* point, in chunks of
    ``test_chunk_size`` under ``lax.map``; training gradients are computed
    chunk by chunk (``train_chunk_size``) and contracted with the stacked
    solutions, never solved for. Both chunk sizes are static; the last
    chunk is padded and trimmed, so one compile serves any n.

    With ``solver=gifjax.lowrank.LowRank(factors)`` the solves are two
    projections each: the factorisation's k HVPs are shared by all test points.

    Args:
      loss_fn, params, *args, mask, method, solver, damping, chunk_size,
        curvature: as in :func:`influence` (``loss_fn`` defines H; an
        :class:`AutoDamping` is resolved once for all test points).
      example_loss_fn: ``example_loss_fn(params, example) -> scalar`` for
        one example (a pytree without batch axis).
      train_examples, test_examples: pytrees with a leading batch axis.
      return_info: also return the per-test :class:`~gifjax.solvers.Solution`
        (as :class:`Scores`) — check ``converged`` on real models.
      axis_name: inside ``jax.shard_map``, the axis over which ``args`` (the
        Hessian batch) is sharded; curvature products are ``pmean`` ed over
        it (see :func:`hessian_operator`). The training and test examples
        stay this device's own: the result is their local block.
        :func:`gifjax.parallel.influence_scores` does the sharding for you.

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
    _checks.check_choice(fn, "method", method, METHODS)
    grad_fn = jax.vmap(jax.grad(example_loss_fn), in_axes=(None, 0))
    lam = _shared_damping(fn, loss_fn, params, args, mask, method, solver, damping, chunk_size,
                          curvature, axis_name)

    def solve_chunk(chunk):
        return jax.vmap(lambda tg: adjoint_solve(
            loss_fn, params, tg, *args, mask=mask, method=method, solver=solver, damping=lam,
            chunk_size=chunk_size, curvature=curvature, axis_name=axis_name))(grad_fn(params, chunk))

    sols = map_in_chunks(solve_chunk, test_examples, test_chunk_size, caller=fn, arg="test_examples")
    S = sols.value  # pytree with leading n_test axis

    def score_chunk(chunk):
        G = grad_fn(params, chunk)
        leaves = jax.tree_util.tree_leaves(tree_map(
            lambda gl, sl: -jnp.einsum("i...,j...->ij", gl, sl, precision=jax.lax.Precision.HIGHEST),
            G, S))
        return sum(leaves[1:], leaves[0])

    scores = map_in_chunks(score_chunk, train_examples, train_chunk_size, caller=fn, arg="train_examples")
    if not return_info:
        return scores
    if isinstance(solver, _lowrank.LowRank):
        lam = solver.factors.damping
    return Scores(scores, sols, jnp.asarray(lam))


def _shared_damping(fn, loss_fn, params, args, mask, method, solver, damping, chunk_size, curvature,
                    axis_name=None):
    """Resolve :class:`AutoDamping` once for many solves (else pass ``damping`` through)."""
    _checks.check_choice(fn, "method", method, METHODS)
    if isinstance(solver, _lowrank.LowRank):
        _lowrank_setup(fn, solver, method, False, damping, curvature)  # early, clear errors
    if not isinstance(damping, AutoDamping) or isinstance(solver, _lowrank.LowRank):
        return damping
    mask = _masks.validate(mask, params, fn=fn)
    return _operator(fn, loss_fn, params, args, method, mask, damping, curvature, chunk_size,
                     axis_name=axis_name)[1]


def self_influence(loss_fn: Callable, params, example_loss_fn: Callable, examples, *args,
                   mask=None, method: str = "if", solver="auto", damping=0.0,
                   chunk_size: int | None = None, example_chunk_size: int = 16,
                   curvature="hessian", axis_name: str | None = None):
    """Self-influence I[i, i] = −∇ℓ(z_i)ᵀ Δ(∇ℓ(z_i)) for each example, shape [n].

    One solve per example (unavoidable). With the upweighting sign I[i, i] ≤ 0
    for positive-definite H; −I[i, i] = ∇ℓᵀH⁻¹∇ℓ (for IF) is large for
    atypical or mislabelled points — rank by it. Arguments as in
    :func:`influence_scores` (with ``axis_name``, ``examples`` are this
    device's own).
    """
    fn = "self_influence"
    grad_fn = jax.grad(example_loss_fn)
    lam = _shared_damping(fn, loss_fn, params, args, mask, method, solver, damping, chunk_size,
                          curvature, axis_name)

    def one(example):
        gi = grad_fn(params, example)
        s = adjoint_solve(loss_fn, params, gi, *args, mask=mask, method=method, solver=solver,
                          damping=lam, chunk_size=chunk_size, curvature=curvature,
                          axis_name=axis_name).value
        return -_tree.vdot(s, gi)

    return map_in_chunks(jax.vmap(one), examples, example_chunk_size, caller=fn, arg="examples")
