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

=================== ========================================  ==============
form                problem                                   answer
=================== ========================================  ==============
``"symmetric"``     A x = b, A symmetric (the IF / FIF case)  A⁻¹ b (A⁺ b)
``"least_squares"`` min_x ‖A x − b‖₂ (GIF's update)           A⁺ b
``"min_norm"``      min ‖x‖ s.t. A x = b (GIF's adjoint)      A⁺ b
=================== ========================================  ==============

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

import dataclasses
import functools
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from . import _checks, _repr, _tree
from ._conv_layout import canonicalize_convolutions
from .operators import FORMS, LinearOperator
from .preconditioners import get_preconditioner

__all__ = ["BlockCG", "CG", "DEFAULT_MAX_STEPS", "DEFAULT_RTOL", "Dense", "FAILURES", "FORMS", "Fallback",
           "HINTS", "LSMR", "LSTSQ", "LiSSA", "LinearOperator", "MINRES", "RICHARDSON_MODES", "Richardson", "SOLVERS",
           "STAGNATION_STEPS", "Solution", "Solver", "SolverState",
           "AUTO", "AUTO_FLOP_BUDGET", "AUTO_MIN_STEPS", "auto", "auto_steps",
           "backward_error", "cg", "default_rtol", "dense", "get_solver", "lissa", "lstsq", "minres", "power_iteration",
           "richardson", "warn_failures"]

#: Names of the ``Solution.failure`` codes, indexed by code.
FAILURES = (
    "none",          # 0: converged (or a fixed budget finished without trouble)
    "max_steps",     # 1: budget spent before the tolerance was met
    "indefinite",    # 2: CG met non-positive curvature pᵀAp ≤ 0 (A not SPD)
    "diverged",      # 3: the iteration grew (LiSSA scale too small, …)
    "nonfinite",     # 4: a NaN/Inf appeared; the last finite iterate is returned
    "breakdown",     # 5: a Krylov recurrence divided by zero (singular/inconsistent)
    "precision",     # 6: the tolerance is below what the working precision reached
    "approximate",   # 7: a low-rank answer whose right-hand side left the factors' subspace
    "inconsistent",  # 8: A is (numerically) singular and b has no exact solution: a least-squares x
)
# int32 scalars so loop carries keep one dtype with and without jax_enable_x64
(NONE, MAX_STEPS, INDEFINITE, DIVERGED, NONFINITE, BREAKDOWN, PRECISION,
 APPROXIMATE, INCONSISTENT) = map(np.int32, range(len(FAILURES)))

_TRANSPOSED_FORM = {"symmetric": "symmetric", "least_squares": "min_norm", "min_norm": "least_squares"}


@_repr.compact_repr(failure=_repr.failure_counts(FAILURES))
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
      backward_error: Paige–Saunders' normwise backward error η of ``value``
        for the system whose residual ``residual_norm`` measures (the normal
        system FᵀF for the least-squares form), see :func:`backward_error`:
        x solves (A + E) x = b + f exactly with ‖E‖ ≤ η‖A‖, ‖f‖ ≤ η‖b‖.
        Where ``failure`` is ``"inconsistent"`` it is ‖A r‖ / (‖A‖ ‖r‖)
        instead: x is a least-squares solution for a matrix near A.
        NaN only from a solver that does not estimate it.
    """

    value: Any
    num_steps: jax.Array
    num_matvecs: jax.Array
    residual_norm: jax.Array
    converged: jax.Array
    failure: jax.Array
    backward_error: Any = None

    def failure_names(self):
        """The failure code(s) as names (needs concrete values)."""
        codes = jnp.asarray(self.failure)
        if codes.ndim == 0:
            return FAILURES[int(codes)]
        return [FAILURES[int(c)] for c in codes.ravel()]


def _solution(value, steps, matvecs, residual, converged, failure, eta):
    return Solution(value, jnp.asarray(steps, jnp.int32), jnp.asarray(matvecs, jnp.int32),
                    residual, jnp.asarray(converged), jnp.asarray(failure, jnp.int32),
                    jnp.asarray(eta, jnp.result_type(residual)))


def backward_error(b, x, r, norm_estimate=0.0):
    r"""Paige–Saunders' normwise backward error η = ‖r‖ / (‖A‖ ‖x‖ + ‖b‖) of x for A x = b.

    η is the smallest ε for which x solves (A + E) x = b + f exactly with
    ‖E‖ ≤ ε‖A‖ and ‖f‖ ≤ ε‖b‖ (Rigal & Gaches 1967); Paige & Saunders (1975)
    stop MINRES on it ("test 1"). ``r = b − A x`` is the true residual;
    ‖A‖ is the larger of ``norm_estimate`` (a solver's estimate of ‖A‖₂ from
    below: the Rayleigh quotients of CG's search directions, the largest
    column ‖A v_k‖ of MINRES's Lanczos matrix as in MINRES-QLP, or the exact
    norm for :class:`Dense`) and ‖A x‖ / ‖x‖ = ‖b − r‖ / ‖x‖, so η is an
    upper bound of the true backward error: never optimistic. A certified
    ‖r‖ ≤ rtol·‖b‖ implies η ≤ rtol.

    Example:
      >>> import jax.numpy as jnp
      >>> from gifjax import solvers
      >>> A, b = jnp.diag(jnp.array([1.0, 100.0])), jnp.array([1.0, 1.0])
      >>> x = jnp.array([1.0, 0.0099])                        # r = (0, 0.01)
      >>> float(solvers.backward_error(b, x, b - A @ x, norm_estimate=100.0)).__round__(6)
      9.9e-05
    """
    xnorm = _tree.norm(x)
    applied = _tree.norm(_tree.sub(b, r))
    anorm = jnp.maximum(norm_estimate, jnp.where(xnorm > 0, applied / jnp.where(xnorm > 0, xnorm, 1.0), 0.0))
    rnorm, den = _tree.norm(r), anorm * xnorm + _tree.norm(b)
    return jnp.where(den > 0, rnorm / jnp.where(den > 0, den, 1.0), jnp.where(rnorm > 0, jnp.inf, 0.0))


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

    def compute_many(self, state: SolverState, B) -> Solution:
        """Solve for a batch of right-hand sides (leading axis Q): a batched :class:`Solution`.

        Default: ``jax.vmap(compute)``. Block solvers (:class:`BlockCG`)
        override it to share one Krylov space across the batch.
        """
        return jax.vmap(lambda b: self.compute(state, b))(B)

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

    def matvec_budget(self, form: str = "symmetric") -> int | None:
        """The most operator products one right-hand side can cost, or ``None`` (not bounded here).

        A worst case (no convergence before the step cap); used to project a
        long call's running time from its measured product rate.
        """
        return None


# ----------------------------------------------------------------------------- the differentiable path


def _split(sol: Solution):
    return sol.value, sol._replace(value=None)


def _differentiable_solve(solver: Solver, state: SolverState, b, *, many: bool = False) -> Solution:
    """The solve inside ``lax.custom_linear_solve``: implicit derivatives, no unrolled loops.

    ``many=True``: ``b`` is a batch (leading axis) solved together by the
    solver's ``solve_*_many`` methods; the operators act row by row.
    """
    lift = jax.vmap if many else (lambda f: f)
    symmetric_solve, normal_solve = ((solver.solve_symmetric_many, solver.solve_normal_many) if many
                                     else (solver.solve_symmetric, solver.solve_normal))
    op = state.operator
    if state.form == "symmetric":
        x, aux = _symmetric_linear_solve(lift(op.matvec), b, lambda rhs: _split(symmetric_solve(state, rhs)))
        return aux._replace(value=x)
    F = state.factor
    N = lift(normal_operator(F).matvec)
    solve = lambda rhs: _split(normal_solve(state, rhs))
    apply_F, apply_Ft = (None if h is None else lift(h) for h in solver.factor_hints(state))
    if state.form == "least_squares":
        c, extra = _apply(lift(F.transpose_matvec), apply_Ft, b)
        x, aux = _symmetric_linear_solve(N, c, solve)
    else:
        z, aux = _symmetric_linear_solve(N, b, solve)
        x, extra = _apply(lift(F.matvec), apply_F, z)
    return aux._replace(value=x, num_matvecs=aux.num_matvecs + extra)


def _symmetric_linear_solve(matvec: Callable, b, solve: Callable):
    """``lax.custom_linear_solve`` for a symmetric ``matvec``, tracing ``solve(b) → (x, aux)`` once.

    For a symmetric operator JAX traces ``solve`` a second time as its own
    transpose; a Krylov loop is the bulk of a program's tracing time, so it is
    traced here once (``closure_convert``) and both uses replay that jaxpr.
    """
    once, consts = jax.closure_convert(solve, b)
    replay = lambda _, rhs: once(rhs, *consts)
    return jax.lax.custom_linear_solve(matvec, b, replay, symmetric=True, has_aux=True)


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
    bad = ~_fetch(sol.converged).ravel()
    if np.any(bad):
        codes = _fetch(sol.failure).ravel()[bad]
        names = sorted({FAILURES[int(c)] for c in codes})
        raise RuntimeError(f"gifjax.{fn}: the solve did not converge ({', '.join(names)}; "
                           f"residual norm {np.max(_fetch(sol.residual_norm))!r}). Fix: raise max_steps, "
                           "add damping, or pick another solver (see 'How to choose a solver' in the README).")
    return sol


#: What to do about each failure cause (:func:`warn_failures` names those that occurred).
HINTS = {
    "max_steps": "raise max_steps or use a preconditioner (gifjax.preconditioners)",
    "indefinite": "add damping (gifjax.AutoDamping), use solver='minres' / 'lsmr', or curvature=gifjax.GGN(...)",
    "diverged": "raise LiSSA's scale (or scale=None) or add damping",
    "nonfinite": "check those examples and the parameters for NaN/Inf",
    "breakdown": "add damping, or use solver='lsmr' for a singular system",
    "precision": "loosen rtol (see solvers.DEFAULT_RTOL) or compute in float64",
    "approximate": "raise the rank, or measure lowrank.approximation_error on a few queries",
    "inconsistent": ("the operator is singular at this tolerance and b has a part in its null space, so the "
                     "values are least-squares solutions, not A⁻¹b: add damping for a unique answer"),
}


def _fetch(x) -> np.ndarray:
    """``x`` as NumPy; a global array spanning other processes' devices (multi-host
    ``gifjax.parallel`` results) is gathered first, a collective that every process
    reaches because they all run the same program (``np.asarray`` refuses such arrays)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def warn_failures(fn: str, sol: Solution, note: str = "") -> None:
    """One ``RuntimeWarning`` naming how many solves failed, why, and what to do (outside ``jit`` only).

    ``note``: a sentence of the caller's added to the warning (e.g. the
    budget ``solver="auto"`` kept, see :func:`auto`).
    """
    if not all(_checks.is_concrete(x) for x in (sol.converged, sol.failure)):
        return
    bad = ~_fetch(sol.converged).ravel()
    if not bad.any():
        return
    codes = _fetch(sol.failure).ravel()[bad]
    names = [FAILURES[c] for c in sorted(set(codes.tolist()))]
    why = ", ".join(f"{name}: {int((codes == FAILURES.index(name)).sum())}" for name in names)
    fix = "; ".join(HINTS[name] for name in names if name in HINTS)
    warnings.warn(f"gifjax.{fn}: {int(bad.sum())} of {bad.size} solves did not converge ({why}); their "
                  f"values are not to be trusted. Fix: {fix}.{' Note: ' + note + '.' if note else ''} "
                  "return_info=True gives per-query diagnostics, throw=True raises.", RuntimeWarning, stacklevel=3)


# Krylov recurrences cannot resolve residuals below ~eps·‖rhs‖; iterating past that
# floor lets rounding grow components along A's null space and the iterate diverges
# (seen with CGLS on GIF's singular H P in float32). A tolerance below it is
# reported as unreachable (failure "precision"), never as met.
PRECISION_FLOOR = 16

#: Default relative tolerance (``rtol=None``) by the residual a solver certifies
#: and the bytes of the working dtype. Each is reachable in that precision on
#: moderately conditioned problems (κ ≲ 10³ in float32) and tight enough that
#: the true residual it certifies keeps relative errors ≤ κ·rtol: a symmetric
#: system's residual ‖b − A x‖ bottoms out near eps·κ·‖b‖ (float32: 1e-4), the
#: normal residual ‖Fᵀ(b − F x)‖ of GIF's least-squares forms reaches 1e-5.
DEFAULT_RTOL = {"symmetric": {8: 1e-10, 4: 1e-4, 2: 1e-2},
                "normal": {8: 1e-10, 4: 1e-5, 2: 1e-2}}


def _least_squares_rtol(rtol, dtype):
    """MINRES stops as ``"inconsistent"`` (Paige–Saunders test 2) once ‖A r‖ ≤ this·‖A‖·‖r‖.

    At least √eps: on an inconsistent singular system the iterate diverges along A's null space
    soon after the residual stagnates (κ = 1e3, float64: ‖A r‖ / (‖A‖ ‖r‖) reached 4e-9, then ‖x‖
    grew to 1e13), so a least-squares answer is certified to √eps at best.
    """
    return jnp.maximum(rtol, jnp.sqrt(jnp.finfo(dtype).eps))


#: ``BlockCG(negative_curvature="continue")`` stops a block as ``"indefinite"`` when, after
#: negative curvature was seen, its worst relative residual has not halved in this many steps.
STAGNATION_STEPS = 50


#: Default step cap of the Krylov solvers (``max_steps=None``). Finite precision
#: needs more than dim b steps on ill-conditioned problems, and a large model far
#: fewer than dim b to converge or not at all: a fixed, documented budget.
DEFAULT_MAX_STEPS = 1000


def default_rtol(dtype, *, normal: bool = False) -> float:
    """The relative tolerance ``rtol=None`` means for vectors of ``dtype`` (see :data:`DEFAULT_RTOL`)."""
    return DEFAULT_RTOL["normal" if normal else "symmetric"].get(jnp.dtype(dtype).itemsize, 1e-5)


def _tolerance(rtol, atol, rhs_norm, *, normal: bool = False):
    rtol = default_rtol(rhs_norm.dtype, normal=normal) if rtol is None else rtol
    return jnp.maximum(rtol * rhs_norm, atol)


def _floor(rhs_norm):
    return PRECISION_FLOOR * jnp.finfo(rhs_norm.dtype).eps * rhs_norm


def _default_steps(max_steps):
    """``max_steps``, or :data:`DEFAULT_MAX_STEPS` when it is ``None``."""
    return DEFAULT_MAX_STEPS if max_steps is None else max_steps


def _identity(v):
    return v


def _refined(inner, residual, b, tol, max_steps, restarts, apply=None):
    """Iterative refinement on the true residual, shared by the Krylov solvers.

    ``inner(r, tol, steps_left) → (dx, steps, matvecs, failure, norm_estimate)``
    solves A dx ≈ r; ``residual(x) → (b − A x, matvecs)`` is recomputed after
    every inner solve, so ``converged`` always certifies ‖b − A x‖ ≤ tol on
    the *true* residual, never on a recurrence that drifted. Up to
    ``restarts`` further inner solves continue from that residual. A
    tolerance below the precision floor, or one the refinements cannot
    reach, ends with failure ``"precision"``. An inner solve that stopped as
    ``"inconsistent"`` (MINRES's Paige–Saunders test 2) is checked on the
    true residual with one more product ``apply`` (A itself): it stays so
    only if ‖A r‖ ≤ rtol·‖A‖·‖r‖, else it is ``"precision"``.
    """
    bnorm = _tree.norm(b)

    def cond(st):
        rounds, x, r, rnorm, k, m, fail, anorm = st
        return (rounds <= restarts) & (rnorm > tol) & (k < max_steps) & (fail == NONE)

    def body(st):
        rounds, x, r, rnorm, k, m, fail, anorm = st
        dx, dk, dm, f, dnorm = inner(r, tol, max_steps - k)
        x_new = _tree.add(x, dx)
        r_new, rm = residual(x_new)
        rnorm_new = _tree.norm(r_new)
        finite = jnp.isfinite(rnorm_new) & _tree.all_finite(x_new)
        # the first solve always counts (CG's residual may grow while its error shrinks);
        # a refinement that does not lower the true residual means stagnation
        better = finite & ((rounds == 0) | (rnorm_new <= rnorm))
        spent = k + dk >= max_steps
        f = jnp.where(better | (f != NONE), f, jnp.where(finite, jnp.where(spent, NONE, PRECISION), NONFINITE))
        return (rounds + 1, _tree.where(better, x_new, x), _tree.where(better, r_new, r),
                jnp.where(better, rnorm_new, rnorm), k + dk, m + dm + rm, f,
                jnp.maximum(anorm, jnp.where(jnp.isfinite(dnorm), dnorm, 0.0)))

    zero = jnp.zeros((), bnorm.dtype)
    init = (jnp.int32(0), _tree.zeros_like(b), b, bnorm, jnp.int32(0), jnp.int32(0), jnp.int32(NONE), zero)
    rounds, x, r, rnorm, k, m, fail, anorm = jax.lax.while_loop(cond, body, init)
    met = rnorm <= tol
    stalled = (fail == NONE) & ~met & ((rounds > restarts) | (tol < _floor(bnorm)))
    fail = jnp.where(stalled, PRECISION, jnp.where(met & (fail == INCONSISTENT), NONE, fail))
    eta = backward_error(b, x, r, anorm)
    if apply is not None:
        anorm = jnp.maximum(anorm, _tree.norm(_tree.sub(b, r)) / _tree.divisor(_tree.norm(x)))

        def least_squares_error():
            return _tree.norm(apply(r)) / _tree.divisor(anorm * rnorm), 1

        inconsistent = fail == INCONSISTENT
        eta2, used = jax.lax.cond(inconsistent, least_squares_error, lambda: (eta, 0))
        verified = eta2 <= _least_squares_rtol(tol / _tree.divisor(bnorm), eta2.dtype)
        fail = jnp.where(inconsistent & ~verified, PRECISION, fail)
        eta, m = jnp.where(inconsistent & verified, eta2, eta), m + used
    return finish(x, k, m, rnorm, met, fail, eta)


def finish(x, steps, matvecs, residual, met_tolerance, fail, eta=jnp.nan) -> Solution:
    """The :class:`Solution` for solver authors: flags a non-finite value, sets ``max_steps``.

    ``eta``: the answer's :func:`backward_error` (NaN: not estimated).
    """
    # A NaN that slipped into the residual or the value (e.g. an operator
    # that returned NaN on the first product) is reported, never returned.
    finite = jnp.isfinite(residual) & _tree.all_finite(x)
    fail = jnp.where(finite | (fail != NONE), fail, NONFINITE)
    x = _tree.where(finite, x, _tree.zeros_like(x))
    converged = met_tolerance & (fail == NONE)
    fail = jnp.where(converged | (fail != NONE), fail, MAX_STEPS)
    return _solution(x, steps, matvecs, residual, converged, fail, jnp.where(finite, eta, 1.0))  # η(0) = 1


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
        if self.rcond is not None and not (0 <= float(self.rcond) < 1):
            raise _checks.error("solvers.Dense", "rcond", repr(self.rcond), "None or a number in [0, 1)",
                                "pass rcond=None (n·eps) or a relative cut-off such as 1e-10.")
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
            return dict(mat=mat, V=V, inv=inv, unravel=unravel, norm=jnp.max(jnp.abs(w)))
        U, sigma, Vt = jnp.linalg.svd(mat, full_matrices=False)
        keep = sigma > rcond * jnp.max(sigma)
        inv2 = jnp.where(keep, 1.0 / jnp.where(keep, sigma, 1.0) ** 2, 0.0)
        return dict(mat=mat, V=Vt.T, inv=inv2, unravel=unravel, norm=jnp.max(sigma) ** 2)  # ‖FᵀF‖₂

    def _answer(self, state, b, residual_of):
        d = state.data
        flat_b = jax.flatten_util.ravel_pytree(b)[0]
        mm = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
        x = mm(d["V"], d["inv"] * mm(d["V"].T, flat_b))
        r = flat_b - residual_of(d["mat"], x, mm)
        finite = jnp.all(jnp.isfinite(x))
        x = jnp.where(finite, x, 0.0)
        eta = jnp.where(finite, backward_error(flat_b, x, r, d["norm"]), 1.0)
        return _solution(d["unravel"](x), 1, flat_b.shape[0], jnp.linalg.norm(r), finite,
                         jnp.where(finite, NONE, NONFINITE), eta)

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


class _Krylov(Solver):
    """Shared by CG, MINRES, LSMR, LSTSQ and BlockCG.

    The preconditioner is built in ``init``; answers are refined and certified
    on the true residual.

    A subclass provides ``_inner(A, Minv, r, tol, steps) → (dx, steps, matvecs,
    failure)`` for a symmetric A; the normal forms run it on FᵀF with the
    preconditioner built from FᵀF.
    """

    def setup(self, operator, form):
        pre = get_preconditioner(self.preconditioner, fn=f"solvers.{type(self).__name__}")
        if pre is None:
            return None
        target = operator if form == "symmetric" else normal_operator(SolverState(operator, form).factor)
        return pre.build(target)

    def solve_symmetric(self, state, b):
        return self._solve(state.operator, state.data, b)

    def matvec_budget(self, form="symmetric"):
        # the step cap is shared by the refinement rounds, each of which adds one residual product
        per_step = 1 if form == "symmetric" else 2
        return per_step * (_default_steps(self.max_steps) + self.restarts + 2)

    def solve_normal(self, state, c):
        sol = self._solve(normal_operator(state.factor), state.data, c, normal=True)
        return sol._replace(num_matvecs=2 * sol.num_matvecs)

    def _solve(self, A, Minv, b, *, normal=False, **inner_options):
        A, Minv, b, inner_options, unravel = _flat_problem(A, Minv, b, inner_options)
        Minv = _identity if Minv is None else Minv
        bnorm = _tree.norm(b)
        tol = _tolerance(self.rtol, self.atol, bnorm, normal=normal)
        # solve for b / ‖b‖ (A is linear): the recurrences' squared norms can neither overflow
        # nor underflow whatever b's scale
        s = _tree.divisor(bnorm)
        unit = _tree.scale(1 / s, b)
        inner = lambda r, tol, steps: self._inner(A, Minv, r, tol, steps, **inner_options)
        residual = lambda x: (_tree.sub(unit, A(x)), 1)
        sol = _refined(inner, residual, unit, tol / s, _default_steps(self.max_steps), self.restarts,
                       apply=A if self._least_squares_test(Minv) else None)
        return finish(unravel(_tree.scale(s, sol.value)), sol.num_steps, sol.num_matvecs, s * sol.residual_norm,
                      sol.converged, sol.failure, sol.backward_error)

    def _least_squares_test(self, Minv):
        """Whether ``_inner`` may stop as ``"inconsistent"`` (then checked with one more product)."""
        return False


def _flat_problem(A, Minv, b, inner_options):
    """The same problem on one flat vector when ``b`` is a pytree of several leaves of one dtype.

    Every vector operation of a Krylov loop acts leaf by leaf, so a model with
    L parameter arrays puts L copies of each into the compiled loop; on one
    vector it is one (a 4-leaf MLP's solve program compiles in two thirds of
    the time, a 100-leaf network's far less). Only the products see the
    pytree (``A``, ``Minv`` and a ``curvature`` option are wrapped). Mixed
    dtypes are left as they are: one vector would promote them.
    """
    leaves = jax.tree_util.tree_leaves(b)
    if len(leaves) < 2 or len({jnp.result_type(a) for a in leaves}) > 1:
        return A, Minv, b, inner_options, lambda x: x
    flat_b, unravel = jax.flatten_util.ravel_pytree(b)
    ravel = lambda tree: jax.flatten_util.ravel_pytree(tree)[0]  # noqa: E731
    on_flat = lambda f: None if f is None else (lambda v: ravel(f(unravel(v))))  # noqa: E731
    options = dict(inner_options)
    if options.get("curvature") is not None:
        curvature = options["curvature"]
        options["curvature"] = lambda p: (lambda out: (ravel(out[0]), out[1]))(curvature(unravel(p)))
    return on_flat(A), on_flat(Minv), flat_b, options, unravel


@_tree.pytree_dataclass(static=("max_steps", "restarts"))
class CG(_Krylov):
    """(Preconditioned) conjugate gradients for symmetric positive-definite A x = b.

    Stops when the true residual ‖b − A x‖ ≤ max(rtol·‖b‖, atol), checked
    after the recurrence says so (and refined from the true residual up to
    ``restarts`` times if rounding made them differ), or after ``max_steps``
    steps (default :data:`DEFAULT_MAX_STEPS`). ``rtol=None`` picks by dtype
    (:data:`DEFAULT_RTOL`). ``preconditioner`` (a value from
    :mod:`gifjax.preconditioners`, built once in ``init``) must approximate
    A⁻¹. If pᵀAp ≤ 0 appears, A is not positive definite on the Krylov space:
    the solve stops with ``failure="indefinite"`` and the last iterate — use
    :class:`MINRES` for indefinite A. Least-squares and min-norm forms run
    CG on the normal equations (κ squared).
    """

    rtol: Any = None
    atol: Any = 0.0
    max_steps: int | None = None
    preconditioner: Any = None
    restarts: int = 2

    def _inner(self, A, Minv, b, tol, max_steps, curvature=None, nonpositive=INDEFINITE):
        """PCG; ``curvature(p) → (A p, pᵀAp)`` lets CGLS measure pᵀFᵀFp as ‖F p‖²."""
        tol2 = tol**2
        curvature = curvature or (lambda p: (lambda Ap: (Ap, _tree.vdot(p, Ap)))(A(p)))

        def cond(s):
            k, x, r, p, rz, rr, fail, anorm = s
            return (k < max_steps) & (rr > tol2) & (fail == NONE)

        def body(s):
            k, x, r, p, rz, rr, fail, anorm = s
            Ap, pAp = curvature(p)
            # |pᵀAp| / pᵀp ≤ ‖A‖₂: the largest Rayleigh quotient seen estimates ‖A‖ for backward_error
            anorm = jnp.maximum(anorm, jnp.abs(pAp) / _tree.divisor(_tree.vdot(p, p)))
            alpha = rz / pAp
            x_new = _tree.axpy(alpha, p, x)
            r_new = _tree.axpy(-alpha, Ap, r)
            z = Minv(r_new)
            rz_new, rr_new = _tree.vdot(r_new, z), _tree.vdot(r_new, r_new)
            p_new = _tree.axpy(rz_new / rz, p, z)
            fail = jnp.where(~(pAp > 0), nonpositive,
                             jnp.where(jnp.isfinite(rr_new) & _tree.all_finite(x_new), NONE, NONFINITE))
            ok = fail == NONE
            return (k + 1, _tree.where(ok, x_new, x), _tree.where(ok, r_new, r), _tree.where(ok, p_new, p),
                    jnp.where(ok, rz_new, rz), jnp.where(ok, rr_new, rr), fail, anorm)

        z = Minv(b)
        rr = _tree.vdot(b, b)
        init = (jnp.int32(0), _tree.zeros_like(b), b, z, _tree.vdot(b, z), rr, jnp.int32(NONE), jnp.zeros_like(rr))
        k, x, _, _, _, _, fail, anorm = jax.lax.while_loop(cond, body, init)
        return x, k, k, fail, anorm


def cg(matvec, b, *, rmatvec=None, form="symmetric", rtol=None, atol=0.0, max_steps=None):
    """Functional form of :class:`CG`."""
    return CG(rtol=rtol, atol=atol, max_steps=max_steps)(matvec, b, rmatvec=rmatvec, form=form)


# ----------------------------------------------------------------------------- MINRES / LSMR


@_tree.pytree_dataclass(static=("max_steps", "restarts"))
class MINRES(_Krylov):
    r"""(Preconditioned) MINRES for symmetric — possibly indefinite or singular — A x = b.

    Paige & Saunders (1975): Lanczos on M⁻¹A with Givens rotations, x_k
    minimising ‖b − A x‖_{M⁻¹} over the Krylov space, one matvec per step,
    no breakdown on negative curvature (the normal case for the Hessian of a
    trained network). For a consistent singular system started at 0 it
    returns the minimum-norm solution on the Krylov space (e.g. (P H P)⁺ b
    for FIF). Stopping, tolerances, ``preconditioner`` (SPD, built once in
    ``init``) and ``restarts`` are as in :class:`CG`; the answer is certified
    on the true residual. The normal forms (GIF) run MINRES on FᵀF, which is
    LSMR (Fong & Saunders 2011: LSMR ≡ MINRES on AᵀA x = Aᵀb).

    Without a preconditioner it also applies Paige & Saunders' test 2: when
    ‖A r‖ ≤ max(rtol, √eps)·‖A‖·‖r‖ while ‖r‖ is above its tolerance, b
    has a part in A's (numerical) null space and no x solves A x = b; the
    solve stops with ``failure="inconsistent"`` (checked on the true residual
    with one more product) and a least-squares solution, instead of running
    to ``max_steps`` while its iterate drifts along the null space.
    ``Solution.backward_error`` is then ‖A r‖ / (‖A‖ ‖r‖).

    Example:
      >>> import jax.numpy as jnp
      >>> from gifjax import solvers
      >>> A = jnp.diag(jnp.array([0.0, 1.0, 2.0]))      # singular, and b = 1 is not in its range
      >>> sol = solvers.MINRES()(lambda v: A @ v, jnp.ones(3))
      >>> sol.failure_names(), (A @ sol.value).round(3)     # A x: b's projection onto A's range
      ('inconsistent', Array([0., 1., 1.], dtype=float32))
    """

    rtol: Any = None
    atol: Any = 0.0
    max_steps: int | None = None
    preconditioner: Any = None
    restarts: int = 2

    def _least_squares_test(self, Minv):
        return Minv is _identity  # the Lanczos estimates below are of A itself only without a preconditioner

    def _inner(self, A, Minv, b, tol, max_steps):
        plain = Minv is _identity
        y = Minv(b)
        beta1 = jnp.sqrt(jnp.maximum(_tree.vdot(b, y), 0.0))
        # phibar estimates ‖r‖_{M⁻¹}; stop on the relative reduction the 2-norm tolerance asks for
        rel = tol / jnp.maximum(_tree.norm(b), jnp.finfo(beta1.dtype).tiny)
        target = rel * beta1
        # test 2 asks for the whole solve's rtol, not this round's rel (a refinement round starts from a
        # residual near tol, where rel is near 1): ``_solve`` solves for b / ‖b‖, so that rtol is tol
        least_squares_rtol = _least_squares_rtol(tol, beta1.dtype)
        zero = _tree.zeros_like(b)
        dt = beta1.dtype
        eps = jnp.finfo(dt).eps

        def cond(s):
            k, fail, phibar = s[0], s[1], s[12]
            return (k < max_steps) & (phibar > target) & (fail == NONE)

        def body(s):
            k, fail, x, r1, r2, y, w, w2, beta, oldb, dbar, epsln, phibar, cs, sn, tnorm2 = s
            v = _tree.scale(1.0 / beta, y)
            y = A(v)
            y = _tree.axpy(-jnp.where(k > 0, beta / jnp.where(oldb > 0, oldb, 1.0), 0.0), r1, y)
            alfa = _tree.vdot(v, y)
            y = _tree.axpy(-alfa / beta, r2, y)
            r1, r2 = r2, y
            y = Minv(r2)
            oldb, beta2 = beta, _tree.vdot(r2, y)
            beta = jnp.sqrt(jnp.maximum(beta2, 0.0))
            # ‖A‖ ≥ ‖A v_k‖ = ‖T e_k‖, the largest column of the Lanczos matrix so far (as MINRES-QLP; the
            # first β is ‖b‖, not an entry of T); Paige–Saunders' ‖T_k‖_F can exceed ‖A‖_F
            tnorm2 = jnp.maximum(tnorm2, alfa**2 + jnp.where(k > 0, oldb**2, 0.0) + beta**2)
            oldeps = epsln
            delta = cs * dbar + sn * alfa
            gbar = sn * dbar - cs * alfa
            epsln = sn * beta
            dbar = -cs * beta
            root = jnp.hypot(gbar, dbar)  # ‖A r_{k-1}‖ / ‖r_{k-1}‖
            gamma = jnp.maximum(jnp.hypot(gbar, beta), eps)
            cs, sn = gbar / gamma, beta / gamma
            phi, phibar_new = cs * phibar, sn * phibar
            w1, w2 = w2, w
            w = _tree.scale(1.0 / gamma, _tree.axpy(-delta, w2, _tree.axpy(-oldeps, w1, v)))
            x_new = _tree.axpy(phi, w, x)
            # Paige–Saunders test 2: ‖A r‖ ≤ rtol·‖A‖·‖r‖ while ‖r‖ is above its tolerance means b has
            # no exact solution (A singular at this tolerance) and the last iterate x is a least-squares
            # solution (root is about its residual; the step past it only adds rounding in A's null space)
            stuck = plain & (root <= least_squares_rtol * jnp.sqrt(tnorm2))
            fail = jnp.where(beta2 < 0, BREAKDOWN,   # the preconditioner is not positive definite
                             jnp.where(stuck, INCONSISTENT,
                                       jnp.where(jnp.isfinite(phibar_new) & _tree.all_finite(x_new), NONE,
                                                 NONFINITE)))
            ok = fail == NONE
            # beta = 0: the Krylov space is invariant and x_new solves the system (phibar = 0)
            return (k + 1, fail, _tree.where(ok, x_new, x), r1, r2, y, w, w2, jnp.where(beta > 0, beta, 1.0),
                    oldb, dbar, epsln, jnp.where(ok, phibar_new, 0.0), cs, sn, tnorm2)

        init = (jnp.int32(0), jnp.int32(NONE), zero, b, b, y, zero, zero,
                jnp.where(beta1 > 0, beta1, 1.0), jnp.zeros((), dt), jnp.zeros((), dt), jnp.zeros((), dt),
                beta1, -jnp.ones((), dt), jnp.zeros((), dt), jnp.zeros((), dt))
        out = jax.lax.while_loop(cond, body, init)
        anorm = jnp.sqrt(out[-1]) if plain else jnp.zeros((), dt)
        return out[2], out[0], out[0], out[1], anorm


class _NormalEquations:
    """For solvers that only solve normal systems: a symmetric A gets min ‖A x − b‖ via A² x = A b."""

    def setup(self, operator, form):
        return super().setup(operator, "least_squares" if form == "symmetric" else form)

    def solve_symmetric(self, state, b):
        A = state.operator
        sol = self.solve_normal(SolverState(A, "least_squares", state.data), A(b))
        return sol._replace(num_matvecs=sol.num_matvecs + 1)

    def matvec_budget(self, form="symmetric"):
        return super().matvec_budget("least_squares") + (form == "symmetric")


@_tree.pytree_dataclass(static=("max_steps", "restarts"))
class LSMR(_NormalEquations, MINRES):
    r"""LSMR: MINRES on the normal equations, for least squares and minimum norm.

    The answer is A⁺ b for all three forms: GIF's update min ‖H P x − g‖ and
    its min-norm adjoint go through the shared normal system FᵀF (module
    docstring), and a symmetric — perhaps indefinite or singular,
    inconsistent — A gets min ‖A x − b‖ via A² x = A b. The residual it
    controls and certifies is the normal one, ‖Fᵀ(b − F x)‖ ≤ rtol·‖Fᵀb‖.
    Fields as in :class:`MINRES` (the preconditioner approximates (FᵀF)⁻¹ and
    is built from FᵀF). Two matvecs per step.
    """


def minres(matvec, b, *, rmatvec=None, form="symmetric", rtol=None, atol=0.0, max_steps=None):
    """Functional form of :class:`MINRES`."""
    return MINRES(rtol=rtol, atol=atol, max_steps=max_steps)(matvec, b, rmatvec=rmatvec, form=form)


# ----------------------------------------------------------------------------- block CG


def _rows(B):
    """A batch of pytrees (leading axis Q) as flat rows [Q, n], and ``unravel`` for one row."""
    unravel = jax.flatten_util.ravel_pytree(jax.tree_util.tree_map(lambda a: a[0], B))[1]
    return jax.vmap(lambda t: jax.flatten_util.ravel_pytree(t)[0])(B), unravel


def _as_batch_of_one(fn, b):
    """``fn`` of a batch, applied to the single right-hand side ``b``."""
    one = fn(jax.tree_util.tree_map(lambda a: a[None], b))
    return jax.tree_util.tree_map(lambda a: a[0], one)


def _row_norms(R):
    """Per-row Euclidean norms without overflow or underflow (as :func:`gifjax._tree.norm`)."""
    s = jnp.max(jnp.abs(R), axis=1)
    d = _tree.divisor(s)
    return jnp.where(jnp.isfinite(s), d * jnp.sqrt(jnp.sum((R / d[:, None]) ** 2, axis=1)), s)


@_tree.pytree_dataclass(static=("max_steps", "restarts", "negative_curvature"))
class BlockCG(_Krylov):
    r"""Block (preconditioned) conjugate gradients: Q right-hand sides, one Krylov space.

    For A X = B with B = [b_1 … b_Q], each step applies A once to a block of
    Q search directions (one batched HVP) and updates every column from the
    block Krylov space K_k(A, B) of dimension up to Q·k, so the columns share
    what each one finds — on spectra with a few large outliers (every
    trained network's Hessian) this needs far fewer steps per query than Q
    separate CG solves run side by side (``vmap``), which run as long as
    their slowest lane. Breakdown-free variant (Ji & Li 2017, after O'Leary
    1980): the direction block is re-orthonormalised every step by a
    rank-revealing Gram eigendecomposition, so directions that became
    linearly dependent drop out (deflation) instead of making the small
    Gram matrices singular. A column that met its tolerance stays in the
    block until all have (its products are paid for anyway: the shapes are
    fixed) and keeps enlarging the shared space, so every tolerance follows
    one path and a looser one stops earlier — dropping such columns made
    the peer benchmark's 100 queries take 61 steps at rtol 1e-4 instead of 24.

    Stopping, tolerances (``rtol=None`` by dtype), ``max_steps`` and
    ``preconditioner`` (SPD, built once in ``init``) are as in :class:`CG`,
    per column; ``converged`` is certified on each column's *true* residual
    ‖b_j − A x_j‖, with up to ``restarts`` refinement rounds from it. A
    non-positive-definite block Gram matrix PᵀAP stops every unconverged
    column with ``failure="indefinite"`` (use :class:`MINRES`, damping, or
    the GGN). ``negative_curvature="continue"`` goes on instead, with the
    pseudo-inverse of PᵀAP: CG on a symmetric indefinite A has no
    convergence guarantee, but the true residual still certifies whatever it
    returns, and with a few small negative eigenvalues (a trained network's
    Hessian) it often converges — on the peer benchmark's 4,810-parameter
    MLP (three eigenvalues near −1e-4), 100 queries in one block in 6 s to
    a relative error of 3e-11, where MINRES took 71 s and did not reach its
    tolerance. Where it stops converging (after negative curvature, no
    halving of the worst residual in :data:`STAGNATION_STEPS` steps) the
    block stops with ``failure="indefinite"``. The normal forms (GIF) run
    block CG on FᵀF.

    Use it through :meth:`compute_many` (``influence_scores`` and
    ``adjoint_solves`` do); ``compute`` is a block of one. Each column's
    ``num_matvecs`` is the block's step count (each step costs one matvec
    per column) plus the residual checks; ``num_steps`` counts the steps
    that column was still active.

    Example:
      >>> import jax.numpy as jnp
      >>> from gifjax import operators, solvers
      >>> A = jnp.diag(jnp.arange(1.0, 101.0))
      >>> op = operators.LinearOperator(lambda v: A @ v, symmetric=True, psd=True, like=jnp.zeros(100))
      >>> s = solvers.BlockCG()
      >>> sol = s.compute_many(s.init(op), jnp.eye(100)[:8])
      >>> bool(sol.converged.all()), sol.value.shape
      (True, (8, 100))
    """

    rtol: Any = None
    atol: Any = 0.0
    max_steps: int | None = None
    preconditioner: Any = None
    restarts: int = 2
    negative_curvature: str = "stop"

    def __post_init__(self):
        _checks.check_choice("solvers.BlockCG", "negative_curvature", self.negative_curvature,
                             ("stop", "continue"))

    def compute(self, state, b, *, throw: bool = False):
        sol = _as_batch_of_one(lambda B: self.compute_many(state, B), b)
        return check_solution(f"solvers.{type(self).__name__}", sol) if throw else sol

    def compute_many(self, state, B):
        return _differentiable_solve(self, state, B, many=True)

    def solve_symmetric(self, state, b):
        return _as_batch_of_one(lambda B: self.solve_symmetric_many(state, B), b)

    def solve_symmetric_many(self, state, B):
        return self._block(state.operator, state.data, B, normal=False)

    def solve_normal_many(self, state, C):
        return self._block(normal_operator(state.factor), state.data, C, normal=True)

    def _block(self, A, Minv, B, *, normal):
        rows, unravel = _rows(B)
        # a non-finite right-hand side would spread NaN to every column through the shared
        # Gram matrices: it is solved as zero and reported "nonfinite", the others as usual
        finite = jnp.all(jnp.isfinite(rows), axis=1)
        rows = jnp.where(finite[:, None], rows, 0.0)
        flat = lambda f: jax.vmap(lambda r: jax.flatten_util.ravel_pytree(f(unravel(r)))[0])
        A_rows = flat(A.matvec)
        M_rows = None if Minv is None else flat(Minv)
        bnorm = _row_norms(rows)
        tol = _tolerance(self.rtol, self.atol, bnorm, normal=normal)
        max_steps = _default_steps(self.max_steps)
        s = _tree.divisor(bnorm)  # unit rows, as in _Krylov._solve
        unit = rows / s[:, None]
        x, steps, matvecs, r, residual, met, fail, anorm = _block_cg_refined(
            A_rows, M_rows, unit, tol / s, max_steps, self.restarts, self.negative_curvature == "stop")
        eta = jax.vmap(backward_error, (0, 0, 0, None))(unit, x, r, anorm)
        x, residual = x * s[:, None], residual * s
        matvecs = jnp.broadcast_to((2 if normal else 1) * matvecs, steps.shape)
        sols = jax.vmap(finish)(x, steps, matvecs, residual, met & finite, jnp.where(finite, fail, NONFINITE), eta)
        return sols._replace(value=jax.vmap(unravel)(sols.value))


def _block_cg_refined(A, Minv, B, tol, max_steps, restarts, stop_indefinite):
    """Block CG from the true residual, up to ``restarts`` more rounds.

    Returns (X, per-column steps, matvecs per column: block steps + residual
    checks, true residuals and their norms, met, per-column failure, an
    estimate of ‖A‖ from below: the largest Rayleigh quotient seen).
    """
    Q = B.shape[0]

    def cond(st):
        rounds, x, r, rnorm, steps, k, fail, anorm = st
        todo = (rnorm > tol) & (fail == NONE)
        return (rounds <= restarts) & jnp.any(todo) & (k < max_steps)

    def body(st):
        rounds, x, r, rnorm, steps, k, fail, anorm = st
        todo = (rnorm > tol) & (fail == NONE)
        dx, dsteps, dk, f, dnorm = _block_cg(A, Minv, r * todo[:, None], tol, max_steps - k, stop_indefinite)
        x_new = x + dx
        r_new = B - A(x_new)
        rnorm_new = _row_norms(r_new)
        finite = jnp.isfinite(rnorm_new) & jnp.all(jnp.isfinite(x_new), axis=1)
        better = todo & finite & ((rounds == 0) | (rnorm_new <= rnorm))
        spent = k + dk >= max_steps
        f = jnp.where(~todo | better | (f != NONE), jnp.where(todo, f, NONE),
                      jnp.where(finite, jnp.where(spent, NONE, PRECISION), NONFINITE))
        keep = lambda new, old: jnp.where(better[:, None], new, old)
        return (rounds + 1, keep(x_new, x), keep(r_new, r), jnp.where(better, rnorm_new, rnorm),
                steps + dsteps, k + dk, jnp.where(todo, f, fail), jnp.maximum(anorm, dnorm))

    zero = jnp.zeros((Q,), jnp.int32)
    init = (jnp.int32(0), jnp.zeros_like(B), B, _row_norms(B), zero, jnp.int32(0), zero + NONE,
            jnp.zeros((), B.dtype))
    rounds, x, r, rnorm, steps, k, fail, anorm = jax.lax.while_loop(cond, body, init)
    met = rnorm <= tol
    # out of refinement rounds with budget left (or asked below the floor): the precision floor;
    # out of budget: finish() reports max_steps
    stalled = (fail == NONE) & ~met & (((rounds > restarts) & (k < max_steps)) | (tol < _floor(_row_norms(B))))
    return x, steps, k + rounds, r, rnorm, met, jnp.where(stalled, PRECISION, fail), anorm


def _block_cg(A, Minv, B, tol, max_steps, stop_indefinite):
    """Breakdown-free block PCG on rows: (X, per-column steps, block steps, per-column failure, ‖A‖ estimate)."""
    Q, dt = B.shape[0], B.dtype
    Minv = _identity if Minv is None else Minv
    mm = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
    # Gram eigenvalues below eps^0.9·max are dependent (or noise) directions. Any direction is a
    # valid search direction once the second (Cholesky) pass has made the block orthonormal;
    # dropping more (e.g. eps^(2/3)) made block CG several times slower near an exhausted space.
    drop = jnp.finfo(dt).eps ** 0.9

    def orthonormal(W):
        """Orthonormal rows spanning W's rows; zero rows for dropped, dependent directions.

        Two passes of Gram-matrix orthogonalisation (CholQR2), the first
        rank-revealing by eigh — robust to zero and repeated rows, where
        Householder QR would divide by zero.
        """
        norms = _row_norms(W)
        Wn = W / jnp.where(norms > 0, norms, 1.0)[:, None]
        w, V = jnp.linalg.eigh(mm(Wn, Wn.T))
        keep = w > drop * jnp.maximum(w[-1], jnp.finfo(dt).tiny)
        P = mm(V.T, Wn) * jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, w, 1.0)), 0.0)[:, None]
        L = jnp.linalg.cholesky(mm(P, P.T) + jnp.diag(jnp.where(keep, 0.0, 1.0).astype(dt)))
        return jax.scipy.linalg.solve_triangular(L, P, lower=True), keep

    def cond(st):
        k, x, r, p, keep, active, steps, fail, _, _ = st
        return (k < max_steps) & jnp.any(active) & jnp.any(keep) & jnp.all(fail == NONE)

    def body(st):
        k, x, r, p, keep, active, steps, fail, (seen, best, k_best), anorm = st
        ap = A(p)
        G = mm(p, ap.T)  # symmetrised: one product of the block with the step's HVPs, not two
        # the kept rows of p are orthonormal: |pᵢᵀA pᵢ| ≤ ‖A‖₂, an estimate for backward_error
        anorm = jnp.maximum(anorm, jnp.max(jnp.where(keep, jnp.abs(jnp.diag(G)), 0.0)))
        G = 0.5 * (G + G.T) + jnp.diag(jnp.where(keep, 0.0, 1.0).astype(dt))
        w, V = jnp.linalg.eigh(G)
        if stop_indefinite:
            pd = jnp.all(w > 0)
            Ginv = mm(V / jnp.where(w > 0, w, 1.0), V.T)
        else:  # go on through negative curvature: the true residual certifies whatever comes out
            big = jnp.abs(w) > jnp.finfo(dt).eps * jnp.max(jnp.abs(w))
            Ginv = mm(V * jnp.where(big, 1.0 / jnp.where(big, w, 1.0), 0.0), V.T)
            # ... but CG has no convergence guarantee there: once negative curvature was seen, a
            # block whose worst residual has not halved in STAGNATION_STEPS steps stops as indefinite
            seen = seen | jnp.any(w < -100 * jnp.finfo(dt).eps * jnp.max(jnp.abs(w)))
            pd = ~(seen & (k - k_best >= STAGNATION_STEPS))
        alpha = mm(Ginv, mm(p, r.T))                 # [s, Q]
        x_new = x + mm(alpha.T, p)
        r_new = r - mm(alpha.T, ap)
        rnorm = _row_norms(r_new)
        # a column that met its tolerance stays in the block while others go on: its HVPs are paid
        # for anyway (fixed shapes), and its directions keep enlarging the shared Krylov space. Its
        # residual is not monotone (CG minimises the A-norm error) and may end above the tolerance
        # again: the refinement rounds of _block_cg_refined certify it. (Counting a column done only
        # while below the tolerance instead made the peer job's chunks of 16 stagnate: 80 of 100.)
        still = active & (rnorm > tol)
        z = Minv(r_new) * (rnorm > floor)[:, None]
        beta = -mm(Ginv, mm(ap, z.T))                # [s, Q]
        p_new, keep_new = orthonormal(z + mm(beta.T, p))
        finite = jnp.all(jnp.isfinite(x_new)) & jnp.all(jnp.isfinite(p_new))
        f = jnp.where(~pd, INDEFINITE, jnp.where(finite, NONE, NONFINITE))
        ok = f == NONE
        fail = jnp.where(ok | ~active, fail, f)
        worst = jnp.max(jnp.where(still, rnorm / scale, 0.0))
        halved = worst < 0.5 * best
        progress = (seen, jnp.where(halved, worst, best), jnp.where(halved, k, k_best))
        return (k + 1, jnp.where(ok, x_new, x), jnp.where(ok, r_new, r), jnp.where(ok, p_new, p),
                keep_new & ok, jnp.where(ok, still, active), steps + active, fail, progress, anorm)

    bnorm = _row_norms(B)
    active, scale, floor = bnorm > tol, _tree.divisor(bnorm), _floor(bnorm)
    p, keep = orthonormal(Minv(B) * active[:, None])
    progress = (jnp.bool_(False), jnp.asarray(1.0, dt), jnp.int32(0))  # (negative curvature seen, best, its step)
    init = (jnp.int32(0), jnp.zeros_like(B), B, p, keep, active, jnp.zeros((Q,), jnp.int32),
            jnp.zeros((Q,), jnp.int32) + NONE, progress, jnp.zeros((), dt))
    k, x, _, _, _, _, steps, fail, _, anorm = jax.lax.while_loop(cond, body, init)
    return x, steps, k, fail, anorm


