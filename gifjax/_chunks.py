"""Fixed-size chunking shared by every batched sweep (private).

One padding rule everywhere: a leading axis is padded by repeating its last
example (finite values, so padded rows never create NaNs), and padded rows
are trimmed or masked by the caller.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import _checks

tree_map = jax.tree_util.tree_map


def pad_rows(tree, size: int):
    """Pad every leaf's leading axis to ``size`` rows by repeating its last row.

    Works on NumPy arrays (stays NumPy: host-side streaming) and JAX arrays.
    """
    def pad(a):
        extra = size - np.shape(a)[0]
        if extra <= 0:
            return a
        xp = np if isinstance(a, np.ndarray) else jnp
        return xp.concatenate([a, xp.repeat(a[-1:], extra, axis=0)])

    return tree_map(pad, tree)


def map_in_chunks(fn: Callable, xs, chunk_size: int, *, caller: str = "map_in_chunks",
                  arg: str = "xs", with_valid: bool = False):
    """Apply a batched ``fn`` to ``xs`` (leading axis n) in fixed-size chunks.

    ``fn`` maps a pytree with leading axis ``chunk_size`` to outputs with the
    same leading axis. The chunks run under ``lax.map`` (one compile); the last
    chunk is padded (:func:`pad_rows`) and the padding trimmed. With
    ``with_valid``, ``fn(chunk, valid)`` also gets the chunk's boolean row
    mask (False on padding), e.g. to count only real rows.
    """
    chunk_size = _checks.check_positive_int(caller, "chunk size", chunk_size, example="test_chunk_size=16")
    n = _checks.leading_size(caller, arg, xs) if jax.tree_util.tree_leaves(xs) else 0
    if n == 0:
        raise _checks.error(caller, arg, "no examples", "a pytree with a leading batch axis n ≥ 1",
                            "pass at least one example.")
    chunk = min(chunk_size, n)
    num = -(-n // chunk)
    padded = pad_rows(xs, num * chunk)
    stacked = tree_map(lambda a: a.reshape((num, chunk) + a.shape[1:]), padded)
    if with_valid:
        valid = (jnp.arange(num * chunk) < n).reshape(num, chunk)
        out = jax.lax.map(lambda c: fn(*c), (stacked, valid))
    else:
        out = jax.lax.map(fn, stacked)
    return tree_map(lambda a: a.reshape((num * chunk,) + a.shape[2:])[:n], out)
