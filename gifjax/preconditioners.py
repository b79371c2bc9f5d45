r"""Preconditioners as values: built once from the operator, shared by every query.

A preconditioner is a small configuration value (``Jacobi(num_probes=64)``,
``Nystrom(rank=100)``, ``Deflation(rank=50)`` or ``Deflation(factors)``). A
solver given one (``MINRES(preconditioner=...)``, ``CG(preconditioner=...)``)
calls ``preconditioner.build(target)`` once in its ``init``, outside any
``vmap`` over queries, and applies the resulting :class:`Inverse` M⁻¹ ≈ A⁻¹
(symmetric positive definite) at every step. ``target`` is the system the
Krylov method runs on: the operator itself for the symmetric forms (IF, PIF,
FIF), the normal operator FᵀF for GIF's least-squares update and its
min-norm adjoint (the preconditioned normal-equation MINRES is LSMR with
split preconditioning).

Every preconditioner is SPD by construction (absolute values, floors), so it
is valid for indefinite operators too; a poor one only costs iterations,
never accuracy. It acts as the identity off the operator's domain (the
mask), so masked estimators keep their answers on the target parameters.

Low-rank preconditioners use the spectral form of Frangella, Tropp & Udell
(2021): with the k dominant eigenpairs (U, Λ) of the target and μ = \|λ_k\|
the smallest kept,

    M⁻¹ = U diag(μ / \|Λ\|) Uᵀ + (I − U Uᵀ),

which maps the top k eigenvalues onto μ and leaves the rest: the effective
condition number drops from \|λ_1\|/\|λ_n\| to \|λ_k\|/\|λ_n\|.

Example:
    >>> import jax.numpy as jnp
    >>> from gifjax import preconditioners, solvers
    >>> A = jnp.diag(jnp.array([1000.0, 100.0, 1.0, 2.0]))
    >>> op = solvers.LinearOperator(lambda v: A @ v, symmetric=True, psd=True, like=jnp.zeros(4))
    >>> M = preconditioners.Deflation(rank=2).build(op)
    >>> (M(jnp.ones(4)) * jnp.diag(A)).round(1).tolist()   # top two eigenvalues mapped to μ = 100
    [100.0, 100.0, 1.0, 2.0]
"""

from __future__ import annotations

from typing import Any

import jax
import jax.flatten_util
import jax.numpy as jnp

from . import _checks, _krylov, _tree
from . import masks as _masks
from .operators import LinearOperator

__all__ = ["Deflation", "Inverse", "Jacobi", "Nystrom", "Preconditioner", "get_preconditioner"]

HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- the built inverse


@_tree.pytree_dataclass(static=("unravel",))
class Inverse:
    """M⁻¹ as a value: ``diag`` scaling, then a low-rank spectral correction.

    M⁻¹ v = D⁻¹ v + U diag(w) Uᵀ v on the domain (``support`` = 1), v off it,
    with D = ``diag`` (flat, > 0) and U = ``vectors`` [k, n] orthonormal.
    ``num_matvecs`` is what building it cost.
    """

    diag: Any            # [n] or None
    vectors: Any         # [k, n] or None
    weights: Any         # [k] or None
    support: Any         # [n] 1 on the operator's domain, 0 off it
    num_matvecs: Any
    unravel: Any = None

    def __call__(self, v):
        flat, unravel = jax.flatten_util.ravel_pytree(v)
        x = flat * self.support
        y = x if self.diag is None else x / self.diag
        if self.vectors is not None:
            c = jnp.matmul(self.vectors, x, precision=HIGHEST)
            y = y + jnp.matmul(self.weights * c, self.vectors, precision=HIGHEST)
        return unravel((y + flat * (1 - self.support)).astype(flat.dtype))


def _spectral(values, vectors, rank, support, matvecs, unravel) -> Inverse:
    """The Frangella–Tropp–Udell inverse from eigenpairs sorted by decreasing |value|."""
    mags = jnp.abs(values[:rank])
    eps = jnp.finfo(mags.dtype).eps
    mu = jnp.maximum(mags[-1], eps * mags[0])
    keep = mags > mu  # pairs at or below μ (or zero) are left alone
    weights = jnp.where(keep, mu / jnp.where(keep, mags, 1.0) - 1.0, 0.0)
    return Inverse(None, vectors[:rank], weights, support, jnp.asarray(matvecs, jnp.int32), unravel)


