"""Input checks that fail early, in Python, with one message format (private).

Every message names the public function and the argument, shows what was got
and what was expected, and says how to fix it.
"""

from __future__ import annotations

import dataclasses
import operator

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


def check_example_loss(fn: str, example_loss_fn, params, examples, arg: str):
    """``example_loss_fn(params, one example)`` traces and returns a scalar (checked abstractly).

    ``examples`` holds n examples stacked along axis 0 of every leaf; the
    function is traced (``jax.eval_shape``, nothing computed) on the first
    one. Catches a loss written for a batch (non-scalar output) and examples
    that don't have the structure the loss unpacks (a bare ``x`` for a loss
    reading ``x, y = example``), with the example's structure in the message.
    """
    leading_size(fn, arg, examples)
    first = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a)[1:], a.dtype), examples)
    shapes = lambda tree: jax.tree_util.tree_map(lambda a: f"{np.dtype(a.dtype).name}{list(a.shape)}", tree)  # noqa: E731
    fix = ("write `example_loss_fn(params, example) -> scalar` for ONE example: gifjax vmaps it over "
           f"axis 0 of `{arg}`. For a batch loss use `lambda p, e: batch_loss(p, jax.tree.map(lambda a: "
           f"a[None], e))`; if the loss unpacks `x, y = example`, pass `{arg}=(x, y)`, not `x` alone.")
    try:
        out = jax.eval_shape(example_loss_fn, params, first)
    except Exception as e:  # the user's function failed on what gifjax passes it: say what that was
        raise error(fn, "example_loss_fn", f"{type(e).__name__}: {e}".splitlines()[0][:300],
                    f"a function of (params, example) where one example of `{arg}` is {shapes(first)}",
                    fix) from e
    leaves = jax.tree_util.tree_leaves(out)
    if len(leaves) != 1 or leaves[0].shape != ():
        raise error(fn, "example_loss_fn", f"output {shapes(out)} for one example {shapes(first)} of `{arg}`",
                    "a scalar loss per example", fix)


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


def as_int(value):
    """``value`` as a Python int if it is an integer scalar, else ``None``.

    Accepts Python ints, NumPy integer scalars and concrete 0-d integer
    arrays (NumPy or JAX); refuses bools, floats (even integral ones such as
    ``3.0``), strings and tracers.
    """
    if isinstance(value, (bool, np.bool_)) or not is_concrete(value):
        return None
    dtype = getattr(value, "dtype", None)
    if dtype is not None and (np.ndim(value) != 0 or not np.issubdtype(dtype, np.integer)):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_int(fn: str, arg: str, value, *, minimum: int = 1, allow_none: bool = False,
              example: str | None = None):
    """``value`` must be an integer ≥ ``minimum`` (Python or NumPy; :func:`as_int`); returns an int.

    With ``allow_none``, ``None`` passes through (meaning "the default").
    """
    if value is None and allow_none:
        return None
    got = as_int(value)
    if got is None or got < minimum:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise error(fn, arg, repr(value), ("None or " if allow_none else "") + what,
                    f"pass e.g. {example or arg + '=16'}"
                    + (" (or None for the default)." if allow_none else "."))
    return got


def check_positive_int(fn: str, arg: str, value, *, example: str | None = None) -> int:
    """``value`` must be a positive Python or NumPy integer (not a bool); returns an int."""
    return check_int(fn, arg, value, minimum=1, example=example)


def check_number(fn: str, arg: str, value, *, minimum: float = 0.0, strict: bool = False,
                 allow_none: bool = False, example: str | None = None):
    """``value`` must be a finite real number ≥ ``minimum`` (> with ``strict``), where known.

    Python, NumPy and JAX scalars (or arrays: every entry is checked) are
    accepted; tracers pass through unchecked (inside ``jit`` they cannot be
    read); with ``allow_none``, ``None`` passes. Returns ``value`` unchanged.
    """
    if value is None and allow_none:
        return None
    if not is_concrete(value):
        return value
    bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
    expected = ("None or " if allow_none else "") + f"a finite real number {bound}"
    fix = f"pass e.g. {example or arg + '=1e-6'}" + (" (or None for the default)." if allow_none else ".")
    try:
        if isinstance(value, (str, bytes, bool, np.bool_)) or value is None:
            raise TypeError
        raw = np.asarray(value)
        if raw.dtype == bool or np.iscomplexobj(raw) or not (
                np.issubdtype(raw.dtype, np.number) or raw.dtype.kind == "V"):  # "V": bfloat16 & co.
            raise TypeError
        arr = raw.astype(np.float64)
    except (TypeError, ValueError):
        raise error(fn, arg, repr(value), expected, fix) from None
    if not np.all(np.isfinite(arr)) or np.any(arr <= minimum if strict else arr < minimum):
        raise error(fn, arg, repr(value), expected, fix)
    return value


