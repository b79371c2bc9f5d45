r"""Matrix-free linear solvers with one shape: ``init / compute / transpose``.

Every solver is a small frozen configuration value (a pytree: tolerances,
scales and damping are traced leaves, so sweeping them does not recompile;
step budgets are static). After lineax, a solve has three steps:

* ``state = solver.init(operator, form)`` builds what the solver reuses for
  every right-hand side (a materialised matrix, a low-rank factorisation, a
  preconditioner) — once, outside any ``vmap`` over queries;
* ``solver.compute(state, b) → Solution`` solves for one right-hand side
  (``jax.vmap`` it over many);
* ``solver.transpose(state)`` is the state of the transposed problem (GIF's
  influence scores need the adjoint of its least-squares update).

``operator`` is a :class:`gifjax.operators.LinearOperator`; ``form`` says
which problem is meant:

=================  =======================================  ==================
form               problem                                  answer
=================  =======================================  ==================
``"symmetric"``    A x = b, A symmetric (the IF / FIF case)  A⁻¹ b (A⁺ b)
``"least_squares"`` min_x ‖A x − b‖₂ (GIF's update)          A⁺ b
``"min_norm"``     min ‖x‖ s.t. A x = b (GIF's adjoint)      A⁺ b
=================  =======================================  ==================

The two non-symmetric forms are solved through one *normal system* with the
factor F (F = A for least squares, F = Aᵀ for minimum norm):

    least squares:  Fᵀ F x = Fᵀ b,           x the answer;
    minimum norm:   Fᵀ F z = b,  x = F z      (A Aᵀ z = b, x = Aᵀ z),

so GIF's forward and adjoint solves share one PSD operator, P C_λ² P. A
solver implements ``solve_symmetric`` and ``solve_normal`` (default: its
symmetric method on FᵀF); LSTSQ runs CGLS / Craig recurrences that apply F
and Fᵀ separately (‖F p‖², never pᵀFᵀFp), and Richardson iterates on the
normal equations, as the GIF paper's code does.

**Derivatives.** ``compute`` wraps the solve in ``jax.lax.custom_linear_solve``
(for the normal forms: of FᵀF), so ``jax.grad`` / ``jax.jvp`` of a solution
with respect to anything the operator or ``b`` depends on (parameters, data,
damping) is implicit differentiation — one more solve of the same system,
never an unrolled loop. The formulas are exact where the solver is, and
assume the operator's null space does not move (true for the masked
estimators with a nonsingular C_λ: their null space is the masked-out
coordinates).

The result is a :class:`Solution`: the value plus diagnostics — steps,
operator applications (``num_matvecs``; one matvec is one HVP in gifjax),
the residual norm the solver controls, ``converged`` and a ``failure`` code
(see :data:`FAILURES`). Solvers never raise on numerical trouble and never
hand back a silent NaN (``throw=True`` raises instead, outside ``jit``).

Tolerance solvers (CG, LSTSQ, Richardson) run in ``lax.while_loop``, so under
``jax.vmap`` each right-hand side stops on its own test; LiSSA runs a fixed
budget in ``lax.scan``.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from gifjax import solvers
    >>> A = jnp.array([[3.0, 1.0], [1.0, 2.0]])
    >>> sol = solvers.CG(rtol=1e-6)(lambda x: A @ x, jnp.array([1.0, 0.0]))
    >>> bool(sol.converged), sol.value.round(4)
    (True, Array([ 0.4, -0.2], dtype=float32))
    >>> jax.grad(lambda a: solvers.CG()(lambda x: a * x, jnp.ones(2)).value.sum())(2.0)
    Array(-0.5, dtype=float32, weak_type=True)
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from . import _checks, _tree
from ._conv_layout import canonicalize_convolutions
from .operators import FORMS, LinearOperator

__all__ = ["CG", "Dense", "FAILURES", "FORMS", "LSTSQ", "LiSSA", "Richardson", "SOLVERS", "Solution",
           "Solver", "SolverState", "cg", "dense", "get_solver", "lissa", "lstsq", "power_iteration",
           "richardson"]

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

_TRANSPOSED_FORM = {"symmetric": "symmetric", "least_squares": "min_norm", "min_norm": "least_squares"}


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


class SolverState(NamedTuple):
    """What ``init`` built: the operator (prepared for loops), the form, the solver's own data."""

    operator: LinearOperator
    form: str
    data: Any = None

    @property
    def factor(self) -> LinearOperator:
        """F of the normal system FᵀF (A for least squares, Aᵀ for minimum norm)."""
        return self.operator if self.form == "least_squares" else self.operator.T


