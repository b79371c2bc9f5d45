"""Curvature products over pytrees: HVPs, the one curvature primitive.

Everything in gifjax that touches curvature goes through forward-over-reverse
differentiation, ``jax.jvp(jax.grad(f), (θ,), (v,))``: one HVP costs a small
constant times one gradient and never forms H. The other forms compose on it:

* :func:`hvp`             H v at one point (plus optional damping λ v);
* :func:`linearize_hvp`   linearise once, then v ↦ H v many times (solvers);
* :func:`batched_hvp`     (1/n) Σ_i ∇²ℓ_i v over fixed-size chunks of a large
                          batch with ``lax.scan``; memory bounded by one chunk;
* :func:`masked_hvp`      P H P v for an element mask P;
* :func:`ggn_product`     Gauss–Newton G v = Jᵀ H_out J v (+ ∇²R v) through the
                          model outputs (jvp, output-loss HVP, vjp); PSD when the
                          output loss and R are convex (:class:`GGN`);
* :func:`hutchinson_trace` tr(P A P) ≈ mean zᵀ A z over random sign vectors z;
* :func:`mixed_precision`  wrap a loss (or a :class:`GGN`) so every curvature
                          product runs in bfloat16 while solvers keep float32.

This module knows nothing of solvers; masks enter only as multiplications.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from . import _checks, _tree
from . import masks as _masks

__all__ = ["GGN", "batch_size_of", "batched_hvp", "batched_hvp_fn", "check_ggn", "ggn_product", "hutchinson_trace", "hvp", "linearize_ggn", "linearize_hvp", "masked_hvp", "mixed_precision"]


def hvp(loss_fn: Callable, params, v, *args, damping=0.0):
    r"""Hessian-vector product (H + λI) v of ``loss_fn`` at ``params``.

    H = ∇²_θ loss_fn(θ, \*args) at θ = params, computed as
    ``jax.jvp(jax.grad(loss_fn), (params,), (v,))`` — forward over reverse.

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar``.
      params: any pytree of float arrays (dict, list, tuple, NamedTuple, Flax
        variables).
      v: pytree like ``params`` (traced).
      *args: extra arguments of ``loss_fn`` (data batches, labels…).
      damping: λ ≥ 0 (traceable); adds λ v.

    Returns:
      A pytree like ``params``.

    Example:
      >>> import jax.numpy as jnp, gifjax
      >>> f = lambda p: 0.5 * jnp.sum(p["w"] ** 2) * 3.0
      >>> gifjax.hvp(f, {"w": jnp.ones(2)}, {"w": jnp.array([1.0, 2.0])})["w"]
      Array([3., 6.], dtype=float32)
    """
    _checks.check_like("hvp", "v", v, params)
    _checks.check_nonnegative("hvp", "damping", damping)
    hv = _jvp_of_grad(loss_fn, params, args)(v)
    return _damp(hv, v, damping)


def linearize_hvp(loss_fn: Callable, params, *args, damping=0.0):
    """Linearise ∇loss_fn at ``params`` once; return ``v ↦ (H + λI) v``.

    ``jax.linearize`` evaluates the gradient (and stores its residuals) once,
    so each later product only runs the linear (tangent) part. Use it when
    many products are taken at one point — every iterative solver does. The
    stored residuals cost memory comparable to one backward pass; for batches
    that do not fit, use :func:`batched_hvp`.

    Example:
      >>> import jax.numpy as jnp, gifjax
      >>> f = lambda p, x: jnp.sum((x * p) ** 2)
      >>> Hv = gifjax.linearize_hvp(f, jnp.ones(2), jnp.array([1.0, 2.0]))
      >>> Hv(jnp.array([1.0, 1.0]))
      Array([2., 8.], dtype=float32)
    """
    _checks.check_nonnegative("linearize_hvp", "damping", damping)
    _, hv = jax.linearize(lambda p: jax.grad(loss_fn)(p, *args), params)
    return lambda v: _damp(hv(v), v, damping)


def batched_hvp(loss_fn: Callable, params, v, *args, chunk_size: int, damping=0.0):
    """Average HVP over a large batch in fixed-size chunks (bounded memory).

    With n examples split into chunks c of size n_c,
    H v = Σ_c (n_c / n) ∇²_θ loss_fn(θ, *args_c) v, so ``loss_fn`` must be the
    *mean* loss over the batch it receives. Every array leaf of ``args`` must
    share the leading batch axis n. Full chunks run in one ``lax.scan`` (one
    compile, one chunk in memory); a remainder chunk, if any, is one extra call.

    Args:
      chunk_size: static chunk length (≥ 1).
    """
    _checks.check_like("batched_hvp", "v", v, params)
    _checks.check_nonnegative("batched_hvp", "damping", damping)
    return batched_hvp_fn(loss_fn, params, *args, chunk_size=chunk_size, damping=damping)(v)


def batched_hvp_fn(loss_fn: Callable, params, *args, chunk_size: int, damping=0.0):
    """The operator ``v ↦ batched_hvp(loss_fn, params, v, *args, ...)``."""
    n = batch_size_of("batched_hvp", args)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise _checks.error("batched_hvp", "chunk_size", repr(chunk_size), "a positive int",
                            "pass e.g. chunk_size=256.")
    chunk_size = min(chunk_size, n)
    num_full, rest = divmod(n, chunk_size)
    check_mean_loss(loss_fn, params, args, chunk_size)

    def chunk_hvp(chunk_args, v):
        return _jvp_of_grad(loss_fn, params, chunk_args)(v)

    def hvp_fn(v):
        full = jax.tree_util.tree_map(
            lambda a: a[: num_full * chunk_size].reshape((num_full, chunk_size) + a.shape[1:]), args
        )

        def body(acc, chunk_args):
            return _tree.add(acc, chunk_hvp(chunk_args, v)), None

        total, _ = jax.lax.scan(body, _tree.zeros_like(v), full)
        total = _tree.scale(chunk_size / n, total)
        if rest:
            tail = jax.tree_util.tree_map(lambda a: a[num_full * chunk_size:], args)
            total = _tree.axpy(rest / n, chunk_hvp(tail, v), total)
        return _damp(total, v, damping)

    return hvp_fn


def check_mean_loss(loss_fn, params, args, chunk_size):
    """Refuse a loss that is not a mean over its batch: chunk averaging would be silently off.

    A mean loss is unchanged when its batch is repeated twice; a sum doubles.
    One forward pass on a chunk and on the chunk twice, outside ``jit`` only.
    """
    if not all(_checks.is_concrete(a) for a in jax.tree_util.tree_leaves((params, args))):
        return
    chunk = jax.tree_util.tree_map(lambda a: a[:chunk_size], args)
    twice = jax.tree_util.tree_map(lambda a: jnp.concatenate([a, a]), chunk)
    once, doubled = loss_fn(params, *chunk), loss_fn(params, *twice)
    if not (_checks.is_concrete(once) and _checks.is_concrete(doubled)):  # loss_fn closes over tracers
        return
    once, doubled = float(once), float(doubled)
    if np.isfinite(once) and np.isfinite(doubled) and abs(doubled - once) > 0.1 * max(abs(once), abs(doubled)):
        raise _checks.error("batched_hvp", "loss_fn", f"a loss that changes from {once:.6g} to {doubled:.6g} "
                            "when its batch is repeated", "the mean loss over the batch it receives",
                            "average over the batch (jnp.mean, not jnp.sum): chunk_size weights each "
                            "chunk's products by its share of the examples.")


def masked_hvp(loss_fn: Callable, params, v, mask, *args, damping=0.0):
    """P (H + λI) P v for an element ``mask`` P (``None`` → plain HVP).

    Exactly zero outside the mask. See :mod:`gifjax.masks` for mask rules.
    """
    mask = _masks.validate(mask, params, fn="masked_hvp")
    return _masks.apply(mask, hvp(loss_fn, params, _masks.apply(mask, v), *args, damping=damping))


def batch_size_of(fn: str, args) -> int:
    """Common leading-axis length of all array leaves of ``args`` (checked)."""
    return _checks.leading_size(fn, "*args", args,
                                fix="pass only batched data in *args (close over constants in loss_fn).")


def _jvp_of_grad(loss_fn, params, args):
    """v ↦ ∇²loss_fn(params, *args) v: the primitive every curvature product uses.

    (Solvers put the convolutions of the operators built on it into XLA:CPU's
    fast layout where the operator enters their loop: ``gifjax.solvers``.)
    """
    return lambda v: jax.jvp(lambda p: jax.grad(loss_fn)(p, *args), (params,), (v,))[1]


def _damp(hv, v, damping):
    if isinstance(damping, (int, float)) and damping == 0:
        return hv
    return _tree.axpy(damping, v, hv)


# ----------------------------------------------------------------------------- Gauss–Newton


@dataclasses.dataclass(frozen=True)
class GGN:
    r"""Generalised Gauss–Newton curvature spec: ``curvature=gifjax.GGN(apply_fn, output_loss)``.

    With outputs f(θ) = ``apply_fn(θ, *args)``, J = ∂f/∂θ, the output loss
    L_out(o) = ``output_loss(o, *args)`` and H_out = ∇²_o L_out at o = f(θ),

        G = Jᵀ H_out J  (+ ∇²R when ``regularizer`` = R is given).

    G drops the term Σ_k ∂L_out/∂o_k · ∇²f_k of the Hessian of L_out ∘ f, so it
    is positive semi-definite whenever L_out and R are convex (cross-entropy
    on logits, squared error), also on non-convex networks — CG then works
    without extra damping. Use it where the training objective is
    ``loss_fn(θ, *args) = output_loss(apply_fn(θ, *args), *args) + R(θ)``; with a
    GGN spec gifjax never differentiates ``loss_fn`` itself for curvature.

    Fields (static; the spec is hashable and closes over no data):
      apply_fn: ``apply_fn(params, *args) -> outputs`` (any pytree, e.g. logits
        [N, C] for the whole batch).
      output_loss: ``output_loss(outputs, *args) -> scalar`` (the *mean* loss
        over the batch, as in ``loss_fn``).
      regularizer: optional ``regularizer(params) -> scalar`` (e.g. L2 weight
        decay ½·wd·‖θ‖², whose curvature wd·I is then added exactly).

    Example:
      >>> import jax, jax.numpy as jnp, gifjax, optax
      >>> apply = lambda w, x, y: x @ w
      >>> out_loss = lambda z, x, y: optax.softmax_cross_entropy_with_integer_labels(z, y).mean()
      >>> ggn = gifjax.GGN(apply, out_loss, regularizer=lambda w: 0.5e-2 * jnp.sum(w ** 2))
      >>> x, y = jnp.ones((4, 3)), jnp.array([0, 1, 0, 1])
      >>> gifjax.ggn_product(ggn, jnp.zeros((3, 2)), jnp.ones((3, 2)), x, y).shape
      (3, 2)

    Warning:
      G equals the Hessian only where the residual term vanishes (at an
      interpolating optimum, or for a model linear in θ); influence computed
      with G answers the Gauss–Newton (linearised-network) question.
    """

    apply_fn: Callable
    output_loss: Callable
    regularizer: Callable | None = None


def check_ggn(fn: str, ggn) -> GGN:
    """``ggn`` must be a :class:`GGN` with callable fields (checked in Python)."""
    if not isinstance(ggn, GGN):
        raise _checks.error(fn, "curvature", repr(ggn), '"hessian" or gifjax.GGN(apply_fn, output_loss)',
                            "pass curvature=gifjax.GGN(apply_fn, output_loss) for Gauss–Newton curvature.")
    for name in ("apply_fn", "output_loss"):
        if not callable(getattr(ggn, name)):
            raise _checks.error(fn, f"curvature.{name}", repr(getattr(ggn, name)), "a callable",
                                f"pass {name} as a function (see gifjax.GGN).")
    if ggn.regularizer is not None and not callable(ggn.regularizer):
        raise _checks.error(fn, "curvature.regularizer", repr(ggn.regularizer), "a callable or None",
                            "pass regularizer=lambda params: ... or leave it out.")
    return ggn


def ggn_product(ggn: GGN, params, v, *args, damping=0.0):
    """Gauss–Newton product (Jᵀ H_out J + ∇²R + λI) v (see :class:`GGN`).

    J v by ``jax.jvp`` of the model outputs, H_out (J v) by :func:`hvp` of the
    output loss in output space, Jᵀ(·) by ``jax.vjp``; ∇²R v by :func:`hvp`.

    Args:
      ggn: a :class:`GGN` spec (static).
      params: pytree; v: pytree like ``params`` (traced); ``*args`` the data.
      damping: λ ≥ 0 (traced).

    Returns:
      A pytree like ``params``.
    """
    check_ggn("ggn_product", ggn)
    _checks.check_like("ggn_product", "v", v, params)
    _checks.check_nonnegative("ggn_product", "damping", damping)
    model = lambda p: ggn.apply_fn(p, *args)
    out, jv = jax.jvp(model, (params,), (v,))
    hjv = hvp(ggn.output_loss, out, jv, *args)
    gv = jax.vjp(model, params)[1](hjv)[0]
    if ggn.regularizer is not None:
        gv = _tree.add(gv, hvp(ggn.regularizer, params, v))
    return _damp(gv, v, damping)


def linearize_ggn(ggn: GGN, params, *args, damping=0.0):
    """Linearise once; return ``v ↦ (G + λI) v`` (the operator form of :func:`ggn_product`).

    The model is linearised once (``jax.linearize``) and its transpose taken
    with ``jax.linear_transpose``, so each product runs only the tangent and
    cotangent passes, never the forward pass again.
    """
    check_ggn("linearize_ggn", ggn)
    _checks.check_nonnegative("linearize_ggn", "damping", damping)
    out, jvp_fn = jax.linearize(lambda p: ggn.apply_fn(p, *args), params)
    vjp_fn = jax.linear_transpose(jvp_fn, params)
    h_out = linearize_hvp(ggn.output_loss, out, *args)
    h_reg = None if ggn.regularizer is None else linearize_hvp(ggn.regularizer, params)

    jtj = lambda v: vjp_fn(h_out(jvp_fn(v)))[0]

    def op(v):
        gv = jtj(v)
        if h_reg is not None:
            gv = _tree.add(gv, h_reg(v))
        return _damp(gv, v, damping)

    return op


# ----------------------------------------------------------------------------- traces


def hutchinson_trace(matvec: Callable, like, *, key, num_samples: int = 16, mask=None):
    r"""Hutchinson estimate of tr(P A P) = E[zᵀ A z] over Rademacher z = P z.

        tr ≈ (1/S) Σ_s z_sᵀ A z_s,   z_s ∈ {±1}^p masked by P,

    unbiased, with variance 2 Σ_{i≠j} A_ij² / S (on the mask). The S products
    are one vmapped call of ``matvec``.

    Args:
      matvec: symmetric operator on pytrees like ``like``.
      like: pytree fixing structure and dtype.
      key: PRNG key (traced); the estimate is deterministic given the key.
      num_samples: S (static, ≥ 1).
      mask: optional boolean element mask P (traced).

    Returns:
      The scalar trace estimate.

    Example:
      >>> import jax, jax.numpy as jnp, gifjax
      >>> A = jnp.diag(jnp.arange(1.0, 5.0))
      >>> float(gifjax.hutchinson_trace(lambda v: A @ v, jnp.zeros(4), key=jax.random.key(0)))
      10.0
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise _checks.error("hutchinson_trace", "num_samples", repr(num_samples), "a positive int",
                            "pass e.g. num_samples=16 (the error falls as 1/sqrt(num_samples)).")
    flat, unravel = jax.flatten_util.ravel_pytree(like)
    signs = jax.random.rademacher(key, (num_samples, flat.shape[0]), flat.dtype)
    zs = jax.vmap(lambda z: _masks.apply(mask, unravel(z)))(signs)
    quad = jax.vmap(lambda z: _tree.vdot(z, matvec(z)))(zs)
    return jnp.mean(quad)