# How each solver / factorisation field is checked (see check_solver_config).
_SOLVER_RULES = {
    "rtol": dict(kind="number", allow_none=True, example="rtol=1e-6"),
    "atol": dict(kind="number", allow_none=True, example="atol=0.0"),
    "rcond": dict(kind="number", allow_none=True, example="rcond=1e-6"),
    "damping": dict(kind="number", example="damping=0.01"),
    "scale": dict(kind="number", strict=True, allow_none=True, example="scale=10.0"),
    "max_steps": dict(kind="int", minimum=1, allow_none=True, example="max_steps=1000"),
    "num_steps": dict(kind="int", minimum=1, example="num_steps=100"),
    "num_power_steps": dict(kind="int", minimum=1, example="num_power_steps=20"),
    "restarts": dict(kind="int", minimum=0, example="restarts=2"),
    "max_restarts": dict(kind="int", minimum=0, example="max_restarts=1000"),
    "batch_size": dict(kind="int", minimum=1, allow_none=True, example="batch_size=32"),
    "rank": dict(kind="int", minimum=1, example="rank=50"),
}


def check_solver_config(name: str, **fields) -> dict:
    """Validate solver configuration fields in Python; returns them normalised.

    ``name`` is the owner as it appears in messages (e.g. ``"solvers.CG"``).
    Known fields and their rules: ``rtol``, ``atol``, ``rcond`` — ``None`` or
    a finite number ≥ 0 (NaN and ±Inf refused); ``damping`` — finite ≥ 0;
    ``scale`` — ``None`` or finite > 0; ``max_steps``, ``batch_size`` —
    ``None`` or an int ≥ 1; ``num_steps``, ``num_power_steps``, ``rank`` — an
    int ≥ 1; ``restarts`` — an int ≥ 0. Integers may be Python or NumPy
    integers (returned as ``int``); floats such as ``10.0`` are refused for
    integer fields. Traced values pass unchecked. Unknown field names are a
    programming error (``KeyError``).

    Example:
      >>> check_solver_config("solvers.CG", rtol=1e-6, max_steps=np.int64(50))
      {'rtol': 1e-06, 'max_steps': 50}
    """
    out = {}
    for arg, value in fields.items():
        rule = dict(_SOLVER_RULES[arg])
        kind = rule.pop("kind")
        out[arg] = (check_int if kind == "int" else check_number)(name, arg, value, **rule)
    return out


def check_solver(name: str, solver) -> dict:
    """:func:`check_solver_config` on every known field of a solver dataclass value."""
    fields = {f.name: getattr(solver, f.name) for f in dataclasses.fields(solver)
              if f.name in _SOLVER_RULES}
    return check_solver_config(name, **fields)


def check_nonnegative(fn: str, arg: str, value):
    """Reject negative (or non-finite) numbers when they are known in Python."""
    if value is None or not is_concrete(value):
        return value
    arr = np.asarray(value)
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise error(fn, arg, value, "a finite number >= 0",
                    f"pass `{arg}` as a non-negative float (0 disables it).")
    return value


def _float_dtype(a):
    """The dtype of a strongly typed floating array leaf, else ``None`` (Python scalars, weak types)."""
    if isinstance(a, (int, float, complex)) or not hasattr(a, "dtype"):
        return None
    if isinstance(a, jax.Array) and getattr(a, "weak_type", False):
        return None
    return a.dtype if np.issubdtype(a.dtype, np.inexact) or a.dtype.kind == "V" else None


#: Arguments that meet ``params`` in a curvature product (jvp): their floating dtypes must match.
CURVATURE_VECTORS = frozenset({"g", "test_grad", "test_grads", "v", "start"})


def check_like(fn: str, arg: str, tree, reference, ref_name: str = "params", *,
               dtype: bool | None = None):
    """``tree`` must have ``reference``'s structure and leaf shapes (and floating dtypes).

    Leading batch axes are not allowed here: single-example functions are
    batched with ``jax.vmap`` by the caller. With ``dtype``, a floating leaf
    must also have the floating dtype of the reference leaf (both strongly
    typed arrays; Python scalars, weakly typed values and non-floating
    leaves such as boolean masks are not compared): a float16 ``g`` for
    float32 ``params`` would otherwise fail deep inside an HVP ("linearized
    function called on tangent values inconsistent…"). ``dtype=None`` (the
    default) checks exactly the vectors that enter curvature products
    (:data:`CURVATURE_VECTORS`: ``g``, ``test_grad(s)``, ``v``, ``start``).
    """
    if dtype is None:
        dtype = arg in CURVATURE_VECTORS
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
        da, db = (_float_dtype(a), _float_dtype(b)) if dtype else (None, None)
        if da is not None and db is not None and da != db:
            raise error(
                fn, arg, f"dtype {da} at {path or 'the root'}", f"dtype {db} (as in `{ref_name}`)",
                f"cast `{arg}` to `{ref_name}`'s dtypes, e.g. jax.tree_util.tree_map(lambda a, p: "
                f"a.astype(p.dtype), {arg}, {ref_name}) (or compute it from `{ref_name}` itself).",
                kind=TypeError,
            )
    return tree


def tree_paths(tree):
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