def prepared(op: LinearOperator) -> LinearOperator:
    """(For loops outside a solver too: factorisations, eigensolvers.) The operator with its convolutions in XLA:CPU's fast layout, once, where it enters a loop."""
    if not op.conv_layout:
        return op
    wrap = canonicalize_convolutions
    sample = None if op.sample is None else (lambda key, size: prepared(op.sample(key, size)))
    return LinearOperator(wrap(op.matvec), None if op.rmatvec is None else wrap(op.rmatvec),
                          op.symmetric, op.psd, sample, op.damping, op.domain, op.codomain, op.name,
                          op.curvature, False, op.like)


def normal_operator(F: LinearOperator) -> LinearOperator:
    """FᵀF as a symmetric PSD operator (sampled products use one minibatch for F and Fᵀ)."""
    sample = None if F.sample is None else (lambda key, size: normal_operator(F.sample(key, size)))
    return LinearOperator(lambda v: F.transpose_matvec(F(v)), None, True, True, sample, F.damping,
                          F.domain, F.domain, F.name + "ᵀ" + F.name, F.curvature, F.conv_layout, F.like)


class Solver:
    """Base class: ``init / compute / transpose``, the call shape ``solver(matvec, b, ...)``.

    Subclasses implement ``solve_symmetric(state, b)`` and may override
    ``setup`` (shared work for ``init``), ``solve_normal(state, c)`` (FᵀF x =
    c; default: ``solve_symmetric`` on FᵀF), ``factor_hints`` (cheap F / Fᵀ
    applications, e.g. from factors) and ``configure`` (adjust the curvature
    spec, e.g. to factors' damping).
    """

    # ------------------------------------------------------------------ the protocol

    def init(self, operator: LinearOperator, form: str = "symmetric") -> SolverState:
        """Prepare ``operator`` for ``form`` and build the solver's shared data."""
        name = f"solvers.{type(self).__name__}"
        _checks.check_choice(name, "form", form, FORMS)
        if not isinstance(operator, LinearOperator):
            raise _checks.error(name, "operator", type(operator).__name__, "a gifjax.operators.LinearOperator",
                                "wrap the function: LinearOperator(matvec, rmatvec) (or call solver(matvec, b)).",
                                kind=TypeError)
        if form != "symmetric" and operator.rmatvec is None and not operator.symmetric:
            raise _checks.error(name, "rmatvec", None, f"the transpose operator for form={form!r}",
                                "pass rmatvec=lambda y: Aᵀ y (for a symmetric A, rmatvec=matvec).")
        operator = prepared(operator)
        return SolverState(operator, form, self.setup(operator, form))

    def compute(self, state: SolverState, b, *, throw: bool = False) -> Solution:
        """Solve for one right-hand side ``b`` (differentiable; ``vmap`` it over many)."""
        sol = _differentiable_solve(self, state, b)
        if throw:
            check_solution(f"solvers.{type(self).__name__}", sol)
        return sol

    def transpose(self, state: SolverState) -> SolverState:
        """The state of the transposed problem (least squares ↔ min norm; symmetric: itself)."""
        if state.form == "symmetric":
            return state
        return SolverState(state.operator.T, _TRANSPOSED_FORM[state.form], state.data)

    def __call__(self, matvec: Callable, b, *, rmatvec: Callable | None = None,
                 form: str = "symmetric", throw: bool = False) -> Solution:
        """``compute(init(LinearOperator(matvec, rmatvec), form), b)`` for a plain function."""
        symmetric = form == "symmetric"
        op = LinearOperator(matvec, None if symmetric else rmatvec, symmetric=symmetric, like=b)
        return self.compute(self.init(op, form), b, throw=throw)

    # ------------------------------------------------------------------ what subclasses provide

    def setup(self, operator: LinearOperator, form: str):
        return None

    def configure(self, spec, estimator, fn: str):
        """The curvature spec this solver needs for ``estimator`` (default: unchanged)."""
        return spec

    def solve_symmetric(self, state: SolverState, b) -> Solution:
        raise NotImplementedError

    def solve_normal(self, state: SolverState, c) -> Solution:
        """FᵀF x = c by the symmetric method on FᵀF; two matvecs per product."""
        normal = SolverState(normal_operator(state.factor), "symmetric", state.data)
        sol = self.solve_symmetric(normal, c)
        return sol._replace(num_matvecs=2 * sol.num_matvecs)

    def factor_hints(self, state: SolverState):
        """(z ↦ F z, b ↦ Fᵀ b) computed without the operator, or ``None`` each."""
        return None, None


