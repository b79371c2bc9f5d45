r"""Curvature spectra: top-k / bottom-k eigenvalues and the rate of negative curvature.

Two matrix-free eigensolvers for symmetric operators (Hessian, GGN, masked
P C P), both over pytrees:

* **Lanczos** (:func:`gifjax.lowrank.lanczos`): m steps with full
  reorthogonalisation, Ritz values of the tridiagonal T_m. Both ends of the
  spectrum converge first; m ≈ 2k + 10 steps usually pin the k extremal
  eigenvalues. Each Ritz pair comes with the residual bound
  \|θ − λ\| ≤ ‖A y − θ y‖ = \|β_m s_{m,i}\|.
* **Power (subspace) iteration**: V ← orth(S V) for a k-column block, then a
  Rayleigh–Ritz step. S = A for ``which="magnitude"``, A + σI for
  ``"largest"``, σI − A for ``"smallest"`` (σ ≈ 1.1·‖A‖ by
  :func:`gifjax.solvers.power_iteration`). Converges like
  \|λ_{k+1}/λ_k\|^steps of S — slowly where the spectrum is flat; the
  benchmark against Lanczos.

:func:`negative_rate` gives the fraction of negative eigenvalues among the
top-k by magnitude — the analysis that motivates GIF (Lyu et al. 2024 report
~18 % of the top-500 for a small cross-entropy MLP, falling with weight
decay): the Hessian of a trained network is not positive definite, so CG on
H fails and GIF's PSD least-squares system (or a GGN) is needed.

Example:
    >>> import jax.numpy as jnp, gifjax
    >>> loss = lambda w: 0.5 * jnp.sum(jnp.array([3.0, -1.0, 0.5, 2.0]) * w ** 2)
    >>> gifjax.spectrum.eigenvalues(loss, jnp.zeros(4), k=2).values.round(4)
    Array([3., 2.], dtype=float32)
    >>> float(gifjax.spectrum.negative_rate(loss, jnp.zeros(4), k=4).rate)
    0.25
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from . import _checks, _krylov, _repr
from . import masks as _masks
from . import solvers as _solvers
from .operators import Estimator, curvature_spec

__all__ = ["EIGENSOLVERS", "NegativeRate", "Spectrum", "WHICH", "eigenvalues", "eigsh", "negative_rate"]

WHICH = ("largest", "smallest", "magnitude")
EIGENSOLVERS = ("lanczos", "power")
HIGHEST = jax.lax.Precision.HIGHEST


@_repr.compact_repr()
class Spectrum(NamedTuple):
    r"""k eigenvalue estimates with their residual bounds.

    Attributes:
      values: [k], ordered by ``which`` (largest first, smallest first, or
        largest \|λ\| first).
      vectors: the eigenvector estimates, a pytree like ``params`` with a
        leading axis k, or ``None`` unless ``return_vectors=True``.
      residuals: [k] ‖A y_i − θ_i y_i‖; for symmetric A some eigenvalue lies
        within this distance of θ_i.
      num_matvecs: curvature products spent (int32).
    """

    values: jax.Array
    vectors: Any
    residuals: jax.Array
    num_matvecs: jax.Array


def _select(values, which, k):
    key = {"largest": -values, "smallest": values, "magnitude": -jnp.abs(values)}[which]
    return jnp.argsort(key)[:k]


def _lanczos(A, q0, k, which, num_steps, key, support):
    theta, vectors, _, residuals, count = _krylov.lanczos(A, q0, num_steps, key, support)
    order = _select(theta, which, k)
    return theta[order], vectors[order], residuals[order], count


def _power(A, q0, k, which, num_steps, key, support):
    p, dt = q0.shape[0], q0.dtype
    Ab = jax.vmap(A)
    extra = 0
    if which == "magnitude":
        S = Ab
    else:
        sigma = 1.1 * _solvers.power_iteration(A, q0, key=jax.random.fold_in(key, 1), num_steps=20)
        extra = 20
        sign = 1.0 if which == "largest" else -1.0
        S = lambda V: sign * Ab(V) + sigma * V
    R = jax.random.normal(jax.random.fold_in(key, 2), (k, p), dt) * support  # on the mask
    V = jnp.linalg.qr(R.at[0].set(q0).T)[0].T

    def body(V, _):
        return jnp.linalg.qr(S(V).T)[0].T, None

    V, _ = jax.lax.scan(body, V, None, length=num_steps)
    W = Ab(V)
    T = jnp.matmul(V, W.T, precision=HIGHEST)
    theta, Sm = jnp.linalg.eigh(0.5 * (T + T.T))
    Y = jnp.matmul(Sm.T, V, precision=HIGHEST)
    residuals = jnp.linalg.norm(jnp.matmul(Sm.T, W, precision=HIGHEST) - theta[:, None] * Y, axis=1)
    order = _select(theta, which, k)
    return theta[order], Y[order], residuals[order], k * (num_steps + 1) + extra


def eigsh(matvec: Callable, like, *, k: int, which: str = "largest", eigensolver: str = "lanczos",
          num_steps: int | None = None, key=None, mask=None, return_vectors: bool = False) -> Spectrum:
    r"""k extremal eigenvalues of a symmetric operator on pytrees (matrix-free).

    Args:
      matvec: symmetric ``v ↦ A v`` on pytrees like ``like``.
      like: pytree fixing structure and dtype.
      k: number of eigenvalues (static).
      which: ``"largest"`` (top-k), ``"smallest"`` (bottom-k) or
        ``"magnitude"`` (largest \|λ\|) — static.
      eigensolver: ``"lanczos"`` (default) or ``"power"`` (subspace iteration) —
        static.
      num_steps: Lanczos steps (default min(dim, 2k + 10), ≤ dim) or power
        iterations (default 100) — static.
      key: PRNG key for the start vectors (default ``jax.random.key(0)``).
      mask: if A = P A P is masked, pass P so the start vectors live on the
        mask (the eigenvalues are then those of the target block A_tt).
      return_vectors: also return the eigenvector estimates (memory k·p).

    Returns:
      :class:`Spectrum`.

    Example:
      >>> import jax.numpy as jnp, gifjax
      >>> A = jnp.diag(jnp.array([4.0, -3.0, 1.0, 0.5]))
      >>> gifjax.spectrum.eigsh(lambda v: A @ v, jnp.zeros(4), k=2, which="smallest").values.round(4)
      Array([-3. ,  0.5], dtype=float32)

    Warning:
      Lanczos with m ≪ dim resolves the ends of the spectrum only; interior
      and clustered eigenvalues need more steps (watch ``residuals``). Power
      iteration stalls when \|λ_{k+1}\| ≈ \|λ_k\|.
    """
    fn = "spectrum.eigsh"
    _checks.check_choice(fn, "which", which, WHICH)
    _checks.check_choice(fn, "eigensolver", eigensolver, EIGENSOLVERS)
    flat, unravel = jax.flatten_util.ravel_pytree(like)
    dim = flat.shape[0]
    if mask is not None:
        mask = _masks.validate(mask, like, fn=fn)
        leaves = jax.tree_util.tree_leaves(mask)
        if all(_checks.is_concrete(m) for m in leaves):
            dim = sum(int(np.count_nonzero(np.asarray(m))) for m in leaves)
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= dim:
        raise _checks.error(fn, "k", repr(k), f"an int in [1, {dim}] (the dimension)",
                            f"ask for at most {dim} eigenvalues.")
    if num_steps is None:
        num_steps = min(dim, 2 * k + 10) if eigensolver == "lanczos" else 100
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1 or (
            eigensolver == "lanczos" and not k <= num_steps <= dim):
        expected = f"an int in [{k}, {dim}]" if eigensolver == "lanczos" else "a positive int"
        raise _checks.error(fn, "num_steps", repr(num_steps), expected,
                            "Lanczos needs k <= num_steps <= dim; num_steps = dim is exact.")
    key = jax.random.key(0) if key is None else key
    A = _krylov.flat_op(matvec, unravel)
    support = jax.flatten_util.ravel_pytree(_masks.apply(mask, unravel(jnp.ones_like(flat))))[0]
    key_start, key = jax.random.split(key)
    q0 = jax.random.normal(key_start, flat.shape, flat.dtype) * support
    run = _lanczos if eigensolver == "lanczos" else _power
    values, vectors, residuals, count = run(A, q0, k, which, num_steps, key, support)
    vectors = jax.vmap(unravel)(vectors) if return_vectors else None
    return Spectrum(values, vectors, residuals, jnp.asarray(count, jnp.int32))


def eigenvalues(loss_fn: Callable, params, *args, k: int, which: str = "largest",
                eigensolver: str = "lanczos", mask=None, curvature="hessian", damping=0.0,
                num_steps: int | None = None, key=None, chunk_size: int | None = None,
                return_vectors: bool = False) -> Spectrum:
    r"""k eigenvalues of the curvature C of ``loss_fn`` (or of its target block C_tt).

    C = ∇²loss_fn(params, \*args) + λI (or a :class:`gifjax.GGN`); with an
    element ``mask`` P the operator is P C P on the mask, i.e. the
    eigenvalues of C_tt. Arguments as in :func:`eigsh` and
    :func:`gifjax.influence`.

    Example:
      >>> import jax.numpy as jnp, gifjax
      >>> loss = lambda w: 0.5 * jnp.sum(jnp.array([3.0, -1.0, 2.0]) * w ** 2)
      >>> mask = jnp.array([False, True, True])
      >>> gifjax.spectrum.eigenvalues(loss, jnp.zeros(3), k=2, mask=mask).values.round(4)
      Array([ 2., -1.], dtype=float32)
    """
    fn = "spectrum.eigenvalues"
    estimator = Estimator("if" if mask is None else "fif", mask).check(fn, params)
    spec = curvature_spec(fn, curvature, damping=damping, chunk_size=chunk_size)
    C = spec.resolve(loss_fn, params, *args, trace_mask=estimator.trace_mask)
    op = _solvers.prepared(estimator.problem(C).operator)  # C, or P C P on the mask; CPU conv layout
    return eigsh(op, params, k=k, which=which, eigensolver=eigensolver, num_steps=num_steps, key=key,
                 mask=estimator.mask, return_vectors=return_vectors)


@_repr.compact_repr()
class NegativeRate(NamedTuple):
    """Share of negative eigenvalues among the top-k by magnitude."""

    rate: jax.Array       # (# negative) / k
    values: jax.Array     # the k eigenvalues, largest |λ| first
    residuals: jax.Array  # their residual bounds


def negative_rate(loss_fn: Callable, params, *args, k: int, mask=None, curvature="hessian",
                  eigensolver: str = "lanczos", num_steps: int | None = None, key=None,
                  chunk_size: int | None = None) -> NegativeRate:
    r"""Fraction of negative eigenvalues among the k largest-magnitude eigenvalues of H.

        rate = #{i ≤ k : λ_i < 0} / k,  \|λ_1\| ≥ \|λ_2\| ≥ … (of H, or of H_tt with a mask)

    The paper's curvature analysis (Lyu et al. 2024, ~18 % at k = 500 for a
    small cross-entropy MLP): a large rate means H is far from positive
    definite, where IF/FIF with CG break down and GIF's least-squares
    formulation does not. Arguments as in :func:`eigenvalues`.

    Warning:
      Eigenvalues with \|λ\| near the k-th largest converge last: use
      num_steps ≳ 2k (default 2k + 10) and check ``residuals``.
    """
    spec = eigenvalues(loss_fn, params, *args, k=k, which="magnitude", eigensolver=eigensolver, mask=mask,
                       curvature=curvature, num_steps=num_steps, key=key, chunk_size=chunk_size)
    # NaN curvature (e.g. NaN parameters) must not read as "no negative eigenvalues"
    rate = jnp.where(jnp.all(jnp.isfinite(spec.values)), jnp.mean(spec.values < 0), jnp.nan)
    return NegativeRate(rate, spec.values, spec.residuals)