# ----------------------------------------------------------------------------- fallback


@_tree.pytree_dataclass(static=("on", "min_batch"))
class Fallback(Solver):
    r"""Solve with ``first``; solve the right-hand sides it failed on again with ``then``.

    A right-hand side is solved again when ``first`` stopped on one of the
    failures in ``on`` (default: ``"indefinite"``), from zero and with
    ``then``'s own budget; the others keep ``first``'s answer. The second
    solve runs only when some right-hand side needs it (``lax.cond``; under
    an outer ``vmap`` both run). The diagnostics of a redone right-hand side
    are ``then``'s, with the steps and matvecs of both solves added up.
    Derivatives are each solver's implicit ones. A batch of fewer than
    ``min_batch`` right-hand sides (``compute``: one) goes straight to
    ``then``: a block ``first`` shares little with a few queries, and
    compiling both solvers costs time (the choice is static, by shape).

    The default symmetric solver (``solver="auto"``, :data:`AUTO`) is
    ``Fallback(BlockCG(negative_curvature="continue", max_steps=300), MINRES(),
    on=("indefinite", "max_steps", "precision", "nonfinite"), min_batch=8)``: block CG shares one Krylov
    space across a batch of queries (on the README's damped 38k-parameter
    CNN, 9 instead of 21 HVPs per query and half the wall time) and goes on
    through the few small negative eigenvalues of a trained network's
    Hessian, where it usually still converges (certified on the true
    residual); the queries it hasn't certified within 300 block steps, or
    where it stopped converging, are solved again by MINRES, which doesn't
    need positive definiteness.

    Example:
      >>> import jax.numpy as jnp
      >>> from gifjax import solvers
      >>> A = jnp.diag(jnp.array([-1.0, 2.0, 3.0]))              # indefinite: CG stops, MINRES solves
      >>> sol = solvers.Fallback(solvers.CG(), solvers.MINRES())(lambda v: A @ v, jnp.ones(3))
      >>> bool(sol.converged), sol.value.round(3)
      (True, Array([-1.   ,  0.5  ,  0.333], dtype=float32))
    """

    first: Any
    then: Any
    on: tuple = ("indefinite",)
    min_batch: int = 1

    def __post_init__(self):
        for name in ("first", "then"):
            if not isinstance(getattr(self, name), Solver):
                raise _checks.error("solvers.Fallback", name, repr(getattr(self, name)), "a solver value",
                                    "pass e.g. Fallback(BlockCG(), MINRES()).", kind=TypeError)
        bad = [f for f in self.on if f not in FAILURES]
        if bad:
            raise _checks.error("solvers.Fallback", "on", repr(tuple(self.on)), f"names from {FAILURES}",
                                "pick failure names from gifjax.solvers.FAILURES, e.g. on=('indefinite',).")

    def setup(self, operator, form):
        return self.first.setup(operator, form), self.then.setup(operator, form)

    def configure(self, spec, estimator, fn):
        return self.then.configure(self.first.configure(spec, estimator, fn), estimator, fn)

    def matvec_budget(self, form="symmetric"):
        budgets = self.first.matvec_budget(form), self.then.matvec_budget(form)
        return None if None in budgets else sum(budgets)

    def compute(self, state, b, *, throw: bool = False):
        if self.min_batch > 1:
            sol = self.then.compute(self._state(state, 1), b)
        else:
            sol = self._combine(state, b, lambda solver, st, rhs: solver.compute(st, rhs))
        return check_solution("solvers.Fallback", sol) if throw else sol

    def compute_many(self, state, B):
        if jax.tree_util.tree_leaves(B)[0].shape[0] < self.min_batch:
            return self.then.compute_many(self._state(state, 1), B)
        return self._combine(state, B, lambda solver, st, rhs: solver.compute_many(st, rhs))

    @staticmethod
    def _state(state, i):
        """The state of ``first`` (0) or ``then`` (1)."""
        return SolverState(state.operator, state.form, state.data[i])

    def _combine(self, state, b, solve):
        first = solve(self.first, self._state(state, 0), b)
        redo = functools.reduce(jnp.logical_or, [first.failure == FAILURES.index(f) for f in self.on])
        # per right-hand side (the rows of a batch): new where redone, else old
        pick = lambda new, old: jnp.where(redo.reshape(redo.shape + (1,) * (new.ndim - redo.ndim)), new, old)  # noqa: E731

        def again():
            # the others get zero right-hand sides, which cost the second solver nothing
            rhs = jax.tree_util.tree_map(lambda t: pick(t, jnp.zeros_like(t)), b)
            then = solve(self.then, self._state(state, 1), rhs)
            added = then._replace(num_steps=then.num_steps + first.num_steps,
                                  num_matvecs=then.num_matvecs + first.num_matvecs)
            return jax.tree_util.tree_map(pick, added, first)

        return jax.lax.cond(jnp.any(redo), again, lambda: first)


