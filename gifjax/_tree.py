"""Pytree linear algebra used by the solvers (private).

Every function treats a pytree of arrays as one flat vector. Inner products
accumulate in the leaves' dtype at the highest matmul precision, so float64
runs are exact to rounding and float32 runs are not silently downgraded to
bfloat16 on accelerators.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

tree_map = jax.tree_util.tree_map


def vdot(x, y):
    """Σ over leaves of ⟨x_leaf, y_leaf⟩ (a scalar)."""
    leaves = jax.tree_util.tree_leaves(
        tree_map(lambda a, b: jnp.vdot(a, b, precision=jax.lax.Precision.HIGHEST), x, y)
    )
    return functools.reduce(jnp.add, leaves, jnp.zeros((), _result_dtype(x)))


def norm(x):
    """Euclidean norm of the flattened pytree, without overflow or underflow.

    ‖x‖ = s·‖x / s‖ with s = max |x_i|: squaring 1e20 (or 1e-25) in float32
    would give inf (or 0) and a tolerance test that passes for the wrong reason.
    """
    leaves = jax.tree_util.tree_leaves(x)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    s = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(a), initial=0) for a in leaves])
    y = scale(1 / divisor(s), x)
    return jnp.where(jnp.isfinite(s), divisor(s) * jnp.sqrt(vdot(y, y)), s)


def divisor(s):
    """``s`` where it is a usable scale (finite, > 0), else 1."""
    return jnp.where((s > 0) & jnp.isfinite(s), s, 1)


def add(x, y):
    return tree_map(jnp.add, x, y)


def sub(x, y):
    return tree_map(jnp.subtract, x, y)


def scale(alpha, x):
    """alpha * x, keeping each leaf's dtype."""
    return tree_map(lambda a: (alpha * a).astype(a.dtype), x)


def axpy(alpha, x, y):
    """alpha * x + y, keeping each leaf's dtype."""
    return tree_map(lambda a, b: (alpha * a + b).astype(b.dtype), x, y)


def zeros_like(x):
    return tree_map(jnp.zeros_like, x)


def where(cond, x, y):
    """Select whole pytrees by a scalar predicate (vmap turns it per-example)."""
    return tree_map(lambda a, b: jnp.where(cond, a, b), x, y)


def all_finite(x):
    leaves = [jnp.all(jnp.isfinite(a)) for a in jax.tree_util.tree_leaves(x)]
    return functools.reduce(jnp.logical_and, leaves, jnp.array(True))


def rows_finite(tree):
    """[n] bool: every entry of row i (leading axis) of every inexact leaf is finite."""
    leaves = jax.tree_util.tree_leaves(tree)
    n = leaves[0].shape[0]
    ok = jnp.ones((n,), bool)
    for a in leaves:
        if jnp.issubdtype(a.dtype, jnp.inexact):
            ok = ok & jnp.all(jnp.isfinite(a.reshape(n, -1)), axis=1)
    return ok


def _result_dtype(x):
    leaves = jax.tree_util.tree_leaves(x)
    return jnp.result_type(*leaves) if leaves else jnp.float32


def pytree_dataclass(*, static=()):
    """Frozen dataclass registered as a pytree; ``static`` fields are metadata (hashed, not traced)."""

    def wrap(cls):
        cls = dataclasses.dataclass(frozen=True)(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        return jax.tree_util.register_dataclass(
            cls, data_fields=[n for n in names if n not in static], meta_fields=list(static)
        )

    return wrap
