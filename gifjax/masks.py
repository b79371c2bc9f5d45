"""Element masks: which parameters an estimator may change.

A *mask* is a pytree of booleans with exactly the structure and leaf shapes
of ``params``; ``True`` marks a *target* parameter (θ_t in the paper), ``False``
a fixed one (θ_f). ``None`` everywhere means "all parameters". Masks are
ordinary arrays, so they can be traced, vmapped and swept without recompiling;
they are applied multiplicatively, P_t v = mask ⊙ v.

Functions that must know the mask's values in Python (``gather``, ``scatter``,
and the eager checks in ``validate``) say so in their docstrings.

Example:
    >>> import jax, jax.numpy as jnp, gifjax
    >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    >>> mask = gifjax.masks.random_mask(jax.random.key(0), params, count=4)
    >>> int(gifjax.masks.count(mask))
    4
"""

from __future__ import annotations

import functools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from . import _checks

__all__ = ["apply", "count", "flat_indices", "fraction", "full_mask", "gather", "random_mask", "scatter", "size", "validate"]

tree_map = jax.tree_util.tree_map


def full_mask(params):
    """All-true mask shaped like ``params`` (the explicit form of ``None``)."""
    return tree_map(lambda p: jnp.ones(jnp.shape(p), bool), params)


def validate(mask, params, *, fn: str = "masks.validate", allow_empty: bool = False):
    """Check ``mask`` against ``params`` and return it (``None`` → all-true).

    Checks, each with a message naming ``fn``: the tree structure (both are
    printed on mismatch), every leaf's shape, a boolean dtype, and — when the
    values are concrete — that at least one parameter is selected.
    """
    if mask is None:
        return full_mask(params)
    _checks.check_like(fn, "mask", mask, params)
    for path, leaf in zip(_checks.tree_paths(params), jax.tree_util.tree_leaves(mask)):
        dtype = jnp.asarray(leaf).dtype if not hasattr(leaf, "dtype") else leaf.dtype
        if dtype != jnp.bool_:
            raise _checks.error(
                fn, "mask", f"dtype {dtype} at {path}", "bool",
                "build masks with comparisons (e.g. `scores > t`) or `.astype(bool)`; "
                "masks select, they do not weight.", kind=TypeError,
            )
    if not allow_empty and all(_checks.is_concrete(m) for m in jax.tree_util.tree_leaves(mask)):
        # numpy, not jnp: inside an outer trace jnp ops on constants are staged out
        if sum(int(np.count_nonzero(np.asarray(m))) for m in jax.tree_util.tree_leaves(mask)) == 0:
            raise _checks.error(
                fn, "mask", "a mask with no True entry", "at least one target parameter",
                "select some parameters (e.g. gifjax.selection.select with a larger ratio).",
            )
    return mask


def count(mask):
    """Number of selected parameters (an int32/64 scalar; traceable)."""
    return sum(jnp.sum(m, dtype=jnp.int32) for m in jax.tree_util.tree_leaves(mask))


def size(tree) -> int:
    """Total number of entries in a pytree (static)."""
    return sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(tree))


def fraction(mask):
    """Selected fraction of all parameters, in [0, 1]."""
    return count(mask) / size(mask)


def apply(mask, tree):
    """P_t v: zero every entry of ``tree`` outside ``mask`` (``None`` → unchanged)."""
    if mask is None:
        return tree
    return tree_map(lambda m, x: jnp.where(m, x, jnp.zeros_like(x)), mask, tree)


def gather(tree, mask):
    """Flat vector of the selected entries, in ``ravel_pytree`` order.

    Needs a concrete mask (its count fixes the output shape); intended for
    dense references: ``H_t = gather_matrix``-style slicing of ``jax.hessian``.
    """
    flat_tree, _ = jax.flatten_util.ravel_pytree(tree)
    return flat_tree[flat_indices(mask)]


def scatter(values, mask, like):
    """Inverse of :func:`gather`: a pytree like ``like``, ``values`` on the mask, 0 elsewhere."""
    flat_like, unravel = jax.flatten_util.ravel_pytree(like)
    flat = jnp.zeros_like(flat_like).at[flat_indices(mask)].set(values)
    return unravel(flat)


def flat_indices(mask) -> np.ndarray:
    """Indices of the selected entries in the ``ravel_pytree`` vector (concrete mask)."""
    flat_mask, _ = jax.flatten_util.ravel_pytree(tree_map(lambda m: np.asarray(m, np.int8), mask))
    return np.flatnonzero(np.asarray(flat_mask))


def random_mask(key, params, *, count: int | None = None, fraction: float | None = None):
    """Uniformly random element mask with an *exact* number of selected entries.

    Give either ``count`` (1 ≤ count ≤ size) or ``fraction`` in (0, 1]
    (count = max(1, floor(fraction · size))). Deterministic given ``key``.
    """
    total = size(params)
    if (count is None) == (fraction is None):
        raise _checks.error("masks.random_mask", "count/fraction", f"count={count}, fraction={fraction}",
                            "exactly one of them", "pass count=k or fraction=r, not both.")
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise _checks.error("masks.random_mask", "fraction", fraction, "a value in (0, 1]",
                                "pass e.g. fraction=0.05 for 5 % of the parameters.")
        count = max(1, int(np.floor(fraction * total)))
    if not 1 <= count <= total:
        raise _checks.error("masks.random_mask", "count", count, f"an int in [1, {total}]",
                            "choose at most as many entries as there are parameters.")
    leaves, treedef = jax.tree_util.tree_flatten(params)
    return _random_mask(key, treedef, tuple(tuple(np.shape(a)) for a in leaves), count)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))  # one program, not one compile per primitive
def _random_mask(key, treedef, shapes, count):
    sizes = [int(np.prod(s)) for s in shapes]
    chosen = jax.random.permutation(key, sum(sizes))[:count]
    flat = jnp.zeros(sum(sizes), bool).at[chosen].set(True)
    parts = jnp.split(flat, np.cumsum(sizes)[:-1])  # ravel_pytree's order: leaves in turn, row-major
    return jax.tree_util.tree_unflatten(treedef, [part.reshape(s) for part, s in zip(parts, shapes)])