# ----------------------------------------------------------------------------- the differentiable path


def _split(sol: Solution):
    return sol.value, sol._replace(value=None)


def _differentiable_solve(solver: Solver, state: SolverState, b) -> Solution:
    """The solve inside ``lax.custom_linear_solve``: implicit derivatives, no unrolled loops."""
    op = state.operator
    if state.form == "symmetric":
        solve = lambda _, rhs: _split(solver.solve_symmetric(state, rhs))
        x, aux = jax.lax.custom_linear_solve(op.matvec, b, solve, symmetric=True, has_aux=True)
        return aux._replace(value=x)
    F = state.factor
    N = normal_operator(F).matvec
    solve = lambda _, rhs: _split(solver.solve_normal(state, rhs))
    apply_F, apply_Ft = solver.factor_hints(state)
    if state.form == "least_squares":
        c, extra = _apply(F.transpose_matvec, apply_Ft, b)
        x, aux = jax.lax.custom_linear_solve(N, c, solve, symmetric=True, has_aux=True)
    else:
        z, aux = jax.lax.custom_linear_solve(N, b, solve, symmetric=True, has_aux=True)
        x, extra = _apply(F.matvec, apply_F, z)
    return aux._replace(value=x, num_matvecs=aux.num_matvecs + extra)


def _apply(fn: Callable, hint: Callable | None, v):
    """(fn(v), 1 matvec), or the solver's cheap ``hint(v)`` with fn's derivative (0 matvecs)."""
    if hint is None:
        return fn(v), 1
    pure, consts = jax.closure_convert(fn, v)
    return _value_with_derivative_of(pure, hint(v), consts, v), 0


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _value_with_derivative_of(pure, value, consts, v):
    return value


@_value_with_derivative_of.defjvp
def _value_with_derivative_of_jvp(pure, primals, tangents):
    value, consts, v = primals
    _, dconsts, dv = tangents
    _, out_dot = jax.jvp(lambda c, x: pure(x, *c), (consts, v), (dconsts, dv))
    return value, out_dot


def check_solution(fn: str, sol: Solution) -> Solution:
    """Raise ``RuntimeError`` unless every solve in ``sol`` converged (concrete values only)."""
    if not all(_checks.is_concrete(x) for x in (sol.converged, sol.failure)):
        raise _checks.error(fn, "throw", True, "throw=False inside jit / vmap / grad tracing",
                            "check `solution.converged` instead, or call eagerly to raise.")
    bad = ~np.asarray(sol.converged)
    if np.any(bad):
        codes = np.asarray(sol.failure).ravel()[np.asarray(bad).ravel()]
        names = sorted({FAILURES[int(c)] for c in codes})
        raise RuntimeError(f"gifjax.{fn}: the solve did not converge ({', '.join(names)}; "
                           f"residual norm {np.max(np.asarray(sol.residual_norm))!r}). Fix: raise max_steps, "
                           "add damping, or pick another solver (see 'How to choose a solver' in the README).")
    return sol


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


def finish(x, steps, matvecs, residual, met_tolerance, fail) -> Solution:
    """The :class:`Solution` for solver authors: flags a non-finite value, sets ``max_steps``."""
    # A NaN that slipped into the residual or the value (e.g. an operator
    # that returned NaN on the first product) is reported, never returned.
    finite = jnp.isfinite(residual) & _tree.all_finite(x)
    fail = jnp.where(finite | (fail != NONE), fail, NONFINITE)
    x = _tree.where(finite, x, _tree.zeros_like(x))
    converged = met_tolerance & (fail == NONE)
    fail = jnp.where(converged | (fail != NONE), fail, MAX_STEPS)
    return _solution(x, steps, matvecs, residual, converged, fail)


# ----------------------------------------------------------------------------- dense


