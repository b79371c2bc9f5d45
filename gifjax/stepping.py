r"""Applying an update: evaluate the model along θ + s·d and pick the step length s.

An influence estimate Δ (:func:`gifjax.influence`) is a *linearised* answer:
θ̂ + Δ is the retrained optimum only where the objective is quadratic (ridge
regression; a Newton step). On a trained network it is a direction, and its
length is usually off by orders of magnitude — damping, a fixed solver
budget, a parameter mask (PIF/FIF/GIF move few parameters, so they must move
them far) and curvature that is not constant all change it — so
``params + delta`` may barely change the model. The papers' experiments
therefore search the step length along Δ on held-out data; this module is that
search, as pure functions over pytrees:

    v_k = objective(θ + s_k·d, \*data),        k = 0, …, K − 1,
    k*  = argmin_k v_k over finite v_k       (argmax with ``maximize=True``),

with d = Δ (s counts multiples of Δ: s = 1 is the plain influence / Newton
step, s = 0 the original model) or d = Δ/‖Δ‖ (``normalize=True``: s is the
Euclidean distance moved in parameter space). Ties go to the first index —
the smallest step on an increasing grid, so an update that does not help
leaves the model unchanged — and non-finite values (a step that overflowed
the model) never win.

* :func:`along` — every ``fn(θ + s·d, *data)`` of a grid in one jitted
  program (``lax.map`` over the steps), stacked on a leading axis;
* :func:`step_search` — :func:`along` on a scalar objective, then the best
  step (:class:`StepSearch`: the step, its index, the values, the moved
  parameters, ‖Δ‖);
* :func:`best_index` — the tie and finiteness rule on its own (for curves
  computed elsewhere, e.g. an F1 along the grid);
* :func:`unit_direction` — (Δ/‖Δ‖, ‖Δ‖), a zero direction for a zero or
  non-finite Δ.

Example: the Newton step of a quadratic is exact, so the search keeps s = 1
(index 17 of :data:`DEFAULT_STEPS`: 0 first, then 10^(−2), 10^(−15/8), … 1):

    >>> import jax.numpy as jnp, gifjax
    >>> A = jnp.array([[3.0, 1.0], [1.0, 2.0]]); b = jnp.array([1.0, -1.0])
    >>> f = lambda th: 0.5 * th @ A @ th - b @ th      # minimum at A⁻¹b
    >>> th0 = jnp.zeros(2)
    >>> delta = jnp.linalg.solve(A, b - A @ th0)       # −H⁻¹∇f(θ₀)
    >>> out = gifjax.step_search(f, th0, delta)
    >>> float(out.step), int(out.index)
    (1.0, 17)
    >>> bool(jnp.allclose(out.params, jnp.linalg.solve(A, b)))
    True

Warning: choose the step on data the final numbers are not reported on
(a validation split); choosing it on the test set overstates every method.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _checks, _repr, _tree

__all__ = ["DEFAULT_STEPS", "StepSearch", "along", "best_index", "step_search", "unit_direction"]

tree_map = jax.tree_util.tree_map

#: The default grid of :func:`step_search`: s = 0 (the original model), then 33
#: lengths from 10⁻² to 10² spaced geometrically (8 per decade, 10^(k/8)), so
#: s = 1 — the plain influence step when ``normalize=False`` — is on the grid
#: exactly. Geometric, because the best length differs by orders of magnitude
#: between estimators (all-parameter IF moves little, a 5 % mask far).
DEFAULT_STEPS = np.concatenate([[0.0], 10.0 ** (np.arange(-16, 17) / 8)])


@_repr.compact_repr()
class StepSearch(NamedTuple):
    """Result of :func:`step_search`.

    Attributes:
      step: the chosen step length s* (a 0-d array; 0 means no step helped).
      index: its index in ``steps`` (a 0-d int array).
      steps: the grid as evaluated, [K] (in the parameters' float dtype, at
        least float32).
      values: the objective at every step, [K] (``values[index]`` is the best).
      params: θ + s*·d, a pytree like ``params`` — the updated model.
      norm: ‖Δ‖ over all leaves (a 0-d array; NaN or Inf flags a non-finite Δ,
        which :func:`step_search` does not move along).

    ``value`` is ``values[index]``.
    """

    step: Any
    index: Any
    steps: Any
    values: Any
    params: Any
    norm: Any

    value = property(lambda self: self.values[self.index])


# ----------------------------------------------------------------------------- the direction


@jax.jit
def _unit_direction(delta):
    norm = _tree.norm(delta)  # scaled, so a Δ of 1e20 (or 1e-25) in float32 neither over- nor underflows
    ok = jnp.isfinite(norm) & (norm > 0)
    inv = 1 / jnp.where(ok, norm, 1)
    # where, not d·0: a NaN entry times 0 is still NaN, and the direction must be exactly zero.
    return tree_map(lambda d: jnp.where(ok, d * inv, jnp.zeros_like(d * inv)), delta), norm


def unit_direction(delta):
    """``(Δ/‖Δ‖, ‖Δ‖)``, the norm taken over all leaves of the pytree ``delta`` (jitted).

        d = Δ / ‖Δ‖,   ‖Δ‖ = (Σ_leaves Σ_i Δ_i²)^½

    A zero or non-finite ‖Δ‖ (a NaN or Inf anywhere in Δ) gives an exactly
    zero direction, so moving along it leaves the model unchanged.

    Args:
      delta: a pytree of floating arrays (traced), e.g. ``gifjax.influence(...).delta``.

    Returns:
      ``(direction, norm)``: the direction, a pytree like ``delta`` (each
      leaf in its dtype), and the norm as a 0-d JAX array (not a Python
      float, so the function works under ``jit``/``vmap``; ``float(norm)``
      outside). The norm is returned as computed: NaN or Inf when Δ was
      non-finite, 0 for Δ = 0.

    Example:
      >>> import jax.numpy as jnp
      >>> from gifjax.stepping import unit_direction
      >>> d, n = unit_direction({"w": jnp.array([3.0, 0.0]), "b": jnp.array([4.0])})
      >>> float(n), d["w"].tolist(), d["b"].tolist()
      (5.0, [0.6, 0.0], [0.8])
      >>> unit_direction(jnp.array([jnp.nan, 1.0]))[0].tolist()
      [0.0, 0.0]
    """
    return _unit_direction(delta)


# ----------------------------------------------------------------------------- checks


def _check_callable(fn: str, arg: str, f):
    if not callable(f):
        raise _checks.error(fn, arg, type(f).__name__, "a function of (params, *data)",
                            f"pass the function itself, e.g. `{arg}=loss_fn`.", kind=TypeError)
    try:
        hash(f)
    except TypeError:
        raise _checks.error(fn, arg, f"an unhashable {type(f).__name__}",
                            "a hashable callable (it is a static argument of one jitted program)",
                            "wrap it in a plain function (def or lambda), or make it a NamedTuple / "
                            "frozen dataclass holding its configuration.", kind=TypeError) from None


def _step_dtype(params):
    """The parameters' float dtype (at least float32): steps need not be finer than θ itself."""
    floats = [jnp.result_type(a) for a in jax.tree_util.tree_leaves(params)]
    floats = [d for d in floats if jnp.issubdtype(d, jnp.floating)]
    return jnp.result_type(jnp.float32, *floats)


