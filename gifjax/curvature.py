"""Curvature products over pytrees: HVPs, the one curvature primitive.

Everything in gifjax that touches curvature goes through forward-over-reverse
differentiation, ``jax.jvp(jax.grad(f), (θ,), (v,))``: one HVP costs a small
constant times one gradient and never forms H. The other forms compose on it:

* :func:`hvp`             H v at one point (plus optional damping λ v);
* :func:`linearize_hvp`   linearise once, then v ↦ H v many times (solvers);
* :func:`batched_hvp`     (1/n) Σ_i ∇²ℓ_i v over fixed-size chunks of a large
                          batch with ``lax.scan``; memory bounded by one chunk;
* :func:`masked_hvp`      P H P v for an element mask P.

This module knows nothing of solvers; masks enter only as multiplications.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from . import _checks, _tree
from . import masks as _masks


def hvp(loss_fn: Callable, params, v, *args, damping=0.0):
    """Hessian-vector product (H + λI) v of ``loss_fn`` at ``params``.

    H = ∇²_θ loss_fn(θ, *args) at θ = params, computed as
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
    hv = jax.jvp(lambda p: jax.grad(loss_fn)(p, *args), (params,), (v,))[1]
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

    def chunk_hvp(chunk_args, v):
        return jax.jvp(lambda p: jax.grad(loss_fn)(p, *chunk_args), (params,), (v,))[1]

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


def masked_hvp(loss_fn: Callable, params, v, mask, *args, damping=0.0):
    """P (H + λI) P v for an element ``mask`` P (``None`` → plain HVP).

    Exactly zero outside the mask. See :mod:`gifjax.masks` for mask rules.
    """
    mask = _masks.validate(mask, params, fn="masked_hvp")
    return _masks.apply(mask, hvp(loss_fn, params, _masks.apply(mask, v), *args, damping=damping))


def batch_size_of(fn: str, args) -> int:
    """Common leading-axis length of all array leaves of ``args`` (checked)."""
    leaves = jax.tree_util.tree_leaves(args)
    sizes = {jnp.shape(a)[0] if jnp.ndim(a) else None for a in leaves}
    if not leaves or None in sizes or len(sizes) != 1:
        raise _checks.error(
            fn, "*args", f"leading axes {sorted(map(str, sizes))}",
            "every array in *args to share one leading batch axis",
            "pass only batched data in *args (close over constants in loss_fn).",
        )
    return sizes.pop()


def _damp(hv, v, damping):
    if isinstance(damping, (int, float)) and damping == 0:
        return hv
    return _tree.axpy(damping, v, hv)
