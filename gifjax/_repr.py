"""Compact reprs for result types (private): shapes, dtypes and counts, never whole arrays.

A result of ``influence_scores`` on a real model holds megabytes of arrays; the
default NamedTuple repr would print every number. ``compact_repr`` describes
each field instead::

    Solution(value=f32[64,38282], num_steps=i32[64], ..., converged=60/64, failure={max_steps: 4})

Arrays are ``dtype[shape]``; 0-d arrays and Python scalars print their value;
boolean arrays print how many are true; pytrees of arrays print their leaf
count and total size; nested results print their own compact repr.
"""

from __future__ import annotations

import dataclasses
import reprlib

import jax
import numpy as np

from . import _checks

_DTYPE_PREFIX = (("bfloat", "bf"), ("float", "f"), ("uint", "u"), ("int", "i"), ("complex", "c"))
_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlist, _short.maxtuple, _short.maxdict = 60, 60, 6, 6, 4


def dtype_name(dtype) -> str:
    """``f32``, ``bf16``, ``i64``, ``bool``: the short names jaxprs use."""
    name = np.dtype(dtype).name
    for long, short in _DTYPE_PREFIX:
        if name.startswith(long):
            return short + name[len(long):]
    return name


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _concrete(x) -> bool:
    """Values can be read: not a tracer, and on this process's devices."""
    return _checks.is_concrete(x) and getattr(x, "is_fully_addressable", True)


def describe(x) -> str:
    """One short string for one field value."""
    if _is_array(x):
        shape = f"{dtype_name(x.dtype)}[{','.join(map(str, x.shape))}]"
        if not _concrete(x):
            return shape
        if x.ndim == 0:
            return repr(np.asarray(x).item())
        if x.dtype == bool:
            return f"{int(np.count_nonzero(np.asarray(x)))}/{x.size}"
        return shape
    if getattr(type(x), "_compact_repr", False):
        return repr(x)
    leaves = jax.tree_util.tree_leaves(x)
    if leaves and not isinstance(x, (str, bytes)) and all(map(_is_array, leaves)):
        sizes = sum(int(np.size(leaf)) for leaf in leaves)
        dtypes = "/".join(sorted({dtype_name(leaf.dtype) for leaf in leaves}))
        plural = "s" * (len(leaves) > 1)
        return f"<{type(x).__name__}: {len(leaves)} array{plural}, {sizes:,} {dtypes}>"
    return _short.repr(x)


def _fields(obj):
    if dataclasses.is_dataclass(obj):
        return [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.repr]
    return list(zip(obj._fields, obj))


def compact_repr(**special):
    """Class decorator: ``Name(field=description, ...)`` as the repr.

    ``special`` maps a field name to its own describer (a function of the value).
    """

    def wrap(cls):
        def __repr__(self):
            parts = [f"{name}={special.get(name, describe)(value)}" for name, value in _fields(self)]
            return f"{type(self).__name__}({', '.join(parts)})"

        cls.__repr__ = __repr__
        cls._compact_repr = True
        return cls

    return wrap


def failure_counts(names):
    """A describer for failure codes: ``{max_steps: 3, indefinite: 1}`` (``{}``: none failed)."""

    def counts(failure):
        if not _is_array(failure) or not _concrete(failure):
            return describe(failure)
        codes, n = np.unique(np.asarray(failure).ravel(), return_counts=True)
        name = lambda c: names[int(c)] if 0 <= c < len(names) else f"code {c}"  # noqa: E731
        return "{" + ", ".join(f"{name(c)}: {int(k)}" for c, k in zip(codes, n) if c) + "}"

    return counts