def _check_steps(fn: str, steps, dtype):
    """``steps`` as a 1-D, non-empty array of finite reals (values checked where concrete)."""
    fix = "pass a 1-D array of finite step lengths, e.g. steps=jnp.linspace(0.0, 2.0, 9)."
    if isinstance(steps, (str, bytes)) or steps is None:
        raise _checks.error(fn, "steps", repr(steps), "a 1-D array of finite real numbers", fix,
                            kind=TypeError)
    if _checks.is_concrete(steps):
        try:
            raw = np.asarray(steps)
        except (TypeError, ValueError):
            raise _checks.error(fn, "steps", type(steps).__name__, "a 1-D array of finite real numbers",
                                fix, kind=TypeError) from None
    else:
        raw = steps
    dtype_ok = raw.dtype != bool and (np.issubdtype(raw.dtype, np.integer)
                                      or np.issubdtype(raw.dtype, np.floating) or raw.dtype.kind == "V")
    if not dtype_ok:
        raise _checks.error(fn, "steps", f"dtype {raw.dtype}", "real numbers (int or float)", fix,
                            kind=TypeError)
    if raw.ndim != 1 or raw.shape[0] == 0:
        raise _checks.error(fn, "steps", f"shape {tuple(raw.shape)}", "a 1-D array of K >= 1 steps", fix)
    if _checks.is_concrete(raw):
        bad = ~np.isfinite(raw.astype(np.float64))
        if bad.any():
            raise _checks.error(fn, "steps", f"non-finite value(s) {raw[bad][:4].tolist()} at "
                                f"index(es) {np.flatnonzero(bad)[:4].tolist()}",
                                "finite step lengths", fix)
    return jnp.asarray(steps, dtype)


