"""Matrix-free linear solvers with one call shape and one result type.

Every solver is a small frozen configuration value (a pytree: tolerances,
scales and damping are traced leaves, so sweeping them does not recompile;
step budgets are static) that is called as::

    solution = solver(matvec, b, rmatvec=None, form="symmetric")

on pytrees ``b`` (any structure) with a linear operator ``matvec: x ↦ A x``.
``form`` says which problem is meant:

=================  =======================================  =====================
form               problem                                  needs
=================  =======================================  =====================
``"symmetric"``    A x = b, A symmetric (the IF / FIF case)  ``matvec``
``"least_squares"`` min_x ‖A x − b‖₂ (GIF's update)          ``matvec``, ``rmatvec`` = Aᵀ
``"min_norm"``     min ‖x‖ s.t. A x = b (GIF's adjoint)      ``matvec``, ``rmatvec`` = Aᵀ
=================  =======================================  =====================

Solvers that only handle symmetric positive-definite systems (``CG``,
``LiSSA``) reach the other two forms through the normal equations
Aᵀ A x = Aᵀ b, or A Aᵀ z = b with x = Aᵀ z. ``LSTSQ`` uses the numerically
kinder CGLS / Craig recurrences instead, and ``Richardson`` always iterates on
normal equations, as the GIF paper's code does.

The result is a :class:`Solution`: the value plus diagnostics — steps,
operator applications (``num_matvecs``; one matvec is one HVP in gifjax),
the residual norm the solver controls, ``converged`` and a ``failure`` code
(see :data:`FAILURES`). Solvers never raise on numerical trouble and never
hand back a silent NaN: divergence, indefinite curvature and breakdown come
back flagged, with the last good iterate as the value.

Tolerance solvers (CG, LSTSQ, Richardson) run in ``lax.while_loop``, so under
``jax.vmap`` each right-hand side stops on its own test; LiSSA runs a fixed
budget in ``lax.scan``.

Example:
    >>> import jax.numpy as jnp
    >>> from gifjax import solvers
    >>> A = jnp.array([[3.0, 1.0], [1.0, 2.0]])
    >>> sol = solvers.CG(rtol=1e-6)(lambda x: A @ x, jnp.array([1.0, 0.0]))
    >>> bool(sol.converged), sol.value.round(4)
    (True, Array([ 0.4, -0.2], dtype=float32))
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from . import _checks, _tree

FORMS = ("symmetric", "least_squares", "min_norm")

#: Names of the ``Solution.failure`` codes, indexed by code.
FAILURES = (
    "none",          # 0: converged (or a fixed budget finished without trouble)
    "max_steps",     # 1: budget spent before the tolerance was met
    "indefinite",    # 2: CG met non-positive curvature pᵀAp ≤ 0 (A not SPD)
    "diverged",      # 3: the iteration grew (LiSSA scale too small, …)
    "nonfinite",     # 4: a NaN/Inf appeared; the last finite iterate is returned
    "breakdown",     # 5: a Krylov recurrence divided by zero (singular/inconsistent)
)
# int32 scalars so loop carries keep one dtype with and without jax_enable_x64
NONE, MAX_STEPS, INDEFINITE, DIVERGED, NONFINITE, BREAKDOWN = map(np.int32, range(len(FAILURES)))


class Solution(NamedTuple):
    """A solver's answer and its diagnostics (all arrays; batched under vmap).

    Attributes:
      value: the solution, a pytree like ``b``.
      num_steps: iterations taken (int32).
      num_matvecs: applications of A or Aᵀ, including set-up work such as
        power iterations (int32). In gifjax each one is one HVP.
      residual_norm: the residual the solver controls: ‖b − A x‖ for the
        symmetric and min-norm forms, ‖Aᵀ(b − A x)‖ (normal equations) for the
        least-squares form; ``Richardson`` always reports its normal residual.
      converged: True when the tolerance was met without failure.
      failure: int code into :data:`FAILURES` (0 = none).
    """

    value: Any
    num_steps: jax.Array
    num_matvecs: jax.Array
    residual_norm: jax.Array
    converged: jax.Array
    failure: jax.Array

    def failure_names(self):
        """The failure code(s) as names (needs concrete values)."""
        codes = jnp.asarray(self.failure)
        if codes.ndim == 0:
            return FAILURES[int(codes)]
        return [FAILURES[int(c)] for c in codes.ravel()]


def _solution(value, steps, matvecs, residual, converged, failure):
    return Solution(value, jnp.asarray(steps, jnp.int32), jnp.asarray(matvecs, jnp.int32),
                    residual, jnp.asarray(converged), jnp.asarray(failure, jnp.int32))


_pytree_dataclass = _tree.pytree_dataclass


class Solver:
    """Base class: dispatch on ``form``; default forms via normal equations."""

    def __call__(self, matvec: Callable, b, *, rmatvec: Callable | None = None,
                 form: str = "symmetric") -> Solution:
        name = f"solvers.{type(self).__name__}"
        _checks.check_choice(name, "form", form, FORMS)
        if form != "symmetric" and rmatvec is None:
            raise _checks.error(name, "rmatvec", None, f"the transpose operator for form={form!r}",
                                "pass rmatvec=lambda y: Aᵀ y (for a symmetric A, rmatvec=matvec).")
        if form == "symmetric":
            return self.symmetric(matvec, b)
        if form == "least_squares":
            return self.least_squares(matvec, rmatvec, b)
        return self.min_norm(matvec, rmatvec, b)

    def symmetric(self, A, b) -> Solution:
        raise NotImplementedError

    def least_squares(self, A, At, b) -> Solution:
        """Aᵀ A x = Aᵀ b (CGNR-style); counts two matvecs per normal product."""
        sol = self.symmetric(lambda v, **kw: At(A(v, **kw), **kw), At(b))
        return sol._replace(num_matvecs=2 * sol.num_matvecs + 1)

    def min_norm(self, A, At, b) -> Solution:
        """A Aᵀ z = b, x = Aᵀ z (CGNE-style)."""
        sol = self.symmetric(lambda v, **kw: A(At(v, **kw), **kw), b)
        return sol._replace(value=At(sol.value), num_matvecs=2 * sol.num_matvecs + 1)


# Krylov recurrences cannot resolve residuals below ~eps·‖rhs‖; iterating past that
# floor lets rounding grow components along A's null space and the iterate diverges
# (seen with CGLS on GIF's singular H P in float32). Tolerances are raised to it.
PRECISION_FLOOR = 16


def _tolerance(rtol, atol, rhs_norm, *, floor: bool = False):
    tol = jnp.maximum(rtol * rhs_norm, atol)
    if floor:
        tol = jnp.maximum(tol, PRECISION_FLOOR * jnp.finfo(rhs_norm.dtype).eps * rhs_norm)
    return tol


def _default_steps(max_steps, b):
    """Krylov methods finish in at most dim(b) steps in exact arithmetic."""
    if max_steps is not None:
        return max_steps
    return sum(int(jnp.size(x)) for x in jax.tree_util.tree_leaves(b))


# ----------------------------------------------------------------------------- dense


@_pytree_dataclass(static=("rcond",))
class Dense(Solver):
    """Materialise A column by column (n matvecs) and apply its pseudo-inverse.

    The result is the minimum-norm least-squares solution A⁺ b for all three
    forms, so masked (singular) operators such as P H P give exact zeros off
    the mask. Symmetric A (form ``"symmetric"``) uses an eigendecomposition of
    ½(A + Aᵀ), ~5–10× faster on CPU than the SVD inside ``lstsq``, which
    the non-symmetric forms use; eigen/singular values below
    ``rcond``·max|λ| count as zero (default: n·eps, as ``lstsq``). Under
    ``vmap`` over b the matrix and its factorisation are built once. Use it
    as the reference on small problems; cost n matvecs + O(n³).
    """

    rcond: float | None = None

    def symmetric(self, A, b):
        return self._solve(A, b, normal=False, symmetric=True)

    def least_squares(self, A, At, b):
        return self._solve(A, b, normal=True)

    def min_norm(self, A, At, b):
        return self._solve(A, b, normal=False)

    def _solve(self, A, b, *, normal, symmetric=False):
        flat_b, unravel = jax.flatten_util.ravel_pytree(b)
        n = flat_b.shape[0]
        cols = jax.vmap(lambda e: jax.flatten_util.ravel_pytree(A(unravel(e)))[0])(
            jnp.eye(n, dtype=flat_b.dtype))
        mat = cols.T
        if symmetric:
            x = _symmetric_pinv_solve(mat, flat_b, self.rcond)
        else:
            x = jnp.linalg.lstsq(mat, flat_b, rcond=self.rcond)[0]
        r = flat_b - mat @ x
        residual = jnp.linalg.norm(mat.T @ r if normal else r)
        finite = jnp.all(jnp.isfinite(x))
        x = jnp.where(finite, x, 0.0)
        return _solution(unravel(x), 1, n, residual, finite, jnp.where(finite, NONE, NONFINITE))


def _symmetric_pinv_solve(mat, b, rcond):
    """A⁺ b for symmetric A by ``eigh``, cutting |λ| ≤ rcond·max|λ| like ``lstsq``."""
    w, V = jnp.linalg.eigh(0.5 * (mat + mat.T))
    rcond = jnp.finfo(mat.dtype).eps * mat.shape[0] if rcond is None else rcond
    keep = jnp.abs(w) > rcond * jnp.max(jnp.abs(w))
    inv = jnp.where(keep, 1.0 / jnp.where(keep, w, 1.0), 0.0)
    return V @ (inv * (V.T @ b))


def dense(matvec, b, *, rmatvec=None, form="symmetric", rcond=None) -> Solution:
    """Functional form of :class:`Dense`."""
    return Dense(rcond=rcond)(matvec, b, rmatvec=rmatvec, form=form)


# ----------------------------------------------------------------------------- CG


@_pytree_dataclass(static=("max_steps",))
class CG(Solver):
    """Conjugate gradients for symmetric positive-definite A x = b.

    Stops when ‖r_k‖ ≤ max(rtol·‖b‖, atol) (recurrence residual) or after
    ``max_steps`` (default: dim b). If pᵀAp ≤ 0 appears, A is not positive
    definite on the Krylov space: the solve stops with ``failure="indefinite"``
    and the last iterate, instead of producing garbage — for non-convex models
    use damping, ``LSTSQ``, or Gauss-Newton curvature. Least-squares and
    min-norm forms run CG on the normal equations (κ squared).
    """

    rtol: Any = 1e-5
    atol: Any = 0.0
    max_steps: int | None = None

    def symmetric(self, A, b):
        max_steps = _default_steps(self.max_steps, b)
        bnorm = _tree.norm(b)
        tol2 = _tolerance(self.rtol, self.atol, bnorm) ** 2

        def cond(s):
            k, x, r, p, rr, fail = s
            return (k < max_steps) & (rr > tol2) & (fail == NONE)

        def body(s):
            k, x, r, p, rr, fail = s
            Ap = A(p)
            pAp = _tree.vdot(p, Ap)
            alpha = rr / pAp
            x_new = _tree.axpy(alpha, p, x)
            r_new = _tree.axpy(-alpha, Ap, r)
            rr_new = _tree.vdot(r_new, r_new)
            p_new = _tree.axpy(rr_new / rr, p, r_new)
            fail = jnp.where(pAp <= 0, INDEFINITE,
                             jnp.where(jnp.isfinite(rr_new) & _tree.all_finite(x_new), NONE, NONFINITE))
            ok = fail == NONE
            return (k + 1, _tree.where(ok, x_new, x), _tree.where(ok, r_new, r),
                    _tree.where(ok, p_new, p), jnp.where(ok, rr_new, rr), fail)

        init = (jnp.int32(0), _tree.zeros_like(b), b, b, bnorm**2, jnp.int32(NONE))
        k, x, _, _, rr, fail = jax.lax.while_loop(cond, body, init)
        converged = (rr <= tol2) & (fail == NONE)
        fail = jnp.where(converged | (fail != NONE), fail, MAX_STEPS)
        return _solution(x, k, k, jnp.sqrt(rr), converged, fail)


def cg(matvec, b, *, rmatvec=None, form="symmetric", rtol=1e-5, atol=0.0, max_steps=None):
    """Functional form of :class:`CG`."""
    return CG(rtol=rtol, atol=atol, max_steps=max_steps)(matvec, b, rmatvec=rmatvec, form=form)


# ----------------------------------------------------------------------------- LSTSQ


@_pytree_dataclass(static=("max_steps",))
class LSTSQ(Solver):
    """Least-squares Krylov solver: CGLS for min ‖Ax − b‖, Craig for min-norm.

    * least_squares (GIF's update ``min_x ‖H P x − g‖``): CGLS, i.e. CG on
      AᵀA x = Aᵀb without forming AᵀA; stops when the normal-equation
      residual ‖Aᵀ(b − Ax)‖ ≤ max(rtol·‖Aᵀb‖, atol).
    * min_norm (GIF's adjoint, used for influence scores): Craig's method
      (CGNE), x = Aᵀz with A Aᵀ z = b; stops on ‖b − Ax‖ ≤ max(rtol·‖b‖, atol).
    * symmetric: CGLS with Aᵀ = A, i.e. the least-squares (pseudo-inverse)
      solution; robust when A is indefinite or singular, where CG breaks down.

    Two matvecs per step; max_steps defaults to dim b. Tolerances below the
    working precision are raised to 16·eps times the right-hand side's norm:
    past that floor the recurrences lose orthogonality and, on singular
    systems like GIF's H P, the iterate diverges instead of stalling.
    """

    rtol: Any = 1e-5
    atol: Any = 0.0
    max_steps: int | None = None

    def symmetric(self, A, b):
        return self.least_squares(A, A, b)

    def least_squares(self, A, At, b):
        max_steps = _default_steps(self.max_steps, b)
        s0 = At(b)
        gamma0 = _tree.vdot(s0, s0)
        tol2 = _tolerance(self.rtol, self.atol, jnp.sqrt(gamma0), floor=True) ** 2

        def cond(st):
            k, x, r, p, gamma, fail = st
            return (k < max_steps) & (gamma > tol2) & (fail == NONE)

        def body(st):
            k, x, r, p, gamma, fail = st
            q = A(p)
            qq = _tree.vdot(q, q)
            alpha = gamma / qq
            x_new = _tree.axpy(alpha, p, x)
            r_new = _tree.axpy(-alpha, q, r)
            s = At(r_new)
            gamma_new = _tree.vdot(s, s)
            p_new = _tree.axpy(gamma_new / gamma, p, s)
            fail = _krylov_failure(qq, gamma_new, x_new)
            ok = fail == NONE
            return (k + 1, _tree.where(ok, x_new, x), _tree.where(ok, r_new, r),
                    _tree.where(ok, p_new, p), jnp.where(ok, gamma_new, gamma), fail)

        init = (jnp.int32(0), _tree.zeros_like(s0), b, s0, gamma0, jnp.int32(NONE))
        k, x, _, _, gamma, fail = jax.lax.while_loop(cond, body, init)
        return _finish(x, k, 1 + 2 * k, jnp.sqrt(gamma), gamma <= tol2, fail)

    def min_norm(self, A, At, b):
        max_steps = _default_steps(self.max_steps, b)
        bnorm = _tree.norm(b)
        tol2 = _tolerance(self.rtol, self.atol, bnorm, floor=True) ** 2
        p0 = At(b)

        def cond(st):
            k, x, r, p, rr, fail = st
            return (k < max_steps) & (rr > tol2) & (fail == NONE)

        def body(st):
            k, x, r, p, rr, fail = st
            pp = _tree.vdot(p, p)
            alpha = rr / pp
            x_new = _tree.axpy(alpha, p, x)
            r_new = _tree.axpy(-alpha, A(p), r)
            rr_new = _tree.vdot(r_new, r_new)
            p_new = _tree.axpy(rr_new / rr, p, At(r_new))
            fail = _krylov_failure(pp, rr_new, x_new)
            ok = fail == NONE
            return (k + 1, _tree.where(ok, x_new, x), _tree.where(ok, r_new, r),
                    _tree.where(ok, p_new, p), jnp.where(ok, rr_new, rr), fail)

        init = (jnp.int32(0), _tree.zeros_like(p0), b, p0, bnorm**2, jnp.int32(NONE))
        k, x, _, _, rr, fail = jax.lax.while_loop(cond, body, init)
        return _finish(x, k, 1 + 2 * k, jnp.sqrt(rr), rr <= tol2, fail)


def _krylov_failure(denominator, new_norm2, x_new):
    return jnp.where(
        ~(denominator > 0), BREAKDOWN,
        jnp.where(jnp.isfinite(new_norm2) & _tree.all_finite(x_new), NONE, NONFINITE))


def _finish(x, steps, matvecs, residual, met_tolerance, fail):
    # A NaN that slipped into the residual or the value (e.g. an operator
    # that returned NaN on the first product) is reported, never returned.
    finite = jnp.isfinite(residual) & _tree.all_finite(x)
    fail = jnp.where(finite | (fail != NONE), fail, NONFINITE)
    x = _tree.where(finite, x, _tree.zeros_like(x))
    converged = met_tolerance & (fail == NONE)
    fail = jnp.where(converged | (fail != NONE), fail, MAX_STEPS)
    return _solution(x, steps, matvecs, residual, converged, fail)


def lstsq(matvec, b, *, rmatvec=None, form="least_squares", rtol=1e-5, atol=0.0, max_steps=None):
    """Functional form of :class:`LSTSQ` (default form: least squares)."""
    return LSTSQ(rtol=rtol, atol=atol, max_steps=max_steps)(matvec, b, rmatvec=rmatvec, form=form)


# ----------------------------------------------------------------------------- LiSSA


@_pytree_dataclass(static=("num_steps", "num_power_steps", "batch_size"))
class LiSSA(Solver):
    """Neumann-series / LiSSA iteration (Agarwal et al. 2017; Koh & Liang 2017).

    x_{k+1} = x_k + (b − (A + λI) x_k) / scale, x_0 = 0, for ``num_steps``
    steps; this is the truncated Neumann series
    (A + λI)⁻¹ b ≈ (1/scale) Σ_j (I − (A + λI)/scale)^j b. It converges iff every
    eigenvalue of (A + λI)/scale lies in (0, 2); negative curvature or a too
    small ``scale`` make it diverge, which is detected (‖r_k‖ > 1e4·‖b‖ or a
    non-finite value), the iterate frozen, and ``failure="diverged"`` set.

    Args (static: num_steps, num_power_steps, batch_size; the rest traced):
      num_steps: fixed iteration budget.
      scale: normaliser; ``None`` → 1.1 × a power-iteration estimate of the
        top eigenvalue of A + λI (``num_power_steps`` extra matvecs, started
        from a random vector drawn from ``key``).
      damping: λ ≥ 0 added *inside* LiSSA (on top of any damping in ``A``).
      rtol, atol: only decide the ``converged`` flag, from the final residual
        (one extra matvec with the full operator).
      batch_size, key: stochastic LiSSA. When ``batch_size`` is set, step k
        calls ``matvec(v, key=fold_in(key, k))`` and the operator must then
        use a random minibatch (``gifjax.influence`` builds such operators
        from its ``*args``).
    """

    num_steps: int = 1000
    scale: Any = None
    damping: Any = 0.0
    rtol: Any = 1e-3
    atol: Any = 0.0
    num_power_steps: int = 20
    batch_size: int | None = None
    key: Any = None

    def symmetric(self, A, b):
        _checks.check_nonnegative("solvers.LiSSA", "damping", self.damping)
        key = jax.random.key(0) if self.key is None else self.key
        full = lambda v: _tree.axpy(self.damping, v, A(v))
        extra = 1  # final residual
        if self.scale is None:
            scale = 1.1 * power_iteration(full, b, key=key, num_steps=self.num_power_steps)
            extra += self.num_power_steps
        else:
            scale = self.scale
        if self.batch_size is None:
            step_op = lambda v, k: full(v)
        else:
            step_op = lambda v, k: _tree.axpy(self.damping, v, A(v, key=jax.random.fold_in(key, k)))

        bnorm = _tree.norm(b)
        limit = 1e4 * bnorm

        def body(carry, k):
            x, fail = carry
            r = _tree.sub(b, step_op(x, k))
            rnorm = _tree.norm(r)
            x_new = _tree.axpy(1.0 / scale, r, x)
            bad = ~(rnorm <= limit) | ~_tree.all_finite(x_new)
            fail = jnp.where((fail == NONE) & bad, DIVERGED, fail)
            return (_tree.where(fail == NONE, x_new, x), fail), None

        (x, fail), _ = jax.lax.scan(body, (_tree.zeros_like(b), jnp.int32(NONE)),
                                    jnp.arange(self.num_steps))
        residual = _tree.norm(_tree.sub(b, full(x)))
        met = residual <= _tolerance(self.rtol, self.atol, bnorm)
        return _finish(x, self.num_steps, self.num_steps + extra, residual, met, fail)


def lissa(matvec, b, *, rmatvec=None, form="symmetric", **config) -> Solution:
    """Functional form of :class:`LiSSA` (``config``: its fields)."""
    return LiSSA(**config)(matvec, b, rmatvec=rmatvec, form=form)


def power_iteration(matvec, like, *, key, num_steps: int = 20):
    """Estimate the largest |eigenvalue| of a symmetric operator (‖A v_k‖).

    ``like`` fixes the pytree structure of the vectors; the start is a random
    normal vector from ``key``. Underestimates slightly; callers add margin.
    """
    flat, unravel = jax.flatten_util.ravel_pytree(like)
    v = unravel(jax.random.normal(key, flat.shape, flat.dtype))
    v = _tree.scale(1.0 / _tree.norm(v), v)

    def body(carry, _):
        v, _ = carry
        Av = matvec(v)
        lam = _tree.norm(Av)
        return (_tree.scale(1.0 / jnp.where(lam > 0, lam, 1.0), Av), lam), None

    (_, lam), _ = jax.lax.scan(body, (v, jnp.zeros((), flat.dtype)), None, length=num_steps)
    return lam


# ----------------------------------------------------------------------------- Richardson


@_pytree_dataclass(static=("max_steps",))
class Richardson(Solver):
    """The GIF paper's solver: Richardson/Landweber on normal equations.

    With N the normal operator (AᵀA for least squares, A² for symmetric,
    A Aᵀ for min-norm) and rhs its right-hand side (Aᵀb, Ab, b):

        x_0 = rhs / c,   x_{k+1} = rhs / c + x_k − N x_k / c,

    where the *normaliser* c (the paper's c²) starts at ``normalizer`` and
    grows by ``normalizer_step``, restarting from x = rhs / c, whenever the
    step ‖x_{k+1} − x_k‖ = ‖rhs − N x_k‖ / c grows (divergence). c cancels in
    the fixed point; the iteration converges iff λ_max(N)/c < 2, at a rate set
    by κ(N) = κ(A)² — which is why LSTSQ needs far fewer matvecs. Stops when
    the normal residual ‖rhs − N x‖ ≤ max(rtol·‖rhs‖, atol) or after
    ``max_steps`` steps. Two matvecs per step. Returns the iterate with the
    smallest normal residual seen, because in float32 rounding noise near the
    attainable accuracy (≈ eps·κ(A)²) makes the residual fluctuate, and a
    noise-triggered restart would otherwise throw the progress away.
    Reproduces the paper; do not expect it to reach tight tolerances.
    """

    normalizer: Any = 1.0
    normalizer_step: Any = 1.0
    rtol: Any = 1e-5
    atol: Any = 0.0
    max_steps: int = 1000

    def symmetric(self, A, b):
        return self._iterate(lambda v: A(A(v)), A(b), extra=1)

    def least_squares(self, A, At, b):
        return self._iterate(lambda v: At(A(v)), At(b), extra=1)

    def min_norm(self, A, At, b):
        sol = self._iterate(lambda v: A(At(v)), b, extra=0)
        return sol._replace(value=At(sol.value), num_matvecs=sol.num_matvecs + 1)

    def _iterate(self, N, rhs, *, extra):
        rhs_norm = _tree.norm(rhs)
        tol = _tolerance(self.rtol, self.atol, rhs_norm)
        N_rhs = N(rhs)  # lets a restart x = rhs / c reuse N x = N rhs / c

        def restart(c):
            return _tree.scale(1.0 / c, rhs), _tree.axpy(-1.0 / c, N_rhs, rhs)

        def cond(st):
            k, x, res, rnorm, c, fail, best, best_norm = st
            return (k < self.max_steps) & (best_norm > tol) & (fail == NONE)

        def body(st):
            k, x, res, rnorm, c, fail, best, best_norm = st
            x_new = _tree.axpy(1.0 / c, res, x)
            res_new = _tree.sub(rhs, N(x_new))
            rnorm_new = _tree.norm(res_new)
            grew = ~(rnorm_new <= rnorm)
            c_up = c + self.normalizer_step
            x_re, res_re = restart(c_up)
            x_new = _tree.where(grew, x_re, x_new)
            res_new = _tree.where(grew, res_re, res_new)
            rnorm_new = jnp.where(grew, _tree.norm(res_re), rnorm_new)
            fail = jnp.where(jnp.isfinite(rnorm_new), NONE, NONFINITE)
            ok = fail == NONE
            improved = ok & (rnorm_new < best_norm)
            return (k + 1, _tree.where(ok, x_new, x), _tree.where(ok, res_new, res),
                    jnp.where(ok, rnorm_new, rnorm), jnp.where(grew, c_up, c), fail,
                    _tree.where(improved, x_new, best), jnp.where(improved, rnorm_new, best_norm))

        c0 = jnp.asarray(self.normalizer, rhs_norm.dtype)
        x0, res0 = restart(c0)
        r0 = _tree.norm(res0)
        init = (jnp.int32(0), x0, res0, r0, c0, jnp.int32(NONE), x0, r0)
        k, _, _, _, _, fail, best, best_norm = jax.lax.while_loop(cond, body, init)
        return _finish(best, k, 2 * (k + 1) + extra, best_norm, best_norm <= tol, fail)


def richardson(matvec, b, *, rmatvec=None, form="least_squares", **config) -> Solution:
    """Functional form of :class:`Richardson` (default form: least squares)."""
    return Richardson(**config)(matvec, b, rmatvec=rmatvec, form=form)


# ----------------------------------------------------------------------------- names

SOLVERS = {"dense": Dense, "cg": CG, "lstsq": LSTSQ, "lissa": LiSSA, "richardson": Richardson}


def get_solver(solver, *, fn: str = "solvers.get_solver") -> Solver:
    """A solver value from a name in :data:`SOLVERS` (defaults) or a config value."""
    if isinstance(solver, Solver):
        return solver
    if isinstance(solver, str) and solver in SOLVERS:
        return SOLVERS[solver]()
    raise _checks.error(
        fn, "solver", repr(solver), f"one of {sorted(SOLVERS)} or a solver value such as CG(rtol=1e-8)",
        "pick a name from that list, or configure one, e.g. gifjax.solvers.LSTSQ(rtol=1e-8).")