# ----------------------------------------------------------------------------- configurations


class Preconditioner:
    """Base class: ``build(operator) → Inverse`` (symmetric operators: the system itself)."""

    def build(self, operator: LinearOperator) -> Inverse:
        raise NotImplementedError


def _flat(operator: LinearOperator):
    like = operator.like
    if like is None:
        raise _checks.error("preconditioners", "operator.like", None, "a pytree like the operator's vectors",
                            "build the operator with like=params (gifjax's own operators have it).")
    flat, unravel = jax.flatten_util.ravel_pytree(like)
    ones = unravel(jnp.ones_like(flat))
    support = jax.flatten_util.ravel_pytree(_masks.apply(operator.domain, ones))[0]
    return flat, unravel, support


def _products(operator, unravel, vectors, batch_size):
    """A applied to the rows of ``vectors`` [k, n], ``batch_size`` at a time (one batched HVP each)."""
    A = _krylov.flat_op(operator.matvec, unravel)
    return jax.lax.map(A, vectors, batch_size=batch_size)


@_tree.pytree_dataclass(static=("num_probes", "batch_size"))
class Jacobi(Preconditioner):
    r"""Diagonal scaling M = \|diag A\|, the diagonal estimated by Hutchinson probes.

    diag A ≈ mean_z z ⊙ A z over ``num_probes`` Rademacher vectors z (exact
    for diagonal A; the error of each entry shrinks as 1/√num_probes).
    Entries below ``floor`` × the largest are raised to it. Cheap and
    embarrassingly parallel; helps when parameters live on very different
    scales (e.g. unnormalised inputs), rarely much otherwise.
    """

    num_probes: int = 32
    floor: Any = 1e-3
    key: Any = None
    batch_size: int = 16

    def build(self, operator):
        flat, unravel, support = _flat(operator)
        n = _checks.check_positive_int("preconditioners.Jacobi", "num_probes", self.num_probes)
        key = jax.random.key(0) if self.key is None else self.key
        Z = jax.random.rademacher(key, (n, flat.shape[0]), flat.dtype) * support
        d = jnp.abs(jnp.mean(Z * _products(operator, unravel, Z, self.batch_size), axis=0))
        d = jnp.maximum(d, self.floor * jnp.max(d))
        d = jnp.where(support > 0, jnp.where(d > 0, d, 1.0), 1.0)
        return Inverse(d, None, None, support, jnp.int32(n), unravel)


@_tree.pytree_dataclass(static=("rank", "oversample", "batch_size"))
class Nystrom(Preconditioner):
    r"""Randomized Nyström preconditioner (Frangella, Tropp & Udell 2021).

    PSD operators (Gauss–Newton, damped convex Hessians, GIF's normal
    system): one pass, Y = A Ω for a Gaussian Ω with ``rank + oversample``
    orthonormal columns, then the stable shifted Nyström approximation
    A ≈ U Λ Uᵀ (shift ν = √n·eps·‖Y‖). Other symmetric operators (a Hessian
    that may be indefinite): a randomized eigendecomposition of the range
    found by Y, which costs a second pass. The top ``rank`` pairs form the
    spectral inverse (module docstring). ``rank + oversample`` matvecs per
    pass, ``batch_size`` at a time.
    """

    rank: int = 64
    oversample: int = 8
    key: Any = None
    batch_size: int = 16

    def build(self, operator):
        fn = "preconditioners.Nystrom"
        flat, unravel, support = _flat(operator)
        rank = _checks.check_positive_int(fn, "rank", self.rank)
        width = rank + int(self.oversample)
        if width > flat.shape[0]:
            raise _checks.error(fn, "rank", rank, f"rank + oversample ≤ the dimension {flat.shape[0]}",
                                "lower rank (or use solvers.Dense on so small a problem).")
        key = jax.random.key(0) if self.key is None else self.key
        omega = jax.random.normal(key, (flat.shape[0], width), flat.dtype) * support[:, None]
        omega, _ = jnp.linalg.qr(omega)
        Y = _products(operator, unravel, omega.T, self.batch_size).T  # [n, width]
        if operator.psd:
            nu = jnp.sqrt(flat.shape[0]) * jnp.finfo(flat.dtype).eps * jnp.linalg.norm(Y)
            Y_nu = Y + nu * omega
            L = jnp.linalg.cholesky(_sym(jnp.matmul(omega.T, Y_nu, precision=HIGHEST)))
            B = jax.scipy.linalg.solve_triangular(L, Y_nu.T, lower=True).T
            U, s, _ = jnp.linalg.svd(B, full_matrices=False)
            values, vectors, matvecs = jnp.maximum(s**2 - nu, 0.0), U.T, width
        else:
            Q, _ = jnp.linalg.qr(Y)
            AQ = _products(operator, unravel, Q.T, self.batch_size).T
            w, S = jnp.linalg.eigh(_sym(jnp.matmul(Q.T, AQ, precision=HIGHEST)))
            order = jnp.argsort(-jnp.abs(w))
            values, vectors, matvecs = w[order], jnp.matmul(Q, S[:, order], precision=HIGHEST).T, 2 * width
        return _spectral(values, vectors, rank, support, matvecs, unravel)