@_tree.pytree_dataclass(static=("rcond",))
class Dense(Solver):
    """Materialise A column by column (n matvecs, in ``init``) and apply its pseudo-inverse.

    The answer is A⁺ b for all three forms, so masked (singular) operators
    such as P H P give exact zeros off the mask. Symmetric A uses an
    eigendecomposition of ½(A + Aᵀ), ~5–10× faster on CPU than an SVD; the
    normal forms use the SVD F = U Σ Vᵀ of their factor (x = V Σ⁻² Vᵀ Fᵀ b =
    V Σ⁻¹ Uᵀ b, the conditioning of F, not of FᵀF). Eigen/singular values
    below ``rcond``·max count as zero (default: n·eps, as ``lstsq``). The
    matrix and its factorisation are built once in ``init`` and shared by
    every right-hand side; cost n matvecs + O(n³). Use it as the reference
    on small problems.
    """

    rcond: float | None = None

    def setup(self, operator, form):
        A = operator if form == "symmetric" else SolverState(operator, form).factor
        flat, unravel = jax.flatten_util.ravel_pytree(operator.like)
        n = flat.shape[0]
        cols = jax.vmap(lambda e: jax.flatten_util.ravel_pytree(A(unravel(e)))[0])(jnp.eye(n, dtype=flat.dtype))
        mat = cols.T
        rcond = jnp.finfo(mat.dtype).eps * n if self.rcond is None else self.rcond
        if form == "symmetric":
            w, V = jnp.linalg.eigh(0.5 * (mat + mat.T))
            keep = jnp.abs(w) > rcond * jnp.max(jnp.abs(w))
            inv = jnp.where(keep, 1.0 / jnp.where(keep, w, 1.0), 0.0)
            return dict(mat=mat, V=V, inv=inv, unravel=unravel)
        U, sigma, Vt = jnp.linalg.svd(mat, full_matrices=False)
        keep = sigma > rcond * jnp.max(sigma)
        inv2 = jnp.where(keep, 1.0 / jnp.where(keep, sigma, 1.0) ** 2, 0.0)
        return dict(mat=mat, V=Vt.T, inv=inv2, unravel=unravel)

    def _answer(self, state, b, residual_of):
        d = state.data
        flat_b = jax.flatten_util.ravel_pytree(b)[0]
        mm = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
        x = mm(d["V"], d["inv"] * mm(d["V"].T, flat_b))
        residual = jnp.linalg.norm(flat_b - residual_of(d["mat"], x, mm))
        finite = jnp.all(jnp.isfinite(x))
        x = jnp.where(finite, x, 0.0)
        return _solution(d["unravel"](x), 1, flat_b.shape[0], residual, finite,
                         jnp.where(finite, NONE, NONFINITE))

    def solve_symmetric(self, state, b):
        return self._answer(state, b, lambda M, x, mm: mm(M, x))

    def solve_normal(self, state, c):
        return self._answer(state, c, lambda M, x, mm: mm(M.T, mm(M, x)))

    def factor_hints(self, state):
        d = state.data
        mm = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
        flat = lambda v: jax.flatten_util.ravel_pytree(v)[0]
        return (lambda z: d["unravel"](mm(d["mat"], flat(z))),
                lambda b: d["unravel"](mm(d["mat"].T, flat(b))))


def dense(matvec, b, *, rmatvec=None, form="symmetric", rcond=None) -> Solution:
    """Functional form of :class:`Dense`."""
    return Dense(rcond=rcond)(matvec, b, rmatvec=rmatvec, form=form)


# ----------------------------------------------------------------------------- CG


@_tree.pytree_dataclass(static=("max_steps",))
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

    def solve_symmetric(self, state, b):
        A = state.operator
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


