"""Progress bars for long calls, ticked from inside their compiled programs (private).

A long call (:func:`gifjax.influence_scores` over many test chunks, say) runs
as one jitted program, so Python never sees the chunks go by. The program
reports each finished chunk through ``jax.debug.callback`` (:func:`report`,
carrying the chunk's ``converged`` flags); on the host, :func:`bar` opens a
tqdm bar that those reports advance, with the count of converged queries so
far as its postfix.

The rule every long call follows (``progress=`` keyword):

* ``None`` (default): a bar when the call runs outside any transformation
  (not under the caller's ``jit`` / ``vmap`` / ``grad`` / ``shard_map``), has
  more than one chunk, and the environment variable ``GIFJAX_PROGRESS`` is
  not ``0``; otherwise nothing is emitted at all.
* ``False``: nothing.
* ``True``: the program always reports (e.g. inside ``shard_map`` for the
  bar :mod:`gifjax.parallel` opens around it); a bar opens only outside
  transformations. Reports with no open bar are dropped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import threading

import jax
import numpy as np

from . import _checks

_LOCK = threading.Lock()
_OPEN: list = []  # the open bars, innermost last (reports go to it)


def env_on() -> bool:
    """False when the environment variable ``GIFJAX_PROGRESS`` is ``0`` / ``false`` / ``off``."""
    return os.environ.get("GIFJAX_PROGRESS", "1").strip().lower() not in ("0", "false", "off")


def wanted(progress, fn: str, total: int, *trees) -> tuple[bool, bool]:
    """``(emit, show)`` for a call of ``total`` chunks: does the program report, does a bar open here.

    With the default ``None`` a call that shows no bar compiles no callback
    (the same program as ``progress=False``).
    """
    if progress is not None and not isinstance(progress, bool):
        raise _checks.error(fn, "progress", repr(progress), "None, True or False",
                            "pass progress=False to silence the bar (or set GIFJAX_PROGRESS=0).",
                            kind=TypeError)
    outside = not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(trees))
    if progress is None:
        on = outside and total > 1 and env_on()
        return on, on
    return progress, progress and outside and total > 1


@contextlib.contextmanager
def bar(desc: str, total: int, show: bool, unit: str = "chunk", replicas: int = 1):
    """A tqdm bar on stderr over ``total`` reports while the body runs (nothing if not ``show``).

    ``replicas``: how many devices report the same queries (a data-parallel
    axis), so each query's convergence is counted once.
    """
    if not show or total <= 1:
        yield
        return
    from tqdm.auto import tqdm

    state = {"bar": tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True),
             "converged": 0, "queries": 0, "replicas": max(int(replicas), 1)}
    with _LOCK:
        _OPEN.append(state)
    try:
        yield
        jax.effects_barrier()  # every report of this call has arrived
    finally:
        with _LOCK:
            _OPEN.remove(state)
        state["bar"].close()


def _tick(converged, valid):
    with _LOCK:
        if not _OPEN:
            return
        state = _OPEN[-1]
        valid = np.asarray(valid)
        state["converged"] += int(np.sum(np.asarray(converged) & valid))
        state["queries"] += int(valid.sum())
        r = state["replicas"]
        state["bar"].set_postfix_str(f"converged {state['converged'] // r}/{state['queries'] // r}",
                                     refresh=False)
        state["bar"].update(1)


def _product(_):
    with _LOCK:
        if _OPEN:
            _OPEN[-1]["bar"].update(1)


def counting(operator, emit: bool):
    """``operator`` (a :class:`gifjax.operators.LinearOperator`) whose every product ticks the bar."""
    if not emit:
        return operator

    def counted(matvec):
        def product(v):
            out = matvec(v)
            jax.debug.callback(_product, jax.tree_util.tree_leaves(out)[0].ravel()[0])  # after the product
            return out
        return None if matvec is None else product

    return dataclasses.replace(operator, matvec=counted(operator.matvec), rmatvec=counted(operator.rmatvec))


def report(converged, valid, emit: bool = True):
    """Inside a program: one finished chunk, its queries' ``converged`` flags (``valid`` rows only)."""
    if emit:
        jax.debug.callback(_tick, converged, valid)


def chunks(n: int, chunk_size: int) -> int:
    """How many chunks of ``chunk_size`` cover ``n`` examples."""
    return -(-int(n) // max(int(chunk_size), 1))
