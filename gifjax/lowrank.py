r"""Shared low-rank Krylov factorisations: k HVPs once, then any number of queries.

The core solves one linear system per query; attributing thousands of test
points repeats the same Krylov work thousands of times. Here the work is done
once: a rank-k factorisation of the method's operator A is built with k
(masked) curvature products and *full reorthogonalisation*, and every
right-hand side b is then answered by two projections, O(k·p) flops and no
HVP at all:

==========  ============================  ==========================================
method      operator A (``factorize``)    factorisation and answer
==========  ============================  ==========================================
if, pif     H_λ (symmetric)               Lanczos  A ≈ Y Θ Yᵀ,   x = Y Θ⁻¹ Yᵀ b
fif         P H_λ P (symmetric)           Lanczos  (Y inside the mask)
gif         H_λ P (least squares)         Golub–Kahan  A ≈ U Σ Vᵀ,  x = V Σ⁻¹ Uᵀ b
gif scores  P H_λ = Aᵀ (min-norm)         the same factors transposed, s = U Σ⁻¹ Vᵀ b
==========  ============================  ==========================================

Lanczos runs m steps from a start vector q₁, A Q = Q T + β q_{m+1}e_mᵀ with T
tridiagonal; eigendecomposing T = S Θ Sᵀ gives Ritz pairs (θ_i, y_i = Q s_i).
Golub–Kahan (lower bidiagonalisation, as in LSQR) runs m steps from u₁,
A V = U B with B (m+1)×m lower bidiagonal; the SVD B = P Σ Qᵀ gives
approximate singular triplets (σ_i, U p_i, V q_i). The factors keep the
``rank`` pairs of largest \|θ\| (or σ); the answer is the truncated
pseudo-inverse of the factorised operator.

What the approximation means — two readings, both exact statements:

* **Rank-k truncation of the spectrum.** If the Krylov space has captured the
  top-k eigen/singular pairs (m = dim: exactly; m a few times k from a random
  start: the extremal part of the spectrum converges first), the answer is
  A_k⁺ b, the pseudo-inverse restricted to the k largest \|eigenvalues\| — the
  same truncation as a dense eigendecomposition. Directions of b outside the
  captured subspace are *dropped* (the default) or, for damped
  symmetric operators whose uncaptured eigenvalues are ≪ λ, mapped by 1/λ
  (``LowRank(f, complement=1/λ)``), which is usually far more accurate.
* **Krylov subspace of a specific right-hand side.** With ``start=b`` and all
  m pairs kept, the answer for that b equals m steps of CG (symmetric
  positive-definite A) or of CGLS/LSQR (gif) — and other right-hand sides are
  answered in b's Krylov space. Starting from the mean of many right-hand
  sides biases the subspace toward them; a random start (the default) treats
  all directions alike.

Breakdown (an invariant Krylov space, e.g. a repeated eigenvalue) is handled
by restarting from a random vector of the operator's domain (masked for fif
and for gif's right vectors) orthogonalised against the basis, so m may go up
to that domain's dimension and full rank reproduces the exact answer.

Example:
    >>> import jax, jax.numpy as jnp, gifjax
    >>> X = jax.random.normal(jax.random.key(0), (40, 3)); y = X @ jnp.ones(3)
    >>> loss = lambda w, X, y: 0.5 * jnp.mean((X @ w - y) ** 2) + 0.01 * w @ w
    >>> f = gifjax.lowrank.factorize(loss, jnp.zeros(3), X, y, method="if", rank=3)
    >>> g = jnp.array([1.0, 0.0, 0.0])
    >>> fast = gifjax.influence(loss, jnp.zeros(3), g, X, y, method="if",
    ...                         solver=gifjax.lowrank.LowRank(f)).delta
    >>> exact = gifjax.influence(loss, jnp.zeros(3), g, X, y, method="if", solver="dense").delta
    >>> bool(jnp.allclose(fast, exact, rtol=1e-4))
    True

References: Lanczos (1950); Golub & Kahan (1965); Paige & Saunders, LSQR
(1982); Schioppa et al., "Scaling up influence functions" (AAAI 2022) for
Arnoldi/Lanczos-projected influence.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import dataclasses
import json
import os
import zipfile

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from . import _checks, _progress, _repr, _tree
from . import masks as _masks
from . import _krylov
from .estimators import adjoint_solve, influence
from .operators import Estimator, curvature_spec
from .solvers import (APPROXIMATE, LSTSQ, NONE, Solution, Solver, SolverState, backward_error, default_rtol,
                      finish as _finish, prepared)

__all__ = ["Approximation", "Factors", "LowRank", "OPERATORS", "approximation_error", "bidiagonalize", "combine", "factorize", "lanczos", "load", "project", "save"]

HIGHEST = jax.lax.Precision.HIGHEST
#: Methods whose factorised operator is the same (H_λ for if and pif).
OPERATORS = {"if": "C", "pif": "C", "fif": "PCP", "gif": "CP"}


@_repr.compact_repr()
@_tree.pytree_dataclass(static=("method", "curvature"))
class Factors:
    r"""A rank-r factorisation A ≈ left · diag(values) · rightᵀ (a pytree value).

    The fields are arrays (``method`` and ``curvature`` are static); the
    vector sets are pytrees like ``params`` with a leading axis r, pair i =
    ``tree_map(lambda a: a[i], left)``.

    Attributes:
      values: [r] Ritz values θ_i (Lanczos; signed) or singular values σ_i
        (Golub–Kahan), sorted by decreasing \|value\|.
      left: Ritz vectors y_i (Lanczos) or left singular vectors u_i.
      right: right singular vectors v_i, or ``None`` for symmetric factors
        (then right = left).
      rank: int32 scalar, how many leading pairs a solve uses (≤ r; set by
        ``rtol`` and the numerical-rank floor m·eps).
      residuals: [r] residual bounds of the pairs, ‖A y_i − θ_i y_i‖ =
        \|β_m s_{m,i}\| (Lanczos) and ‖Aᵀ u_i − σ_i v_i‖ = α_{m+1}\|p_{m,i}\|
        (Golub–Kahan); small = converged pair.
      damping: the λ included in the factorised operator (H + λI).
      num_matvecs: curvature products spent (int32).
      method: static; the influence method the operator belongs to
        (``None`` for factors of an arbitrary operator).
      curvature: static; ``"hessian"`` or ``"ggn"``.

    Save with :func:`save`, reload with :func:`load`; ``f.T`` is the
    factorisation of Aᵀ.
    """

    values: jax.Array
    left: Any
    right: Any
    rank: jax.Array
    residuals: jax.Array
    damping: jax.Array
    num_matvecs: jax.Array
    method: str | None = None
    curvature: str = "hessian"

    @property
    def symmetric(self) -> bool:
        return self.right is None

    @property
    def right_vectors(self):
        return self.left if self.right is None else self.right

    @property
    def T(self) -> "Factors":
        """Factors of Aᵀ (left and right swapped; symmetric factors unchanged)."""
        if self.right is None:
            return self
        return Factors(self.values, self.right, self.left, self.rank, self.residuals, self.damping,
                       self.num_matvecs, self.method, self.curvature)


# ----------------------------------------------------------------------------- projections


def project(vectors, x):
    """Coefficients [r] of x on a stacked vector set: c_i = ⟨vectors_i, x⟩."""
    leaves = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda V, a: jnp.tensordot(V, a, axes=jnp.ndim(a), precision=HIGHEST), vectors, x))
    return sum(leaves[1:], leaves[0])


def combine(vectors, c):
    """Σ_i c_i · vectors_i, a pytree like one vector."""
    return jax.tree_util.tree_map(lambda V: jnp.tensordot(c, V, axes=1, precision=HIGHEST).astype(V.dtype),
                                  vectors)


# ----------------------------------------------------------------------------- the solver


@_tree.pytree_dataclass(static=("rank", "num_steps"))
class LowRank(Solver):
    r"""Solver that answers from a rank-k factorisation: no HVP per query.

    ``init(operator, form)`` factorises the operator once (Lanczos for the
    symmetric form; Golub–Kahan of the normal factor F for least squares and
    minimum norm), or adopts given ``factors``; every ``compute`` then
    returns the truncated pseudo-inverse of the factorised operator,

        symmetric (A ≈ Y Θ Yᵀ):  x = Y Θ⁻¹ Yᵀ b  (+ c · (b − Y Yᵀ b)),
        normal (F ≈ U Σ Vᵀ):     (FᵀF)⁺ c = V Σ⁻² Vᵀ c,  F z ≈ U Σ Vᵀ z,

    so GIF's update V Σ⁻¹ Uᵀ g and its adjoint U Σ⁻¹ Vᵀ P∇ share one
    factorisation of C_λ P. In :func:`gifjax.influence`, ``adjoint_solve``,
    ``influence_scores`` and ``self_influence`` given factors fix the
    operator: their ``method`` must match (if/pif share C_λ), ``damping``
    and ``curvature`` default to the factors' and may not differ, and the
    ``mask`` must be the one given to :func:`factorize` (not checked).

    Fields:
      factors: a :class:`Factors` value (traced), or ``None`` to factorise in
        ``init`` with ``rank`` / ``num_steps`` / ``rtol`` / ``key`` /
        ``start`` (as in :func:`factorize`).
      complement: c, the inverse eigenvalue assumed on the orthogonal
        complement of the used pairs (symmetric factors only). ``None``
        (default) is the rank-k truncation (c = 0); 1/λ is exact when the
        uncaptured eigenvalues of H_λ − λI are ≪ λ (damping-dominated bulk).

    Diagnostics (per query): ``num_steps = num_matvecs = 0``;
    ``residual_norm`` = the part of the right-hand side outside the used
    subspace (‖b − Y Yᵀ b‖, or ‖c − V Vᵀ c‖ for the normal forms) — the
    residual of the *factorised* problem, not of the true operator (that
    needs an HVP; :func:`approximation_error` measures it against an exact
    solve); ``converged`` only when the right-hand side lies in that
    subspace (‖outside‖ ≤ rtol·‖b‖, rtol by dtype as in
    :data:`gifjax.solvers.DEFAULT_RTOL`) — otherwise failure
    ``"approximate"``: a truncation is an approximation, not a converged
    solve. Derivatives use the true operator with the factorised inverse
    (``gifjax.solvers``).

    Warning:
      The answer is only as good as the captured spectrum: a rank-k
      truncation drops every component of b outside the captured subspace.
      Check ``factors.residuals`` and :func:`approximation_error` on a few
      queries before trusting scores.
    """

    factors: Any = None
    complement: Any = None
    rank: int | None = None
    num_steps: int | None = None
    rtol: Any = None
    key: Any = None
    start: Any = None

    # -- the factors fix the operator
    def configure(self, spec, estimator, fn):
        self._check_complement(estimator.form)
        f = self.factors
        if f is None:
            return spec
        if not isinstance(f, Factors):
            raise _checks.error(fn, "solver", f"LowRank({type(f).__name__})", "LowRank(Factors)",
                                "pass the result of gifjax.lowrank.factorize.", kind=TypeError)
        if f.method is None:
            raise _checks.error(fn, "solver", "LowRank factors without a method",
                                "factors from gifjax.lowrank.factorize(..., method=...)",
                                "build the factors with gifjax.lowrank.factorize so they know their operator.")
        method = estimator.method
        if OPERATORS[f.method] != OPERATORS[method]:
            raise _checks.error(fn, "method", repr(method), f"a method served by the {f.method!r} factors",
                                f"pass method={f.method!r}, or factorize again with method={method!r}.")
        damping = spec.damping
        if not isinstance(damping, (int, float, np.ndarray, np.generic, jax.Array)) or (
                _checks.is_concrete(damping) and _checks.is_concrete(f.damping)
                and float(np.asarray(damping)) != 0
                and not np.isclose(float(np.asarray(damping)), float(np.asarray(f.damping)))):
            raise _checks.error(fn, "damping", repr(damping),
                                f"0 (default) or the factors' damping {float(np.asarray(f.damping))!r}",
                                "leave damping out: the factors already include theirs "
                                "(factorize again to change it).")
        if (spec.kind == "ggn") != (f.curvature == "ggn"):
            # the factors give the answer, but derivatives (implicit, through the operator) and
            # any check against the operator must see the matrix the factors approximate
            raise _checks.error(fn, "curvature", "a GGN spec" if spec.kind == "ggn" else "'hessian' (the default)",
                                f"the factors' curvature {f.curvature!r}",
                                "pass the curvature the factors were built with (for GGN factors the same "
                                "curvature=gifjax.GGN(...)), or factorize again with this one.")
        return spec.replace(damping=f.damping)

    def setup(self, operator, form, fn: str = "lowrank.LowRank"):
        A = operator if form == "symmetric" else SolverState(operator, form).factor
        self._check_complement(form)
        if self.factors is not None:
            return self.factors
        if self.rank is None:
            raise _checks.error(fn, "rank", None, "factors=... or rank=... (an int)",
                                "pass LowRank(factors) or LowRank(rank=50) to factorise in init.")
        return _factorize(fn, A, symmetric=form == "symmetric", rank=self.rank, num_steps=self.num_steps,
                          rtol=self.rtol, key=self.key, start=self.start)

    def _check_complement(self, form):
        if self.complement is not None and form != "symmetric":
            raise _checks.error("lowrank.LowRank", "complement", self.complement, "0 for Golub–Kahan (gif) factors",
                                "use complement only with symmetric (if/pif/fif) factors.")

    # -- answers
    def _check_b(self, f, b):
        _checks.check_like("lowrank.LowRank", "b", b, jax.tree_util.tree_map(lambda a: a[0], f.left),
                           ref_name="one factor vector")

    def _used(self, f):
        return jnp.arange(f.values.shape[0]) < f.rank

    def solve_symmetric(self, state, b):
        f = state.data
        self._check_b(f, b)
        used = self._used(f)
        c = jnp.where(used, project(f.left, b), 0)
        x = combine(f.right_vectors, _inverse(f.values, used) * c)
        outside = _tree.sub(b, combine(f.left, c))
        if self.complement is not None:
            x = _tree.axpy(self.complement, outside, x)
        return _captured(x, outside, b)

    def solve_normal(self, state, c):
        f = state.data
        self._check_b(f, c)
        used = self._used(f)
        coef = jnp.where(used, project(f.right_vectors, c), 0)
        x = combine(f.right_vectors, _inverse(f.values, used) ** 2 * coef)
        outside = _tree.sub(c, combine(f.right_vectors, coef))
        return _captured(x, outside, c)

    def factor_hints(self, state):
        if state.form == "symmetric":
            return None, None
        f = state.data
        used = self._used(f)
        sigma = jnp.where(used, f.values, 0)
        return (lambda z: combine(f.left, sigma * project(f.right_vectors, z)),
                lambda b: combine(f.right_vectors, sigma * project(f.left, b)))


def _inverse(values, used):
    return jnp.where(used, 1.0 / jnp.where(used, values, 1), 0)


def _check_steps(fn, rank, num_steps, dim):
    """(rank, num_steps) checked, each error naming the argument the user actually passed.

    ``factorize`` requires ``rank`` (``num_steps`` defaults to it); ``lanczos``
    and ``bidiagonalize`` require ``num_steps`` (``rank`` defaults to it). A
    defaulted value is never blamed: a bad rank is reported as ``rank``.
    """
    if rank is not None:
        rank = _checks.check_int(fn, "rank", rank, minimum=1, example="rank=50")
    if num_steps is not None:
        num_steps = _checks.check_int(fn, "num_steps", num_steps, minimum=1, example="num_steps=100")
    if num_steps is None:  # factorize's default: as many steps as kept pairs
        if rank is None:
            raise _checks.error(fn, "rank", None, "a positive int (static)", "pass e.g. rank=50.")
        if rank > dim:
            raise _checks.error(fn, "rank", rank, f"at most the dimension {dim}",
                                f"pass rank <= {dim} (rank = {dim} keeps every pair).")
        return rank, rank
    if rank is None:       # lanczos / bidiagonalize's default: keep every pair
        rank = num_steps
    if num_steps > dim:
        raise _checks.error(fn, "num_steps", num_steps, f"at most the dimension {dim}",
                            f"pass num_steps <= {dim} (num_steps = {dim} is the exact factorisation).")
    if rank > num_steps:
        raise _checks.error(fn, "rank", rank, f"at most num_steps = {num_steps}",
                            "keep rank <= num_steps (more steps than kept pairs improve accuracy).")
    return rank, num_steps


def _captured(x, outside, b) -> Solution:
    """A low-rank answer is converged only if b lies in the factors' subspace (to the dtype's rtol).

    Otherwise the answer is a truncation whose error no HVP has checked:
    failure ``"approximate"``, never ``converged`` (see :func:`approximation_error`).
    """
    rnorm, bnorm = _tree.norm(outside), _tree.norm(b)
    met = rnorm <= default_rtol(rnorm.dtype) * bnorm
    # the backward error of x for the factors' operator (A x = b − outside)
    return _finish(x, 0, 0, rnorm, met, jnp.where(met, NONE, APPROXIMATE), backward_error(b, x, outside))


def _check_rtol(fn, rtol):
    if rtol is not None:
        _checks.check_nonnegative(fn, "rtol", rtol)
    return rtol


def _factors(values, left, right, residuals, count, rank, rtol, unravel, damping, method, curvature):
    """Sort by |value|, keep ``rank`` pairs, set the used count, unflatten the vectors."""
    floor = values.shape[0] * float(jnp.finfo(values.dtype).eps)  # numerical rank, as in lstsq
    order = jnp.argsort(-jnp.abs(values))[:rank]
    values, residuals = values[order], residuals[order]
    cut = floor if rtol is None else jnp.maximum(rtol, floor)
    top = jnp.max(jnp.abs(values))
    used = jnp.sum(jnp.abs(values) > cut * top, dtype=jnp.int32)
    stack = lambda M: None if M is None else jax.vmap(unravel)(M[order])
    return Factors(values, stack(left), stack(right), used, residuals, jnp.asarray(damping),
                   jnp.asarray(count, jnp.int32), method, curvature)


def _factorize(fn, A, *, symmetric, rank, num_steps, rtol, key, start) -> Factors:
    """Lanczos (symmetric A) or Golub–Kahan of the operator value ``A``, starts on its support."""
    flat, unravel = jax.flatten_util.ravel_pytree(A.like)
    dim = flat.shape[0]
    domain = jax.tree_util.tree_leaves(A.domain)
    if domain and all(_checks.is_concrete(m) for m in domain):  # the target parameters
        dim = sum(int(np.count_nonzero(np.asarray(m))) for m in domain)
    rank, num_steps = _check_steps(fn, rank, num_steps, dim)
    _check_rtol(fn, rtol)
    key = jax.random.key(0) if key is None else key
    key_start, key = jax.random.split(key)
    if start is None:
        start = unravel(jax.random.normal(key_start, flat.shape, flat.dtype))
    else:
        _checks.check_like(fn, "start", start, A.like)
    ravel = lambda tree: jax.flatten_util.ravel_pytree(tree)[0]
    ones = unravel(jnp.ones_like(flat))
    q0 = ravel(_masks.apply(A.codomain, start))
    on_domain, on_codomain = ravel(_masks.apply(A.domain, ones)), ravel(_masks.apply(A.codomain, ones))
    if symmetric:
        out = _krylov.lanczos(_krylov.flat_op(A.matvec, unravel), q0, num_steps, key, on_domain)
    else:
        out = _krylov.bidiagonalize(_krylov.flat_op(A.matvec, unravel),
                                    _krylov.flat_op(A.transpose_matvec, unravel), q0, num_steps, key,
                                    on_codomain, on_domain)
    return _factors(*out, rank, rtol, unravel, A.damping, None, A.curvature)


def lanczos(matvec: Callable, start, *, num_steps: int, rank: int | None = None, rtol=None,
            key=None) -> Factors:
    r"""Rank-``rank`` Ritz factorisation of a symmetric operator by m-step Lanczos.

        A Q_m = Q_m T_m + β_m q_{m+1} e_mᵀ,  T_m = S Θ Sᵀ,  A ≈ Y Θ Yᵀ with Y = Q_m S,

    with full reorthogonalisation (two Gram–Schmidt passes per step) and a
    random restart on breakdown. m = dim gives the exact eigendecomposition
    (for an operator that is singular on a known subspace, e.g. masked, use
    :func:`factorize` or :func:`gifjax.spectrum.eigsh` with the mask).

    Args:
      matvec: symmetric ``v ↦ A v`` on pytrees like ``start``.
      start: the start vector q₁ (pytree; normalised here; traced).
      num_steps: m, static (m matvecs, memory m vectors).
      rank: pairs kept (static, ≤ m; default m), largest \|θ\| first.
      rtol: traced; pairs with \|θ\| ≤ rtol·max\|θ\| are not used by solves.
      key: PRNG key for restart vectors (default ``jax.random.key(0)``).

    Returns:
      :class:`Factors` with ``method=None`` (usable with :class:`LowRank`
      directly; use :func:`factorize` for influence).

    Example:
      >>> import jax.numpy as jnp, gifjax
      >>> A = jnp.diag(jnp.array([3.0, -2.0, 1.0]))
      >>> f = gifjax.lowrank.lanczos(lambda v: A @ v, jnp.ones(3), num_steps=3)
      >>> f.values.round(4)
      Array([ 3., -2.,  1.], dtype=float32)
    """
    flat, unravel = jax.flatten_util.ravel_pytree(start)
    if num_steps is None:
        raise _checks.error("lowrank.lanczos", "num_steps", None, "a positive int (static)",
                            "pass e.g. num_steps=50.")
    rank, num_steps = _check_steps("lowrank.lanczos", rank, num_steps, flat.shape[0])
    key = jax.random.key(0) if key is None else key
    out = _krylov.lanczos(_krylov.flat_op(matvec, unravel), flat, num_steps, key, jnp.ones_like(flat))
    return _factors(*out, rank, _check_rtol("lowrank.lanczos", rtol), unravel, 0.0, None, "hessian")


def bidiagonalize(matvec: Callable, rmatvec: Callable, start, *, num_steps: int,
                  rank: int | None = None, rtol=None, key=None) -> Factors:
    r"""Rank-``rank`` truncated SVD A ≈ U Σ Vᵀ by m-step Golub–Kahan bidiagonalisation.

        β₁u₁ = start,  α₁v₁ = Aᵀu₁,  A V_m = U_{m+1} B_m,  B_m = P Σ Qᵀ,
        U ← U_{m+1} P,  V ← V_m Q,

    2m + 1 matvecs, full reorthogonalisation of both bases, random restart on
    breakdown. With ``start = b`` and all pairs kept, V Σ⁻¹ Uᵀ b is m steps of
    LSQR (= CGLS) for min ‖A x − b‖.

    Args: as in :func:`lanczos`, plus ``rmatvec: u ↦ Aᵀ u``. ``start`` lives
    in A's output space (like b).
    """
    flat, unravel = jax.flatten_util.ravel_pytree(start)
    if num_steps is None:
        raise _checks.error("lowrank.bidiagonalize", "num_steps", None, "a positive int (static)",
                            "pass e.g. num_steps=50.")
    rank, num_steps = _check_steps("lowrank.bidiagonalize", rank, num_steps, flat.shape[0])
    key = jax.random.key(0) if key is None else key
    ones = jnp.ones_like(flat)
    out = _krylov.bidiagonalize(_krylov.flat_op(matvec, unravel), _krylov.flat_op(rmatvec, unravel), flat,
                                num_steps, key, ones, ones)
    return _factors(*out, rank, _check_rtol("lowrank.bidiagonalize", rtol), unravel, 0.0, None, "hessian")


# ----------------------------------------------------------------------------- influence-level


def factorize(loss_fn: Callable, params, *args, rank: int, method: str = "if", mask=None,
              num_steps: int | None = None, rtol=None, damping=0.0, curvature="hessian", key=None,
              start=None, chunk_size: int | None = None, axis_name: str | None = None,
              progress: bool | None = None) -> Factors:
    r"""Factorise the operator of an influence ``method`` once, for any number of queries.

    ``method`` picks the operator (see the module table): Lanczos on H_λ
    (if, pif) or P H_λ P (fif), Golub–Kahan on H_λ P (gif); with
    C = ∇²loss_fn or a :class:`gifjax.GGN` for ``curvature``. Costs m
    curvature products (2m + 1 for gif) and m stored vectors; each later
    query costs two projections (:class:`LowRank`).

    Args:
      loss_fn, params, \*args, mask, curvature, chunk_size, axis_name: as in
        :func:`gifjax.influence`.
      damping: as in :func:`gifjax.influence` (may be a
        :class:`gifjax.AutoDamping`; the resolved λ is ``factors.damping``).
      rank: pairs kept (static), largest \|θ\| / σ first.
      method: ``"if"``, ``"pif"``, ``"fif"`` or ``"gif"`` (static).
      num_steps: Krylov steps m (static, rank ≤ m ≤ dim, dim = the number of
        target parameters for fif / gif; default ``rank``).
        m ≈ 2·rank makes the kept top pairs much more accurate.
      rtol: traced; use only pairs with \|θ\| > rtol·max\|θ\| (rank by tolerance).
      key: PRNG key for the random start and restarts (default ``key(0)``).
      start: optional start vector (pytree like ``params``; masked for fif).
        ``start = g`` reproduces m steps of CG / LSQR for that g; the mean of
        the right-hand sides biases the subspace toward them.
      progress: a tqdm bar over the curvature products (m, or 2m + 1 for
        gif); as in :func:`gifjax.influence_scores` (off inside ``jit``,
        ``False`` or ``GIFJAX_PROGRESS=0`` silences it).

    Returns:
      :class:`Factors` tagged with ``method``; pass ``LowRank(factors)`` as
      ``solver=`` to the influence functions, or :func:`save` it.

    Example:
      >>> import jax, jax.numpy as jnp, gifjax
      >>> X = jax.random.normal(jax.random.key(0), (30, 4)); y = X @ jnp.ones(4)
      >>> loss = lambda w, X, y: 0.5 * jnp.mean((X @ w - y) ** 2) + 0.01 * w @ w
      >>> ex = lambda w, xy: 0.5 * (xy[0] @ w - xy[1]) ** 2
      >>> f = gifjax.lowrank.factorize(loss, jnp.ones(4), X, y, method="gif", rank=4)
      >>> I = gifjax.influence_scores(loss, jnp.ones(4), ex, (X, y), (X[:5], y[:5]), X, y,
      ...                             method="gif", solver=gifjax.lowrank.LowRank(f))
      >>> I.shape
      (30, 5)

    Warning:
      With rank ≪ dim, a random start captures the *extremal* spectrum; the
      small eigenvalues — which dominate an undamped inverse — are missing.
      Damp (λ above the uncaptured bulk, then ``complement=1/λ``), or check
      :func:`approximation_error` before trusting the scores.
    """
    fn = "lowrank.factorize"
    estimator = Estimator(method, mask).check(fn, params)
    spec = curvature_spec(fn, curvature, damping=damping, chunk_size=chunk_size, axis_name=axis_name)
    C = spec.resolve(loss_fn, params, *args, trace_mask=estimator.trace_mask)
    problem = estimator.problem(C)
    solver = LowRank(rank=rank, num_steps=num_steps, rtol=rtol, key=key, start=start)
    m = num_steps if isinstance(num_steps, int) else rank if isinstance(rank, int) else 0
    total = m if problem.form == "symmetric" else 2 * m + 1
    emit, show = _progress.wanted(progress, fn, total, params, args)
    with _progress.bar(fn, total, show, unit="product"):
        factors = solver.setup(_progress.counting(prepared(problem.operator), emit), problem.form, fn=fn)
        return dataclasses.replace(jax.block_until_ready(factors) if show else factors, method=method)


@_repr.compact_repr()
class Approximation(NamedTuple):
    """Low-rank answer vs an exact solve (see :func:`approximation_error`)."""

    relative_error: jax.Array   # ‖x_k − x‖ / ‖x‖
    lowrank: Any                # x_k (Δ, or the adjoint s)
    exact: Any                  # x
    exact_solution: Solution    # the reference solve's diagnostics: check ``converged``


def approximation_error(loss_fn: Callable, params, factors: Factors, b, *args, mask=None,
                        adjoint: bool = False, complement=None, exact_solver=None,
                        curvature="hessian", chunk_size: int | None = None) -> Approximation:
    r"""Relative error of the low-rank answer against an exact solve, for one b.

        error = ‖x_k − x‖ / ‖x‖,  x_k from ``LowRank(factors, complement)``,

    x from ``exact_solver`` on the true operator (the factors' method,
    damping, and the given ``mask`` / ``curvature``). ``adjoint=False``
    compares Δ(b) (:func:`gifjax.influence`), ``adjoint=True`` the score
    solve s(b) (:func:`gifjax.adjoint_solve`; b a test gradient). The default
    exact solver is ``LSTSQ`` (pseudo-inverse, robust where H is indefinite)
    at rtol 1e-10 (float64) or 1e-5 (float32). ``jax.vmap`` over b for many.
    """
    fn = "lowrank.approximation_error"
    if not isinstance(factors, Factors) or factors.method is None:
        raise _checks.error(fn, "factors", type(factors).__name__,
                            "Factors from gifjax.lowrank.factorize (tagged with a method)",
                            "build them with gifjax.lowrank.factorize(..., method=...).")
    if exact_solver is None:
        dtype = jax.flatten_util.ravel_pytree(params)[0].dtype
        exact_solver = LSTSQ(rtol=1e-10 if dtype == jnp.float64 else 1e-5)
    run = adjoint_solve if adjoint else influence
    pick = (lambda out: out.value) if adjoint else (lambda out: out.delta)
    kw = dict(mask=mask, method=factors.method, chunk_size=chunk_size)
    fast = run(loss_fn, params, b, *args, solver=LowRank(factors, complement), **kw)
    ref = run(loss_fn, params, b, *args, solver=exact_solver, damping=factors.damping,
              curvature=curvature, **kw)
    ref_sol = ref if adjoint else ref.solution
    x_k, x = pick(fast), pick(ref)
    err = _tree.norm(_tree.sub(x_k, x)) / _tree.norm(x)
    return Approximation(err, x_k, x, ref_sol)


# ----------------------------------------------------------------------------- save / load


def _npz_path(path) -> str:
    """The file ``np.savez(path)`` writes: ``path`` with ``.npz`` appended unless it ends so."""
    path = os.fspath(path)
    return path if path.endswith(".npz") else path + ".npz"


def save(path, factors: Factors) -> None:
    """Write ``factors`` to an ``.npz`` file (arrays plus method and curvature tags).

    Like ``numpy.savez``, ``.npz`` is appended to ``path`` unless it ends so;
    :func:`load` accepts the same ``path`` (with or without the suffix).
    Extension dtypes such as bfloat16 are restored on load.
    """
    if not isinstance(factors, Factors):
        raise _checks.error("lowrank.save", "factors", type(factors).__name__, "a Factors value",
                            "pass the result of gifjax.lowrank.factorize.", kind=TypeError)
    arrays = {"values": factors.values, "rank": factors.rank, "residuals": factors.residuals,
              "damping": factors.damping, "num_matvecs": factors.num_matvecs,
              "method": np.array(factors.method or ""), "curvature": np.array(factors.curvature)}
    for side in ("left", "right"):
        tree = getattr(factors, side)
        for i, leaf in enumerate(jax.tree_util.tree_leaves(tree) if tree is not None else []):
            arrays[f"{side}_{i}"] = np.asarray(leaf)
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    dtypes = {k: str(v.dtype) for k, v in arrays.items()}  # npz stores bfloat16 & co. as raw bytes
    np.savez(_npz_path(path), __dtypes__=np.array(json.dumps(dtypes)), **arrays)


def load(path, like) -> Factors:
    """Read factors written by :func:`save`; ``like`` (e.g. ``params``) gives the pytree structure.

    ``path`` as given to :func:`save` (``"x"`` finds ``x.npz``).
    """
    fn = "lowrank.load"
    given = os.fspath(path)
    path = given if os.path.exists(given) else _npz_path(given)
    if not os.path.exists(path):
        raise _checks.error(fn, "path", repr(given), "a file written by gifjax.lowrank.save "
                            f"(looked for {given!r} and {_npz_path(given)!r})",
                            "check the path, or save factors first with gifjax.lowrank.save(path, factors).",
                            kind=FileNotFoundError)
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise _checks.error(fn, "path", repr(path), "a file written by gifjax.lowrank.save",
                            f"the file is damaged or not an .npz ({type(e).__name__}: {e}); save the "
                            "factors again.") from None
    with data:
        treedef = jax.tree_util.tree_structure(like)
        n = treedef.num_leaves
        dtypes = json.loads(str(data["__dtypes__"])) if "__dtypes__" in data.files else {}

        def read(key):
            a = data[key]
            name = dtypes.get(key)
            if name is not None and str(a.dtype) != name:
                a = a.view(jnp.dtype(name))
            return a

        def side(name):
            if f"{name}_0" not in data:
                return None
            return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(read(f"{name}_{i}")) for i in range(n)])

        left = side("left")
        if left is None:
            raise _checks.error("lowrank.load", "path", str(path), "a file written by gifjax.lowrank.save",
                                "save factors with gifjax.lowrank.save(path, factors).")
        first = jax.tree_util.tree_map(lambda a: a[0], left)
        _checks.check_like("lowrank.load", "like", like, first, ref_name="the saved vectors", dtype=False)
        method = str(data["method"]) or None
        return Factors(jnp.asarray(read("values")), left, side("right"), jnp.asarray(read("rank")),
                       jnp.asarray(read("residuals")), jnp.asarray(read("damping")),
                       jnp.asarray(read("num_matvecs")), method, str(data["curvature"]))