@_tree.pytree_dataclass(static=("max_steps",))
class LSTSQ(Solver):
    """Least-squares Krylov solver: CGLS for min ‖Ax − b‖, Craig for min-norm.

    Both run on the normal system FᵀF x = c (module docstring) with F and Fᵀ
    applied separately, the curvature measured as ‖F p‖²:

    * least_squares (GIF's update ``min_x ‖H P x − g‖``): CGLS; stops when the
      normal-equation residual ‖Aᵀ(b − Ax)‖ ≤ max(rtol·‖Aᵀb‖, atol).
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

    def solve_symmetric(self, state, b):
        sol = self._cgls(state.operator, state.operator(b))
        return sol._replace(num_matvecs=sol.num_matvecs + 1)

    def solve_normal(self, state, c):
        return self._cgls(state.factor, c)

    def _cgls(self, F, c):
        max_steps = _default_steps(self.max_steps, c)
        gamma0 = _tree.vdot(c, c)
        tol2 = _tolerance(self.rtol, self.atol, jnp.sqrt(gamma0), floor=True) ** 2

        def cond(st):
            k, x, s, p, gamma, fail = st
            return (k < max_steps) & (gamma > tol2) & (fail == NONE)

        def body(st):
            k, x, s, p, gamma, fail = st
            q = F(p)
            qq = _tree.vdot(q, q)
            alpha = gamma / qq
            x_new = _tree.axpy(alpha, p, x)
            s_new = _tree.axpy(-alpha, F.transpose_matvec(q), s)
            gamma_new = _tree.vdot(s_new, s_new)
            p_new = _tree.axpy(gamma_new / gamma, p, s_new)
            fail = _krylov_failure(qq, gamma_new, x_new)
            ok = fail == NONE
            return (k + 1, _tree.where(ok, x_new, x), _tree.where(ok, s_new, s),
                    _tree.where(ok, p_new, p), jnp.where(ok, gamma_new, gamma), fail)

        init = (jnp.int32(0), _tree.zeros_like(c), c, c, gamma0, jnp.int32(NONE))
        k, x, _, _, gamma, fail = jax.lax.while_loop(cond, body, init)
        return finish(x, k, 2 * k, jnp.sqrt(gamma), gamma <= tol2, fail)


def _krylov_failure(denominator, new_norm2, x_new):
    return jnp.where(
        ~(denominator > 0), BREAKDOWN,
        jnp.where(jnp.isfinite(new_norm2) & _tree.all_finite(x_new), NONE, NONFINITE))


def lstsq(matvec, b, *, rmatvec=None, form="least_squares", rtol=1e-5, atol=0.0, max_steps=None):
    """Functional form of :class:`LSTSQ` (default form: least squares)."""
    return LSTSQ(rtol=rtol, atol=atol, max_steps=max_steps)(matvec, b, rmatvec=rmatvec, form=form)


# ----------------------------------------------------------------------------- LiSSA


@_tree.pytree_dataclass(static=("num_steps", "num_power_steps", "batch_size"))
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
        uses ``operator.sample(fold_in(key, k), batch_size)``, the operator on
        a random minibatch of its data (operators built by
        :class:`gifjax.operators.Curvature` from a data batch have one).
    """

    num_steps: int = 1000
    scale: Any = None
    damping: Any = 0.0
    rtol: Any = 1e-3
    atol: Any = 0.0
    num_power_steps: int = 20
    batch_size: int | None = None
    key: Any = None

    def solve_symmetric(self, state, b):
        name = "solvers.LiSSA"
        _checks.check_nonnegative(name, "damping", self.damping)
        if self.scale is not None and _checks.is_concrete(self.scale) and not np.all(np.asarray(self.scale) > 0):
            raise _checks.error(name, "scale", repr(self.scale), "a number > 0 (or None: estimated)",
                                "pass scale=None to estimate it by power iteration, or a positive number.")
        A = state.operator
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
            if A.sample is None:
                raise _checks.error(name, "batch_size", self.batch_size, "an operator with data to sample",
                                    "pass the curvature batch as *args (not closed over in loss_fn), "
                                    "or drop batch_size for deterministic LiSSA.")
            step_op = lambda v, k: _tree.axpy(self.damping, v,
                                              A.sample(jax.random.fold_in(key, k), self.batch_size)(v))

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
        return finish(x, self.num_steps, self.num_steps + extra, residual, met, fail)


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


@_tree.pytree_dataclass(static=("max_steps",))
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

    def solve_symmetric(self, state, b):
        A = state.operator
        return self._iterate(lambda v: A(A(v)), A(b), extra=1)

    def solve_normal(self, state, c):
        F = state.factor
        return self._iterate(lambda v: F.transpose_matvec(F(v)), c, extra=0)

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
        return finish(best, k, 2 * (k + 1) + extra, best_norm, best_norm <= tol, fail)


def richardson(matvec, b, *, rmatvec=None, form="least_squares", **config) -> Solution:
    """Functional form of :class:`Richardson` (default form: least squares)."""
    return Richardson(**config)(matvec, b, rmatvec=rmatvec, form=form)


# ----------------------------------------------------------------------------- names

SOLVERS = {"dense": Dense, "cg": CG, "lstsq": LSTSQ, "lissa": LiSSA, "richardson": Richardson}
#: What ``solver="auto"`` means for each form.
AUTO = {"symmetric": CG, "least_squares": LSTSQ, "min_norm": LSTSQ}


def get_solver(solver, *, form: str = "symmetric", fn: str = "solvers.get_solver") -> Solver:
    """A solver value from ``"auto"`` (by ``form``, see :data:`AUTO`), a name in :data:`SOLVERS`, or a value."""
    if isinstance(solver, Solver):
        return solver
    if isinstance(solver, str) and solver == "auto":
        return AUTO[form]()
    if isinstance(solver, str) and solver in SOLVERS:
        return SOLVERS[solver]()
    raise _checks.error(
        fn, "solver", repr(solver), f"one of {sorted(SOLVERS)}, 'auto', or a solver value such as CG(rtol=1e-8)",
        "pick a name from that list, or configure one, e.g. gifjax.solvers.LSTSQ(rtol=1e-8).")
