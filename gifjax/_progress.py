"""Progress bars for long calls, ticked from inside their compiled programs (private).

A long call (:func:`gifjax.influence_scores` over many test chunks, say) runs
as one jitted program, so Python never sees the chunks go by. The program
reports each finished chunk through ``jax.debug.callback`` (:func:`report`,
carrying the chunk's ``converged`` flags); on the host, :func:`bar` opens a
tqdm bar that those reports advance, with the count of converged queries so
far as its postfix. The many-query calls also tick each curvature product
(:func:`counting`): the postfix shows their count and rate, and a call whose
worst case at that rate is long prints one notice early (:func:`projection`).

The rule every long call follows (``progress=`` keyword):

* ``None`` (default): a bar when the call runs outside any transformation
  (not under the caller's ``jit`` / ``vmap`` / ``grad`` / ``shard_map``), has
  more than one chunk or more than :data:`MANY_QUERIES` queries, and the
  environment variable ``GIFJAX_PROGRESS`` is not ``0``; otherwise nothing is
  emitted at all.
* ``False``: nothing.
* ``True``: the program always reports (e.g. inside ``shard_map`` for the
  bar :mod:`gifjax.parallel` opens around it); a bar opens only outside
  transformations. Reports with no open bar are dropped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import sys
import threading
import time

import jax
import numpy as np

from . import _checks

_LOCK = threading.Lock()
_OPEN: list = []  # the open bars, innermost last (reports go to it)


def env_on() -> bool:
    """False when the environment variable ``GIFJAX_PROGRESS`` is ``0`` / ``false`` / ``off``."""
    return os.environ.get("GIFJAX_PROGRESS", "1").strip().lower() not in ("0", "false", "off")


#: A call of more queries than this shows a bar even in one chunk (a block solver's big chunk).
MANY_QUERIES = 16


def wanted(progress, fn: str, total: int, *trees, queries: int = 0) -> tuple[bool, bool]:
    """``(emit, show)`` for a call of ``total`` chunks: does the program report, does a bar open here.

    A bar is for a call of several chunks or of more than :data:`MANY_QUERIES`
    queries. With the default ``None`` a call that shows no bar compiles no
    callback (the same program as ``progress=False``).
    """
    if progress is not None and not isinstance(progress, bool):
        raise _checks.error(fn, "progress", repr(progress), "None, True or False",
                            "pass progress=False to silence the bar (or set GIFJAX_PROGRESS=0).",
                            kind=TypeError)
    outside = not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(trees))
    long = total > 1 or queries > MANY_QUERIES
    if progress is None:
        on = outside and long and env_on()
        return on, on
    return progress, progress and outside and long


#: A call whose projected worst case exceeds this many seconds says so once, with the way to bound it.
PROJECTION_NOTICE_S = 600.0
#: ... measured over the first this many seconds of operator products (compile time excluded).
_PROJECTION_AFTER_S = 5.0
_BURST_S = 0.01  # products reported closer together than this are one step's lanes
_RECENT_BURSTS = 64  # the rate is the median over these: a long call's redraws stay O(1)


@contextlib.contextmanager
def bar(desc: str, total: int, show: bool, unit: str = "chunk", replicas: int = 1,
        budget: int | None = None):
    """A tqdm bar on stderr over ``total`` reports while the body runs (nothing if not ``show``).

    ``replicas``: how many devices report the same queries (a data-parallel
    axis), so each query's convergence is counted once. ``budget``: the most
    curvature products the whole call can cost (every query at its step cap),
    when the program ticks each product (:func:`counting`): the bar then shows
    the products' count and rate, and a call whose worst case, at the measured
    rate, exceeds :data:`PROJECTION_NOTICE_S` prints one notice saying so.
    """
    if not show:  # wanted() decided: several chunks, or one chunk of many queries
        yield
        return
    from tqdm.auto import tqdm

    state = {"bar": tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True),
             "converged": 0, "queries": 0, "replicas": max(int(replicas), 1), "desc": desc,
             "per_product": unit == "product", "budget": budget, "products": 0,
             "bursts": [], "last": 0.0, "drawn": 0.0, "noticed": False}
    with _LOCK:
        _OPEN.append(state)
    try:
        yield
        jax.effects_barrier()  # every report of this call has arrived
    finally:
        with _LOCK:
            _OPEN.remove(state)
        state["bar"].close()


def _postfix(state):
    parts = []
    if state["products"]:
        rate = _rate(state)
        parts.append(f"HVPs {state['products']:,}" + (f" ({rate:.3g}/s)" if rate else ""))
    if state["queries"]:
        r = state["replicas"]
        parts.append(f"converged {state['converged'] // r}/{state['queries'] // r}")
    state["bar"].set_postfix_str(", ".join(parts), refresh=False)


def _rate(state):
    """Products per second: the median burst over the median time between bursts, or ``None`` yet.

    A vmapped chunk's lanes report each step's products together (a burst),
    so bursts, not single products, are the clock. The first burst (it may be
    a stray product) and the burst still arriving are left out; only the
    latest :data:`_RECENT_BURSTS` count.
    """
    bursts = state["bursts"]
    if len(bursts) < 4:
        return None
    sizes = [size for _, size in bursts[1:-1]]
    gaps = [t - s for (s, _), (t, _) in zip(bursts[:-2], bursts[1:-1])]
    return statistics.median(sizes) / max(statistics.median(gaps), 1e-9)


def _tick(converged, valid):
    with _LOCK:
        if not _OPEN:
            return
        state = _OPEN[-1]
        valid = np.asarray(valid)
        state["converged"] += int(np.sum(np.asarray(converged) & valid))
        state["queries"] += int(valid.sum())
        _postfix(state)
        state["bar"].update(1)


def _product(_):
    with _LOCK:
        if not _OPEN:
            return
        state = _OPEN[-1]
        if state["per_product"]:  # a bar over products (factorize)
            state["bar"].update(1)
            return
        now, bursts = time.perf_counter(), state["bursts"]
        if bursts and now - state["last"] <= _BURST_S:
            bursts[-1][1] += 1
        else:  # the first product arrives after compilation
            bursts.append([now, 1])
            del bursts[1:-_RECENT_BURSTS]  # the first (for the 5 s clock) and the recent ones suffice
            if state["budget"] and not state["noticed"] and now - bursts[0][0] >= _PROJECTION_AFTER_S:
                rate = _rate(state)
                if rate:
                    state["noticed"] = True
                    note = projection(state["desc"], state["budget"], rate)
                    if note:
                        state["bar"].write(note, file=sys.stderr)
        state["products"] += 1
        state["last"] = now
        if now - state["drawn"] >= 0.5:  # redraw twice a second, not on every product
            state["drawn"] = now
            _postfix(state)
            state["bar"].refresh()


def projection(fn: str, budget: int, rate: float | None) -> str | None:
    """The notice of a call whose worst case, ``budget`` products at ``rate`` per second, is long."""
    if not rate or budget / rate <= PROJECTION_NOTICE_S:
        return None
    worst = budget / rate
    when = f"{worst / 3600:.1f} h" if worst >= 3600 else f"{worst / 60:.0f} min"
    return (f"{fn}: at {rate:.3g} curvature products (HVPs) per second here, this call can take up to "
            f"≈ {when} ({budget:,} products if no query converged before its step cap; each query stops "
            "as soon as it converges). To bound it: a smaller cap (e.g. solver=gifjax.solvers.MINRES("
            "max_steps=200)), the curvature on a subsample (curvature=gifjax.Curvature(subsample=512)) "
            "and damping above |λ_min| (gifjax.spectrum.eigenvalues(..., which='smallest')), then "
            "gifjax.check_scores; README: 'Use it on your own model'. progress=False silences this.")


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
