"""Input checks that fail early, in Python, with one message format (private).

Every message names the public function and the argument, shows what was got
and what was expected, and says how to fix it.
"""

from __future__ import annotations

import jax
import numpy as np


def error(fn: str, arg: str, got, expected, fix: str, kind=ValueError):
    """Build (not raise) an exception with gifjax's message format."""
    return kind(
        f"gifjax.{fn}: bad `{arg}`: got {got}; expected {expected}. Fix: {fix}"
    )


def leading_size(fn: str, arg: str, tree, *, nonempty: bool = False,
                 fix: str = "stack the examples along axis 0, e.g. (x, y) with x.shape[0] == y.shape[0].") -> int:
    """The one leading-axis length n shared by every array leaf of ``tree`` (checked).

    ``nonempty`` also refuses n = 0.
    """
    leaves = jax.tree_util.tree_leaves(tree)
    sizes = {np.shape(a)[0] if np.ndim(a) else None for a in leaves}
    if not leaves or None in sizes or len(sizes) != 1 or (nonempty and 0 in sizes):
        raise error(fn, arg, f"leading axes {sorted(map(str, sizes))}",
                    "arrays sharing one leading batch axis" + (" of n >= 1" if nonempty else ""), fix)
    return sizes.pop()


def is_concrete(x) -> bool:
    """True when ``x`` holds values now (not a tracer inside jit/vmap)."""
    return not isinstance(x, jax.core.Tracer)


def check_choice(fn: str, arg: str, value, choices):
    if value not in choices:
        raise error(
            fn, arg, repr(value), f"one of {sorted(choices)}",
            f"pass one of {', '.join(repr(c) for c in sorted(choices))}.",
        )
    return value


def check_positive_int(fn: str, arg: str, value, *, example: str | None = None) -> int:
    """``value`` must be a positive Python or NumPy integer (not a bool); returns an int."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise error(fn, arg, repr(value), "a positive int",
                    f"pass e.g. {example or arg + '=16'}.")
    return int(value)


def check_nonnegative(fn: str, arg: str, value):
    """Reject negative (or non-finite) numbers when they are known in Python."""
    if value is None or not is_concrete(value):
        return value
    arr = np.asarray(value)
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise error(fn, arg, value, "a finite number >= 0",
                    f"pass `{arg}` as a non-negative float (0 disables it).")
    return value


def check_like(fn: str, arg: str, tree, reference, ref_name: str = "params"):
    """``tree`` must have ``reference``'s structure and leaf shapes.

    Leading batch axes are not allowed here: single-example functions are
    batched with ``jax.vmap`` by the caller.
    """
    ref_def = jax.tree_util.tree_structure(reference)
    got_def = jax.tree_util.tree_structure(tree)
    if ref_def != got_def:
        raise error(
            fn, arg, f"tree structure\n  {got_def}",
            f"the structure of `{ref_name}`\n  {ref_def}\n",
            f"build `{arg}` with jax.tree_util.tree_map over `{ref_name}` so the trees match.",
        )
    for path, a, b in zip(
        tree_paths(reference), jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(reference)
    ):
        if np.shape(a) != np.shape(b):
            raise error(
                fn, arg, f"shape {np.shape(a)} at {path}",
                f"shape {np.shape(b)} (as in `{ref_name}`)",
                f"give `{arg}` one entry per parameter; to batch, jax.vmap over this function.",
            )
    return tree


def tree_paths(tree):
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