# ----------------------------------------------------------------------------- LSTSQ


@_tree.pytree_dataclass(static=("max_steps", "restarts"))
class LSTSQ(_NormalEquations, CG):
    """Least-squares Krylov solver: (preconditioned) CGLS for min ‖Ax − b‖, Craig for min-norm.

    Both run on the normal system FᵀF x = c (module docstring) with F and Fᵀ
    applied separately, the curvature measured as ‖F p‖² (more accurate
    than MINRES/CG on FᵀF as one operator, e.g. 1e-5 vs 1e-3 relative error
    for GIF in float32 on an undamped, indefinite Hessian):

    * least_squares (GIF's update ``min_x ‖H P x − g‖``): CGLS; certifies the
      true normal-equation residual ‖Aᵀ(b − Ax)‖ ≤ max(rtol·‖Aᵀb‖, atol).
    * min_norm (GIF's adjoint, used for influence scores): Craig's method
      (CGNE), x = Aᵀz with A Aᵀ z = b, certifying ‖b − A Aᵀ z‖ on z.
    * symmetric: CGLS with Aᵀ = A, i.e. the least-squares (pseudo-inverse)
      solution; robust when A is indefinite or singular, where CG breaks down.

    Fields as in :class:`CG` (``preconditioner`` approximates (FᵀF)⁻¹ and is
    built from FᵀF). Two matvecs per step. A tolerance below the working
    precision (16·eps·‖rhs‖) is reported as ``failure="precision"``, never
    as met: past that floor the recurrences lose orthogonality and, on
    singular systems like GIF's H P, the iterate diverges instead of stalling.
    """

    def solve_normal(self, state, c):
        F = state.factor

        def curvature(p):
            q = F(p)
            return F.transpose_matvec(q), _tree.vdot(q, q)

        sol = self._solve(normal_operator(F), state.data, c, normal=True, curvature=curvature,
                          nonpositive=BREAKDOWN)
        return sol._replace(num_matvecs=2 * sol.num_matvecs)