@_tree.pytree_dataclass(static=("rank", "num_steps"))
class Deflation(Preconditioner):
    r"""Spectral deflation by the dominant eigenpairs: Lanczos, or factors you already have.

    ``Deflation(rank=k)`` runs ``num_steps`` (default 2k) Lanczos steps with
    full reorthogonalisation on the target and keeps its k largest-\|θ\| Ritz
    pairs; ``Deflation(factors)`` adopts a :class:`gifjax.lowrank.Factors`
    (eigenpairs; singular factors of F give FᵀF's pairs σ², right vectors),
    so the rank a shared factorisation bought becomes speed, not
    approximation error: the solve is exact, only faster.
    """

    factors: Any = None
    rank: int | None = None
    num_steps: int | None = None
    key: Any = None

    def build(self, operator):
        fn = "preconditioners.Deflation"
        flat, unravel, support = _flat(operator)
        ravel = jax.vmap(lambda t: jax.flatten_util.ravel_pytree(t)[0])
        if self.factors is not None:
            f = self.factors
            values = f.values if f.right is None else f.values**2
            vectors = ravel(f.right_vectors)
            rank = int(values.shape[0]) if self.rank is None else self.rank
            return _spectral(values, vectors, rank, support, 0, unravel)
        rank = _checks.check_positive_int(fn, "rank", self.rank, example="Deflation(rank=50)")
        steps = min(2 * rank if self.num_steps is None else int(self.num_steps), flat.shape[0])
        if rank > steps:
            raise _checks.error(fn, "rank", rank, f"≤ num_steps = {steps}", "lower rank or raise num_steps.")
        key = jax.random.key(0) if self.key is None else self.key
        k_start, k_restart = jax.random.split(key)
        q0 = jax.random.normal(k_start, flat.shape, flat.dtype) * support
        theta, vectors, _, _, m = _krylov.lanczos(_krylov.flat_op(operator.matvec, unravel), q0, steps,
                                                  k_restart, support)
        order = jnp.argsort(-jnp.abs(theta))
        return _spectral(theta[order], vectors[order], rank, support, m, unravel)


def _sym(M):
    return 0.5 * (M + M.T)


def get_preconditioner(preconditioner, fn: str = "solvers"):
    """``None``, a :class:`Preconditioner` value, or a name: ``"jacobi"``, ``"nystrom"``, ``"deflation"``."""
    if preconditioner is None or isinstance(preconditioner, Preconditioner):
        return preconditioner
    names = {"jacobi": Jacobi, "nystrom": Nystrom, "deflation": lambda: Deflation(rank=32)}
    if isinstance(preconditioner, str) and preconditioner in names:
        return names[preconditioner]()
    raise _checks.error(fn, "preconditioner", repr(preconditioner),
                        f"None, one of {sorted(names)}, or a value such as Nystrom(rank=100)",
                        "pick a name from that list, or configure one from gifjax.preconditioners.")

