"""The retraining optimisers (private): Newton–CG and L-BFGS configurations and their loops."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from .. import _checks, _tree
from .. import solvers as _solvers

# ----------------------------------------------------------------------------- optimisers


@_tree.pytree_dataclass(static=("max_steps", "cg_max_steps", "max_backtracks"))
class Newton:
    r"""Newton–CG with backtracking, the default retraining optimiser of :func:`retrain`.

    Step k: solve (H + λI) d = −∇f(θ_k) by CG (``cg_rtol``, ``cg_max_steps``;
    H by ``jax.linearize`` of ∇f at θ_k), use −∇f if d is not a descent
    direction, then θ_{k+1} = θ_k + t d with t the first of 1, ½, ¼, … (at
    most ``max_backtracks`` halvings) meeting Armijo's
    f(θ_k + t d) ≤ f(θ_k) + 10⁻⁴ t ∇fᵀd (+ a rounding slack of 10 ε \|f\|).
    Stops when ‖∇f‖₂ ≤ ``gtol`` or after ``max_steps`` steps.

    Fields: ``max_steps`` (static), ``gtol`` (traced; ``None``: 1e-9 in
    float64, 1e-5 in float32), ``cg_rtol`` (traced), ``cg_max_steps``
    (static; ``None``: the number of parameters), ``damping`` λ (traced;
    it changes the steps, not the optimum they converge to — keep 0 for
    convex objectives, where it only slows convergence), ``max_backtracks``
    (static).

    Warning:
      Each step costs up to ``cg_max_steps`` Hessian-vector products; for
      large models prefer :class:`LBFGS`. On non-convex objectives CG stops
      at negative curvature and the line search keeps descent, but the
      optimum reached is a local one.
    """

    max_steps: int = 20
    gtol: Any = None
    cg_rtol: Any = 1e-6
    cg_max_steps: int | None = None
    damping: Any = 0.0
    max_backtracks: int = 30


@_tree.pytree_dataclass(static=("max_steps", "memory_size", "max_linesearch_steps"))
class LBFGS:
    """``optax.lbfgs`` (zoom line search) as a retraining optimiser of :func:`retrain`.

    Stops when ‖∇f‖₂ ≤ ``gtol`` (traced; ``None``: 1e-9 in float64, 1e-5 in
    float32) or after ``max_steps`` (static). ``memory_size`` and
    ``max_linesearch_steps`` (static) are passed to optax.
    """

    max_steps: int = 1000
    gtol: Any = None
    memory_size: int = 10
    max_linesearch_steps: int = 30


OPTIMIZERS = (Newton, LBFGS)


def default_gtol(gtol, params):
    if gtol is not None:
        return gtol
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(params))
    return 1e-9 if dtype == jnp.float64 else 1e-5


def _newton(f, p0, cfg: Newton, gtol):
    value_and_grad = jax.value_and_grad(f)
    f0, g0 = value_and_grad(p0)
    cg = _solvers.CG(rtol=cfg.cg_rtol, max_steps=cfg.cg_max_steps)
    eps = jnp.finfo(jnp.result_type(f0)).eps

    def cond(s):
        k, _, _, g, _ = s
        return (k < cfg.max_steps) & (_tree.norm(g) > gtol)

    def body(s):
        k, p, fv, g, hvps = s
        _, hv = jax.linearize(jax.grad(f), p)
        sol = cg(lambda v: _tree.axpy(cfg.damping, v, hv(v)), _tree.scale(-1.0, g))
        slope = _tree.vdot(g, sol.value)
        bad = ~(slope < 0) | ~_tree.all_finite(sol.value)
        d = _tree.where(bad, _tree.scale(-1.0, g), sol.value)
        slope = jnp.where(bad, -_tree.vdot(g, g), slope)
        slack = 10 * eps * jnp.abs(fv)
        accept = lambda t, ft: ft <= fv + 1e-4 * t * slope + slack  # NaN fails: backtrack

        def ls_cond(ls):
            t, ft, i = ls
            return (i < cfg.max_backtracks) & ~accept(t, ft)

        def ls_body(ls):
            t, _, i = ls
            t = t / 2
            return t, f(_tree.axpy(t, d, p)), i + 1

        one = jnp.ones((), slope.dtype)
        t, _, _ = jax.lax.while_loop(ls_cond, ls_body, (one, f(_tree.axpy(one, d, p)), 0))
        p_new = _tree.axpy(t, d, p)
        f_new, g_new = value_and_grad(p_new)
        return k + 1, p_new, f_new, g_new, hvps + sol.num_matvecs

    k, p, fv, g, hvps = jax.lax.while_loop(cond, body, (jnp.int32(0), p0, f0, g0, jnp.int32(0)))
    return p, fv, _tree.norm(g), k, hvps


def _lbfgs(f, p0, cfg: LBFGS, gtol):
    opt = optax.lbfgs(memory_size=cfg.memory_size, linesearch=optax.scale_by_zoom_linesearch(
        max_linesearch_steps=cfg.max_linesearch_steps))
    value_and_grad = optax.value_and_grad_from_state(f)

    def cond(s):
        k, _, _, gnorm = s
        return (k < cfg.max_steps) & (gnorm > gtol)

    def body(s):
        k, p, state, _ = s
        value, grad = value_and_grad(p, state=state)
        updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=f)
        p = optax.apply_updates(p, updates)
        return k + 1, p, state, optax.tree_utils.tree_norm(optax.tree_utils.tree_get(state, "grad"))

    gnorm0 = _tree.norm(jax.grad(f)(p0))
    k, p, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), p0, opt.init(p0), gnorm0))
    fv, g = jax.value_and_grad(f)(p)  # recomputed: the stopping norm, reported honestly
    return p, fv, _tree.norm(g), k, jnp.int32(0)


def minimize(f, p0, optimizer, gtol):
    if isinstance(optimizer, Newton):
        return _newton(f, p0, optimizer, gtol)
    return _lbfgs(f, p0, optimizer, gtol)


def check_optimizer(fn, optimizer):
    if not isinstance(optimizer, OPTIMIZERS):
        raise _checks.error(fn, "optimizer", repr(optimizer),
                            "gifjax.evaluation.Newton(...) or gifjax.evaluation.LBFGS(...)",
                            "pass optimizer=evaluation.Newton() (small / convex models) or "
                            "evaluation.LBFGS(max_steps=...) (large or non-convex ones).",
                            kind=TypeError)
    if not isinstance(optimizer.max_steps, int) or optimizer.max_steps < 1:
        raise _checks.error(fn, "optimizer.max_steps", repr(optimizer.max_steps), "a positive int",
                            "pass e.g. Newton(max_steps=20).")
    _checks.check_nonnegative(fn, "optimizer.gtol", optimizer.gtol)