def lstsq(matvec, b, *, rmatvec=None, form="least_squares", rtol=None, atol=0.0, max_steps=None):
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

    ``num_steps``, ``num_power_steps`` and ``batch_size`` are static; the
    other fields are traced.

    Args:
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

    def _check(self):
        name = "solvers.LiSSA"
        _checks.check_nonnegative(name, "damping", self.damping)
        if self.scale is not None and _checks.is_concrete(self.scale) and not np.all(np.asarray(self.scale) > 0):
            raise _checks.error(name, "scale", repr(self.scale), "a number > 0 (or None: estimated)",
                                "pass scale=None to estimate it by power iteration, or a positive number.")

    def configure(self, spec, estimator, fn):
        self._check()  # here too: the estimators call this eagerly, before their compiled program
        return spec

    def solve_symmetric(self, state, b):
        self._check()
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
                raise _checks.error("solvers.LiSSA", "batch_size", self.batch_size,
                                    "an operator with data to sample",
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
        r = _tree.sub(b, full(x))
        residual = _tree.norm(r)
        met = residual <= _tolerance(self.rtol, self.atol, bnorm)
        return finish(x, self.num_steps, self.num_steps + extra, residual, met, fail, backward_error(b, x, r))


def lissa(matvec, b, *, rmatvec=None, form="symmetric", **config) -> Solution:
    """Functional form of :class:`LiSSA` (``config``: its fields)."""
    return LiSSA(**config)(matvec, b, rmatvec=rmatvec, form=form)


def power_iteration(matvec, like, *, key, num_steps: int = 20):
    r"""Estimate the largest \|eigenvalue\| of a symmetric operator (‖A v_k‖).

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


#: Modes of :class:`Richardson`: gifjax's variant and the GIF paper's code, exactly.
RICHARDSON_MODES = ("gifjax", "official")


@_tree.pytree_dataclass(static=("max_steps", "mode", "max_restarts"))
class Richardson(Solver):
    r"""The GIF paper's solver: Richardson/Landweber on normal equations.

    With N the normal operator (AᵀA for least squares, A² for symmetric,
    A Aᵀ for min-norm) and rhs its right-hand side (Aᵀb, Ab, b), both modes
    iterate the same linear update, whose fixed point N x = rhs does not
    depend on the normaliser; they differ in how the normaliser grows, when
    they restart, what a restart costs and which iterate they return.

    ``mode="gifjax"`` (default):

        x_0 = rhs / c,   x_{k+1} = rhs / c + x_k − N x_k / c,

    where the *normaliser* c (the paper's c²) starts at ``normalizer`` and
    grows by ``normalizer_step``, restarting from x = rhs / c, whenever the
    step ‖x_{k+1} − x_k‖ = ‖rhs − N x_k‖ / c grows (divergence). c cancels in
    the fixed point; the iteration converges iff λ_max(N)/c < 2, at a rate set
    by κ(N) = κ(A)² — which is why LSTSQ needs far fewer matvecs. Stops when
    the normal residual ‖rhs − N x‖ ≤ max(rtol·‖rhs‖, atol) or after
    ``max_steps`` steps *in all* (restarts included). Two matvecs per step.
    Returns the iterate with the smallest normal residual seen, because in
    float32 rounding noise near the attainable accuracy (≈ eps·κ(A)²) makes
    the residual fluctuate, and a noise-triggered restart would otherwise
    throw the progress away.

    ``mode="official"`` reproduces the official code's loop step for step
    (its ``generalized_influence`` / ``iphvp`` pair). There ``normalizer`` is
    the divisor c of the *loss* (so N is divided by c², the paper's c²), and
    ``normalizer_step`` is added to c (not to c²) on each restart:

        v = rhs / c²,  x_0 = v,  x_{k+1} = v + x_k − N x_k / c²,  d_k = ‖x_{k+1} − x_k‖,

    and at every *even* count k (0, 2, 4, …) the attempt is abandoned when
    d_k exceeds the d of the previous even count (10¹⁰ before the first);
    then c ← c + ``normalizer_step`` and the iteration starts afresh from
    x_0 = v with a **fresh budget**: restarts do not consume ``max_steps``.
    An attempt ends when d_k ≤ ``atol`` (the official tol·√|t|; the default
    0 means never) or after ``max_steps`` steps (the official ``max_iter``,
    a fixed K: 200 / 30 / 1,000 in the paper's tables), and returns its
    **last** iterate. ``rtol`` then only decides ``converged``, from the
    final normal residual ‖rhs − N x‖ ≤ rtol·‖rhs‖ (2 more matvecs), as for
    LiSSA's fixed budget. Where the official loop has no limit on restarts,
    this one gives up after ``max_restarts`` (``failure="diverged"``); where it
    would return a NaN (a non-finite step ends its loop), this one returns the
    last finite iterate with ``failure="nonfinite"``. ``num_steps`` counts
    every step of every attempt. The official defaults are
    ``Richardson(mode="official", normalizer=1.0, normalizer_step=0.5)``.

    Args:
      normalizer, normalizer_step: the normaliser's start and growth (traced;
        c² of the paper in ``"gifjax"`` mode, c in ``"official"`` mode).
      rtol, atol: tolerances (traced), as described per mode.
      max_steps: step budget (static): in all (``"gifjax"``) or per attempt
        (``"official"``).
      mode: ``"gifjax"`` or ``"official"`` (static; :data:`RICHARDSON_MODES`).
      max_restarts: ``"official"`` mode's limit on restarts (static).

    Example:
      >>> import jax.numpy as jnp
      >>> from gifjax import solvers
      >>> A = jnp.array([[2.0, 0.0], [0.0, 1.0]])      # A² has λ_max 4: c = 1 diverges
      >>> sol = solvers.Richardson(mode="official", normalizer_step=0.5, max_steps=200)(
      ...     lambda x: A @ x, jnp.array([1.0, 1.0]))
      >>> sol.value.round(4), int(sol.num_steps)  # A⁻¹b; 3 steps abandoned at c = 1, then 200 at c = 1.5
      (Array([0.5, 1. ], dtype=float32), 203)

    Reproduces the paper; do not expect it to reach tight tolerances.
    """

    normalizer: Any = 1.0
    normalizer_step: Any = 1.0
    rtol: Any = 1e-5
    atol: Any = 0.0
    max_steps: int = 1000
    mode: str = "gifjax"
    max_restarts: int = 1000

    def _check(self):
        _checks.check_choice("solvers.Richardson", "mode", self.mode, RICHARDSON_MODES)
        _checks.check_solver("solvers.Richardson", self)

    def configure(self, spec, estimator, fn):
        self._check()  # the estimators call this eagerly, before their compiled program
        return spec

    def solve_symmetric(self, state, b):
        A = state.operator
        return self._iterate(lambda v: A(A(v)), A(b), extra=1)

    def solve_normal(self, state, c):
        F = state.factor
        return self._iterate(lambda v: F.transpose_matvec(F(v)), c, extra=0)

    def _iterate(self, N, rhs, *, extra):
        self._check()
        if self.mode == "official":
            return self._iterate_official(N, rhs, extra=extra)
        rhs_norm = _tree.norm(rhs)
        tol = _tolerance(self.rtol, self.atol, rhs_norm)
        N_rhs = N(rhs)  # lets a restart x = rhs / c reuse N x = N rhs / c

        def restart(c):
            return _tree.scale(1.0 / c, rhs), _tree.axpy(-1.0 / c, N_rhs, rhs)

        def cond(st):
            k, x, res, rnorm, c, fail, (best, best_res, best_norm) = st
            return (k < self.max_steps) & (best_norm > tol) & (fail == NONE)

        def body(st):
            k, x, res, rnorm, c, fail, (best, best_res, best_norm) = st
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
                    (_tree.where(improved, x_new, best), _tree.where(improved, res_new, best_res),
                     jnp.where(improved, rnorm_new, best_norm)))

        c0 = jnp.asarray(self.normalizer, rhs_norm.dtype)
        x0, res0 = restart(c0)
        r0 = _tree.norm(res0)
        init = (jnp.int32(0), x0, res0, r0, c0, jnp.int32(NONE), (x0, res0, r0))
        k, _, _, _, _, fail, (best, best_res, best_norm) = jax.lax.while_loop(cond, body, init)
        return finish(best, k, 2 * (k + 1) + extra, best_norm, best_norm <= tol, fail,
                      backward_error(rhs, best, best_res))

    def _iterate_official(self, N, rhs, *, extra):
        """The official loop (see the class docstring); one ``while_loop`` over all attempts."""
        dtype = _tree.norm(rhs).dtype
        tol = jnp.asarray(self.atol, dtype)
        fresh_old = jnp.asarray(1e10, dtype)  # the official diff_old before an attempt's first check
        fresh_diff = tol + 0.1                # ... and its diff, so that a fresh attempt always runs

        def cond(st):
            k, total, restarts, x, c, diff, diff_old, fail = st
            return (k < self.max_steps) & (diff > tol) & (fail == NONE)

        def body(st):
            k, total, restarts, x, c, diff, diff_old, fail = st
            inv = 1.0 / (c * c)
            x_new = _tree.add(_tree.scale(inv, rhs), _tree.axpy(-inv, N(x), x))
            d = _tree.norm(_tree.sub(x_new, x))
            even = k % 2 == 0
            grew = even & (d > diff_old)
            finite = jnp.isfinite(d) & _tree.all_finite(x_new)
            fail = jnp.where(finite, NONE, NONFINITE)
            fail = jnp.where(finite & grew & (restarts >= self.max_restarts), DIVERGED, fail)
            restart = finite & grew & (fail == NONE)
            step = finite & ~grew
            c_up = c + self.normalizer_step
            x = _tree.where(restart, _tree.scale(1.0 / (c_up * c_up), rhs), _tree.where(step, x_new, x))
            return (jnp.where(restart, 0, jnp.where(step, k + 1, k)), total + 1,
                    restarts + restart.astype(jnp.int32), x, jnp.where(restart, c_up, c),
                    jnp.where(restart, fresh_diff, jnp.where(step, d, diff)),
                    jnp.where(restart, fresh_old, jnp.where(step & even, d, diff_old)), fail)

        c0 = jnp.asarray(self.normalizer, dtype)
        init = (jnp.int32(0), jnp.int32(0), jnp.int32(0), _tree.scale(1.0 / (c0 * c0), rhs), c0,
                fresh_diff, fresh_old, jnp.int32(NONE))
        _, total, _, x, _, _, _, fail = jax.lax.while_loop(cond, body, init)
        r = _tree.sub(rhs, N(x))
        residual = _tree.norm(r)
        met = residual <= _tolerance(self.rtol, 0.0, _tree.norm(rhs))
        return finish(x, total, 2 * total + 2 + extra, residual, met, fail, backward_error(rhs, x, r))


def richardson(matvec, b, *, rmatvec=None, form="least_squares", **config) -> Solution:
    """Functional form of :class:`Richardson` (default form: least squares)."""
    return Richardson(**config)(matvec, b, rmatvec=rmatvec, form=form)


# ----------------------------------------------------------------------------- names

SOLVERS = {"dense": Dense, "cg": CG, "block_cg": BlockCG, "minres": MINRES, "lsmr": LSMR, "lstsq": LSTSQ,
           "lissa": LiSSA, "richardson": Richardson}
#: What ``solver="auto"`` means for each form (before :data:`AUTO_FLOP_BUDGET` caps
#: its steps, see :func:`auto`): for the symmetric estimators MINRES
#: (indefinite-safe, 1 matvec per step) for fewer than 8 queries and, for a batch of
#: 8 or more, block CG (one Krylov space for the batch, on through negative curvature)
#: with MINRES for the queries it has not certified (300 block steps at most). For GIF
#: LSTSQ (CGLS / Craig) below 8 queries and, for 8 or more, block CG on the shared normal
#: system FᵀF with LSTSQ for what it has not certified: on the 33.7k-parameter MLP at 5 %
#: (float64) 31 HVPs per query at Q = 64 against LSTSQ's 463 (``benchmarks.solvers --cases``).
AUTO = {"symmetric": lambda: Fallback(BlockCG(negative_curvature="continue", max_steps=300), MINRES(),
                                      on=("indefinite", "max_steps", "precision", "nonfinite"), min_batch=8),
        "least_squares": lambda: Fallback(BlockCG(max_steps=300), LSTSQ(),
                                          on=("indefinite", "max_steps", "precision", "nonfinite"), min_batch=8)}
AUTO["min_norm"] = AUTO["least_squares"]

#: Work budget of one call with ``solver="auto"``, in floating-point operations of its
#: curvature products (XLA's cost estimate of one product × steps × queries), by
#: backend: on 2 CPU cores 1e13 is about 4 minutes of Hessian-vector products. A call
#: that would need more gets smaller step caps (:func:`auto`), never fewer than
#: :data:`AUTO_MIN_STEPS`, and says so when a query then stops unconverged. The
#: estimator functions apply it (``influence``, ``adjoint_solve(s)``,
#: ``influence_scores``, ``self_influence``); ``setup`` and :mod:`gifjax.parallel`'s
#: sharded sweeps keep the default caps.
AUTO_FLOP_BUDGET = {"cpu": 1e13, "gpu": 1e15, "tpu": 1e15}

#: The fewest steps per query (each stage) that :data:`AUTO_FLOP_BUDGET` leaves ``"auto"``.
AUTO_MIN_STEPS = 10


def auto(form: str = "symmetric", *, steps: int | None = None) -> Solver:
    r"""``solver="auto"``'s value for ``form``, every stage capped at ``steps`` steps in all.

    ``AUTO[form]()`` (see :data:`AUTO`) with each step cap lowered to at most
    ``steps`` (a :class:`Fallback`'s two stages to ``steps // 2`` each), but
    never below :data:`AUTO_MIN_STEPS`; ``steps=None`` keeps the default caps.
    The estimator functions call it with the steps that keep the call within
    :data:`AUTO_FLOP_BUDGET`; pass ``solver=gifjax.solvers.auto()`` for the
    uncapped default, or ``auto(steps=…)`` for a budget of your own.

    Example:
      >>> from gifjax import solvers
      >>> s = solvers.auto(steps=100)
      >>> s.first.max_steps, s.then.max_steps, solvers.auto("least_squares", steps=4).then.max_steps
      (50, 50, 10)
    """
    solver = AUTO[form]()
    if steps is None:
        return solver

    def capped(stage, share):
        cap = min(_default_steps(stage.max_steps), max(int(share), AUTO_MIN_STEPS))
        return dataclasses.replace(stage, max_steps=cap)

    if isinstance(solver, Fallback):
        return dataclasses.replace(solver, first=capped(solver.first, steps // 2),
                                   then=capped(solver.then, steps // 2))
    return capped(solver, steps)


def auto_steps(flops_per_step: float | None, *, queries: int = 1, form: str = "symmetric",
               backend: str | None = None) -> int | None:
    """Steps per query that keep ``queries`` solves within :data:`AUTO_FLOP_BUDGET`, or None.

    ``flops_per_step``: one curvature product on one query's vector (``None``,
    unknown: no cap). A least-squares step takes two products. ``None`` is
    returned too when the default's worst case (``auto(form).matvec_budget``)
    fits the budget anyway.
    """
    if not flops_per_step or flops_per_step <= 0:
        return None
    budget = AUTO_FLOP_BUDGET.get(backend or jax.default_backend(), max(AUTO_FLOP_BUDGET.values()))
    products = int(budget // (flops_per_step * max(queries, 1)))  # per query
    if products >= auto(form).matvec_budget(form):
        return None
    return products // (1 if form == "symmetric" else 2)


def get_solver(solver, *, form: str = "symmetric", fn: str = "solvers.get_solver") -> Solver:
    """A solver value from ``"auto"`` (by ``form``, see :data:`AUTO`), a name in :data:`SOLVERS`, or a value."""
    if isinstance(solver, Solver):
        return solver
    if isinstance(solver, str) and solver == "auto":
        return auto(form)
    if isinstance(solver, str) and solver in SOLVERS:
        return SOLVERS[solver]()
    raise _checks.error(
        fn, "solver", repr(solver), f"one of {sorted(SOLVERS)}, 'auto', or a solver value such as CG(rtol=1e-8)",
        "pick a name from that list, or configure one, e.g. gifjax.solvers.LSTSQ(rtol=1e-8).")