def _check_flag(fn: str, arg: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise _checks.error(fn, arg, repr(value), "True or False (static)", f"pass {arg}=True or {arg}=False.",
                            kind=TypeError)
    return bool(value)


def _shapes(tree):
    return tree_map(lambda a: f"{np.dtype(a.dtype).name}{list(a.shape)}", tree)


def _check_scalar_objective(fn: str, objective, params, data):
    """``objective(params, *data)`` returns one real number (checked abstractly; nothing runs)."""
    out = jax.eval_shape(objective, params, *data)
    leaves = jax.tree_util.tree_leaves(out)
    if (len(leaves) != 1 or leaves[0].shape != ()
            or not (jnp.issubdtype(leaves[0].dtype, jnp.integer)
                    or jnp.issubdtype(leaves[0].dtype, jnp.floating))):
        raise _checks.error(fn, "objective", f"output {_shapes(out)}",
                            "one real scalar per step (e.g. a mean loss, or an accuracy)",
                            "reduce over the data inside the objective, e.g. `lambda p, x, y: "
                            "loss(p, x, y).mean()`; for several outputs per step use gifjax.stepping.along "
                            "and pick with gifjax.stepping.best_index.")


# ----------------------------------------------------------------------------- the grid


def _moved(params, direction, s):
    """θ + s·d, each floating leaf kept in its dtype (a float64 grid must not promote float32 θ)."""

    def leaf(p, d):
        out = p + s * d
        dtype = jnp.result_type(p)
        return out.astype(dtype) if jnp.issubdtype(dtype, jnp.inexact) else out

    return tree_map(leaf, params, direction)


@functools.partial(jax.jit, static_argnums=0)
def _along(fn, params, direction, steps, *data):
    # lax.map (a loop), not vmap: vmapping over the parameters batches the kernels, which turns
    # every convolution into a grouped one — XLA:CPU runs those ~5x slower than a loop of plain
    # convolutions. The loop also keeps memory at one step's activations.
    return jax.lax.map(lambda s: fn(_moved(params, direction, s), *data), steps)


def along(fn: Callable, params, direction, steps, *data):
    r"""``fn(θ + s·d, *data)`` for every step s of a grid, stacked: one jitted program.

        out[k] = fn(params + steps[k] · direction, \*data),   k = 0, …, K − 1

    The steps run one after another (``lax.map``), not vmapped: vmapping over
    the parameters turns convolutions into grouped ones, which XLA:CPU runs
    about 5x slower; a loop also needs memory for one step only. Works
    inside a caller's ``jit`` / ``vmap`` (every array argument may be traced).

    Args:
      fn: ``fn(params, *data) -> pytree of arrays`` (static: a hashable
        callable; one compile per distinct ``fn`` and input shapes — pass the
        same function object on every call, not a fresh ``lambda``, or each
        call compiles anew).
      params: θ, any pytree of arrays (traced).
      direction: d, a pytree like ``params`` (traced), e.g. Δ or
        :func:`unit_direction` (Δ)[0].
      steps: the step lengths s, a 1-D array of K finite reals (traced; any
        order, negative allowed). They are cast to the parameters' float
        dtype (at least float32); each moved leaf keeps its own dtype.
      *data: pytrees of arrays passed to ``fn`` after the parameters (traced).

    Returns:
      ``fn``'s output with a leading axis of length K on every leaf.

    Raises:
      ValueError / TypeError: ``direction`` not shaped like ``params``,
      ``steps`` not 1-D, empty or non-finite, ``fn`` not a hashable callable.

    Example:
      >>> import jax.numpy as jnp
      >>> from gifjax.stepping import along
      >>> along(jnp.sum, jnp.array([1.0, 2.0]), jnp.array([1.0, -2.0]), jnp.array([0.0, 1.0, 2.0]))
      Array([3., 2., 1.], dtype=float32)
    """
    name = "stepping.along"
    _check_callable(name, "fn", fn)
    _checks.check_like(name, "direction", direction, params)
    steps = _check_steps(name, steps, _step_dtype(params))
    return _along(fn, params, direction, steps, *data)


# ----------------------------------------------------------------------------- the choice


def best_index(values, maximize: bool = False, *, where=None):
    """Index of the best finite value: the smallest (the largest with ``maximize=True``).

        k* = argmin_k values[k]  over k with values[k] finite and where[k]   (argmax if maximize)

    Ties go to the **first** index (the smallest step on an increasing grid);
    NaN and ±Inf never win; if no value is finite (or none is allowed by
    ``where``) the answer is 0 (on a grid starting at s = 0: the original model).

    ``where`` is a constraint on the steps. The GIF paper's class-removal code
    keeps the best F1 only among steps whose self-accuracy is below 0.5 %:
    ``best_index(f1, maximize=True, where=self_acc < 0.005)``.

    Args:
      values: 1-D array of K >= 1 real numbers (NumPy or JAX; traced allowed).
      maximize: look for the largest value instead (static).
      where: optional boolean array of K entries: only steps where it is True compete.

    Returns:
      A Python ``int`` for concrete ``values`` (compared in NumPy at their own
      precision, so float64 curves are not rounded to float32 first); a traced
      int scalar when ``values`` is traced (inside ``jit`` / ``vmap``).

    Example:
      >>> from gifjax.stepping import best_index
      >>> best_index([3.0, 1.0, float("nan"), 1.0])
      1
      >>> best_index([0.2, 0.9, float("inf"), 0.9], maximize=True)
      1
      >>> best_index([float("nan"), float("nan")])
      0
      >>> best_index([0.2, 0.9, 0.8], maximize=True, where=[True, False, True])
      2
    """
    name = "stepping.best_index"
    maximize = _check_flag(name, "maximize", maximize)
    fix = "pass one number per step, e.g. best_index(values) with values.shape == (len(steps),)."
    try:
        v = values if not _checks.is_concrete(values) else np.asarray(values)
    except (TypeError, ValueError):
        raise _checks.error(name, "values", type(values).__name__, "a 1-D array of real numbers", fix,
                            kind=TypeError) from None
    dtype = np.dtype(v.dtype)
    if dtype == object or dtype.kind in "cSUO" or dtype == bool:
        raise _checks.error(name, "values", f"dtype {dtype}", "real numbers (int or float)", fix,
                            kind=TypeError)
    if v.ndim != 1 or v.shape[0] == 0:
        raise _checks.error(name, "values", f"shape {tuple(v.shape)}", "a 1-D array of K >= 1 values", fix)
    if where is not None:
        allowed = where if not _checks.is_concrete(where) else np.asarray(where)
        if np.dtype(allowed.dtype) != bool or tuple(allowed.shape) != tuple(v.shape):
            raise _checks.error(name, "where", f"dtype {np.dtype(allowed.dtype)}, shape {tuple(allowed.shape)}",
                                f"a boolean array of shape {tuple(v.shape)} (one flag per value)",
                                "pass a comparison, e.g. where=self_acc < 0.005.",
                                kind=TypeError if np.dtype(allowed.dtype) != bool else ValueError)
    if isinstance(v, np.ndarray) and (where is None or isinstance(allowed, np.ndarray)):
        v = v.astype(np.float64)
        ok = np.isfinite(v) if where is None else np.isfinite(v) & allowed
        key = np.where(ok, v if maximize else -v, -np.inf)
        # argmax returns the first of equal maxima; nothing allowed → 0 (the original model)
        return int(np.argmax(key)) if ok.any() else 0
    v = v if jnp.issubdtype(v.dtype, jnp.floating) else v.astype(jnp.float32)
    ok = jnp.isfinite(v) if where is None else jnp.isfinite(v) & allowed
    key = jnp.where(ok, v if maximize else -v, -jnp.inf)
    return jnp.where(ok.any(), jnp.argmax(key), 0)


def step_search(objective: Callable, params, delta, *data, steps=None, normalize: bool = False,
                maximize: bool = False) -> StepSearch:
    r"""The best step length along an update: θ + s*·d with s* = argmin_s objective(θ + s·d, \*data).

        v_k = objective(params + steps[k] · d, \*data),    k* = best_index(v, maximize)

    with d = Δ (``normalize=False``: s = 1 is the plain influence / Newton
    step, so θ̂ + Δ is the grid point s = 1) or d = Δ/‖Δ‖ (``normalize=True``:
    s is the Euclidean distance moved). All steps run in one jitted program
    (:func:`along`).

    Choice rule (:func:`best_index`): the smallest finite value (largest with
    ``maximize=True``); ties go to the first index — on an increasing grid
    the smallest step; NaN / ±Inf values never win; **if no value is finite,
    index 0** (with the default grid: s = 0, the original model). A
    non-finite Δ (NaN or Inf in any entry; ``norm`` says so) is not moved
    along: d = 0, every value is objective(θ), and the result is index 0.

    Args:
      objective: ``objective(params, *data) -> scalar`` (static: a hashable
        callable; pass the same object on every call to reuse the compiled
        program), e.g. a validation loss — or an accuracy / F1 with
        ``maximize=True``.
      params: θ̂, any pytree of arrays (traced).
      delta: Δ, a pytree like ``params`` (traced), e.g.
        ``gifjax.influence(...).delta``.
      *data: pytrees of arrays passed to ``objective`` after the parameters
        (traced), e.g. a validation split ``x, y``.
      steps: the grid, a 1-D array of finite reals (traced; include 0 to
        allow "no change"), or ``None`` for :data:`DEFAULT_STEPS` (0, then
        10⁻² … 10² geometrically, 33 lengths — multiples of Δ, or distances
        with ``normalize=True``).
      normalize: move along Δ/‖Δ‖ instead of Δ (static bool).
      maximize: pick the largest value instead of the smallest (static bool).

    Returns:
      :class:`StepSearch`: ``step``, ``index``, ``steps``, ``values``, the
      updated ``params`` = θ + step·d, and ``norm`` = ‖Δ‖.

    Raises:
      ValueError / TypeError: ``delta`` not shaped like ``params``; ``steps``
      not 1-D, empty or non-finite; ``objective`` not returning one real
      scalar; ``normalize`` / ``maximize`` not bools.

    Example:
      Ridge regression: influence is exact, so the search keeps the plain
      step s = 1 — the model retrained without example 0.

      >>> import jax.numpy as jnp, gifjax
      >>> X = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0], [2.0, 1.0]])
      >>> y = jnp.array([3.0, 1.0, 1.0, 0.0, 2.0])
      >>> def loss(w, X, y):
      ...     return 0.5 * jnp.mean((X @ w - y) ** 2) + 0.05 * w @ w
      >>> w = jnp.linalg.solve(X.T @ X / 5 + 0.1 * jnp.eye(2), X.T @ y / 5)   # trained on all 5
      >>> g = gifjax.removal_gradient(loss, w, X[:1], y[:1], num_train=5)
      >>> delta = gifjax.influence(loss, w, g, X[1:], y[1:], method="if", solver="dense").delta
      >>> out = gifjax.step_search(loss, w, delta, X[1:], y[1:])
      >>> float(out.step)
      1.0
      >>> retrained = jnp.linalg.solve(X[1:].T @ X[1:] / 4 + 0.1 * jnp.eye(2), X[1:].T @ y[1:] / 4)
      >>> bool(jnp.allclose(out.params, retrained, atol=1e-5))
      True

    Warning:
      The grid bounds the answer: a best step at the last grid point means
      the objective was still improving there (extend the grid). Choose the
      step on held-out data, not on the data the result is reported on.
    """
    name = "stepping.step_search"
    _check_callable(name, "objective", objective)
    _checks.check_like(name, "delta", delta, params)
    normalize = _check_flag(name, "normalize", normalize)
    maximize = _check_flag(name, "maximize", maximize)
    steps = _check_steps(name, DEFAULT_STEPS if steps is None else steps, _step_dtype(params))
    _check_scalar_objective(name, objective, params, data)

    unit, norm = _unit_direction(delta)
    if normalize:
        direction = unit
    else:  # a non-finite Δ moves nothing (as its unit direction): s = 0 is then the original model
        finite = jnp.isfinite(norm)
        direction = tree_map(lambda d: jnp.where(finite, d, jnp.zeros_like(d)), delta)
    values = _along(objective, params, direction, steps, *data)
    values = jax.tree_util.tree_leaves(values)[0]
    index = best_index(values, maximize=maximize)
    index = jnp.asarray(index, jnp.int32) if isinstance(index, int) else index
    step = steps[index]
    return StepSearch(step, index, steps, values, _moved(params, direction, step), norm)