# ----------------------------------------------------------------------------- mixed precision


def mixed_precision(loss_fn, dtype=jnp.bfloat16):
    r"""``loss_fn`` evaluated in a low precision ``dtype``: bfloat16 HVPs, float32 solver state.

    Returns ``low(θ, *args) = up(loss_fn(down(θ), *down(args)))``: ``down``
    casts every floating array leaf of the inputs to ``dtype`` (integer leaves
    such as labels, and Python scalars, are left alone) and ``up`` casts every
    floating leaf of the output back to the dtype of θ's floating leaves. The
    transpose of a cast is the reverse cast, so in the product every gifjax
    curvature operator takes (jvp of grad),

        H_low v = up(∇²_θ loss_fn(down(θ), …) · down(v)),

    the forward, backward and tangent passes — their matmuls, convolutions
    and element-wise ops — run in ``dtype``, while v and H v, and with them
    every solver's iterates, residuals, inner products and the damping term
    λv, stay in θ's dtype (float32). Pass the result wherever a ``loss_fn``
    defines curvature (:func:`gifjax.influence`, :func:`gifjax.adjoint_solve`,
    :func:`gifjax.influence_scores`, :func:`gifjax.sweep.score_stream`,
    :func:`gifjax.hvp` …); gradients of the data (``g``, ``example_loss_fn``)
    stay in full precision.

    Any function works, not only losses: wrapping just the model,
    ``apply16 = mixed_precision(apply_fn)``, and writing the loss on its
    (float32) outputs keeps the softmax / cross-entropy in float32 — the
    matmuls, nearly all the work, still run in bfloat16, and the products are
    about 4× more accurate (digits MLP, ``benchmarks/precision.py``: relative
    error of H v 0.7 % vs 3.3 % for the whole loss in bfloat16). This is the
    recommended use; with a :class:`GGN` spec it is what this function does.

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar`` (or any function whose
        first argument fixes the dtype its floating outputs come back in,
        e.g. ``apply_fn(params, x) -> logits``); or a :class:`GGN` spec, of
        which only ``apply_fn`` is wrapped (the output loss and regulariser
        stay in full precision).
      dtype: a floating dtype (static), default ``jnp.bfloat16``;
        ``jnp.float16`` works too, and so does ``jnp.float32`` for float64
        parameters under ``jax_enable_x64``.

    Returns:
      A function with ``loss_fn``'s signature (or a :class:`GGN`).

    Example:
      >>> import jax.numpy as jnp, gifjax
      >>> X = jnp.array([[1.0, 2.0], [3.0, 1.0], [0.5, -1.0]]); y = jnp.array([1.0, 0.0, 2.0])
      >>> apply16 = gifjax.mixed_precision(lambda w, X: X @ w)   # the model in bfloat16
      >>> loss = lambda w, X, y: 0.5 * jnp.mean((apply16(w, X) - y) ** 2) + 0.05 * w @ w
      >>> g = jnp.array([0.3, -0.2])
      >>> out = gifjax.influence(loss, jnp.zeros(2), g, X, y, method="if", damping=0.01)
      >>> out.delta.dtype                               # float32 solver state and result
      dtype('float32')
      >>> low = gifjax.mixed_precision(loss)            # or the whole loss in bfloat16
      >>> gifjax.hvp(low, jnp.zeros(2), g, X, y).dtype
      dtype('float32')

    Warning:
      bfloat16 keeps 8 significant bits (ε = 2⁻⁸ ≈ 0.4 %, about 3 decimal
      digits). Each product carries a relative error of a few ε — more where
      the loss cancels, as softmax cross-entropy does on confident
      predictions — and a solve amplifies it by up to κ(H_λ): *use damping*.
      Tolerances below ~1e-2 are not met in truth: CG's recurrence residual
      keeps falling and reports ``converged`` while the true residual stalls
      at the noise floor (digits MLP, rtol 1e-4: true residual 1.2e-2, 7e-2
      with the whole loss in bfloat16), and LSTSQ run past that floor
      *diverges* (its stopping floor is float32's, 16·eps, far below
      bfloat16's noise): values up to 1e22, flagged ``max_steps`` /
      ``nonfinite``. Discard
      unconverged solves, give GIF ``rtol`` ≳ 1e-2, and report the cost
      against a float32 run on your model — on the digits MLP
      (``benchmarks/precision.py``), bfloat16 model products change IF
      influence scores by 0.6 % (Spearman ≥ 0.999 per test point) and GIF
      scores by 1.9 % (median Spearman 0.998). Speed needs native bfloat16
      matmuls (TPU, recent GPUs): XLA:CPU converts them to float32 and runs
      1.3–2× *slower*. Do not wrap the loss you take gradients from
      (``removal_gradient``, ``example_loss_fn``): that error would enter
      every score directly.
    """
    fn = "mixed_precision"
    dtype = _low_precision_dtype(fn, dtype)
    if isinstance(loss_fn, GGN):  # the model does the work; its output loss is cheap and fragile
        check_ggn(fn, loss_fn)
        return dataclasses.replace(loss_fn, apply_fn=mixed_precision(loss_fn.apply_fn, dtype))
    if not callable(loss_fn):
        raise _checks.error(fn, "loss_fn", repr(loss_fn), "a callable loss_fn(params, *args) or a gifjax.GGN",
                            "pass the training objective, e.g. mixed_precision(loss_fn).")

    def is_float(a):
        return hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating)

    def cast(tree, to):
        return jax.tree_util.tree_map(
            lambda a: jax.lax.convert_element_type(a, to) if is_float(a) else a, tree)

    @functools.wraps(loss_fn)
    def low(params, *args):
        floats = [a.dtype for a in jax.tree_util.tree_leaves(params) if is_float(a)]
        out = loss_fn(cast(params, dtype), *cast(args, dtype))
        return cast(out, jnp.result_type(*floats)) if floats else out

    return low


def _low_precision_dtype(fn, dtype):
    try:  # jnp.dtype(None) is the default float: refuse it, the choice should be explicit
        dt = None if dtype is None else jnp.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or not jnp.issubdtype(dt, jnp.floating):
        raise _checks.error(fn, "dtype", repr(dtype), "a real floating dtype such as jnp.bfloat16",
                            "pass dtype=jnp.bfloat16 (or jnp.float16).")
    return dt
