r"""Second-order group influence (Basu, You & Feizi, ICML 2020), derived from its definition.

Removing a *group* U of m of the n training examples moves the optimum
further than first-order influence predicts; the second-order term accounts
for the interaction of the removed points. With the training objective
L(θ) = loss_fn(θ, \*train) = (1/n) Σ_S ℓ_i + R and the group objective
L_U(θ) = loss_fn(θ, \*removed) = (1/m) Σ_U ℓ_i + R, the removal path is

    L_ε(θ) = [ (1/n) Σ_S ℓ_i − ε (1/n) Σ_U ℓ_i ] / (1 − εp) + R(θ),   p = m/n,

so ε = 0 is the trained objective and ε = 1 *exactly* the objective retrained
without U. Its stationarity condition, multiplied by 1 − εp, is
∇L(θ) − εp ∇L_U(θ) = 0. Differentiating θ(ε) at ε = 0 (H = ∇²L(θ̂),
H_U = ∇²L_U(θ̂), g_U = ∇L_U(θ̂)):

    H θ'  = p g_U
    H θ'' = 2p H_U θ' − ∇³L[θ', θ']

and the second-order estimate of θ_U − θ̂ is θ' + ½θ'':

    Δ₁ = p H⁻¹ g_U                                         (first order)
    Δ  = Δ₁ + H⁻¹ ( p H_U Δ₁ − ½ ∇³L[Δ₁, Δ₁] )             (second order)

These are the exact Taylor coefficients of the path (the tests check them
against finite differences of θ(ε)). Each term applies H⁻¹ exactly once and
p exactly once — the GIF paper's reference code applies H⁻² and scales
twice; this is the expansion itself. The third-derivative term vanishes for
quadratic objectives (then Δ is the two-term Neumann series of the exact
(H − p H_U)⁻¹ p g_U) and is one forward-over-forward-over-reverse product
otherwise; ``third_order=False`` keeps only the H_U coupling term (not the
Taylor coefficient, though at finite p it is sometimes closer to retraining).

Example:
    >>> import jax, jax.numpy as jnp, gifjax
    >>> X = jax.random.normal(jax.random.key(0), (40, 3)); y = (X[:, 0] > 0) * 1.0
    >>> def loss(w, X, y):
    ...     z = X @ w
    ...     return jnp.mean(jnp.logaddexp(0.0, z) - y * z) + 0.05 * w @ w
    >>> newton = jax.jit(lambda w: w - jnp.linalg.solve(jax.hessian(loss)(w, X, y), jax.grad(loss)(w, X, y)))
    >>> w = jnp.zeros(3)
    >>> for _ in range(20):  # Newton to the optimum
    ...     w = newton(w)
    >>> out = gifjax.group_influence(loss, w, (X[:8], y[:8]), X, y, solver="dense")
    >>> out.delta.shape, float(out.fraction)
    ((3,), 0.2)
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax

from . import _checks, _repr, _tree
from . import curvature as _curv
from .estimators import influence as _influence
from .solvers import Solution

__all__ = ["GROUP_METHODS", "GroupInfluence", "group_influence"]

GROUP_METHODS = ("if", "fif")


@_repr.compact_repr()
class GroupInfluence(NamedTuple):
    """Result of :func:`group_influence`.

    Attributes:
      delta: second-order estimate of θ_U − θ̂ (pytree like ``params``).
      first_order: Δ₁ = p H⁻¹ g_U, the classic group influence.
      correction: Δ − Δ₁.
      fraction: p = m / n.
      solutions: the two solves' :class:`~gifjax.solvers.Solution`
        (first order, correction) — check ``converged``.
    """

    delta: Any
    first_order: Any
    correction: Any
    fraction: Any
    solutions: tuple[Solution, Solution]


def group_influence(loss_fn: Callable, params, removed: tuple, *args, method: str = "if",
                    mask=None, solver="auto", damping=0.0, third_order: bool = True,
                    chunk_size: int | None = None, curvature="hessian") -> GroupInfluence:
    r"""Second-order parameter change for removing a group U (see module docstring).

        Δ = Δ₁ + H⁻¹ ( p H_U Δ₁ − ½ ∇³L[Δ₁, Δ₁] ),   Δ₁ = p H⁻¹ ∇L_U,   p = m / n

    Args:
      loss_fn: ``loss_fn(params, *data) -> scalar``, the *mean* loss over the
        data it is given plus the regulariser (as in :func:`gifjax.influence`).
      params: the trained optimum θ̂ (∇L(θ̂) = 0 is assumed).
      removed: tuple of U's data arrays (leading axis m), e.g. ``(x[U], y[U])``.
      *args: the full training data, U included (leading axis n > m).
      method: ``"if"`` (all parameters) or ``"fif"`` (only the ``mask``
        parameters move; the expansion restricted to θ_t) — static.
      mask, solver, damping, chunk_size, curvature: as in :func:`gifjax.influence`
        (``curvature`` is the operator of the two solves; H_U and ∇³L stay
        Hessian products)
        (H → H + λI with damping; the HVPs with H_U and the third-order
        product use the whole of ``removed`` / ``args``).
      third_order: include −½∇³L[Δ₁, Δ₁] (static; default True).

    Returns:
      :class:`GroupInfluence`; θ̂ + ``delta`` approximates the retrained
      parameters, to second order in p.

    Warning:
      An expansion in p around θ̂: for large groups (p ≳ 0.3) or strongly
      non-quadratic losses the series itself is inaccurate, and both orders
      need H positive definite (add damping on non-convex models, where the
      retrained optimum may lie in another basin anyway).
    """
    fn = "group_influence"
    if not isinstance(removed, tuple) or not removed:
        raise _checks.error(fn, "removed", type(removed).__name__,
                            "a non-empty tuple of the group's data arrays",
                            "pass removed=(x[U], y[U]) — the arguments loss_fn takes after params.",
                            kind=TypeError)
    _checks.check_choice(fn, "method", method, GROUP_METHODS)
    m = _curv.batch_size_of(fn, removed)
    n = _curv.batch_size_of(fn, args)
    if m >= n:
        raise _checks.error(fn, "removed", f"{m} examples", f"fewer than the {n} training examples in *args",
                            "pass the full training set (U included) as *args.")
    p = m / n
    kw = dict(method=method, mask=mask, solver=solver, damping=damping, chunk_size=chunk_size,
              curvature=curvature)
    first = _influence(loss_fn, params, _tree.scale(p, jax.grad(loss_fn)(params, *removed)),
                                 *args, **kw)
    d1 = first.delta
    rhs = _tree.scale(p, _curv.hvp(loss_fn, params, d1, *removed))
    if third_order:
        d3 = jax.jvp(lambda th: _curv.hvp(loss_fn, th, d1, *args), (params,), (d1,))[1]
        rhs = _tree.axpy(-0.5, d3, rhs)
    second = _influence(loss_fn, params, rhs, *args, **kw)
    delta = _tree.add(d1, second.delta)
    return GroupInfluence(delta, d1, second.delta, p, (first.solution, second.solution))
