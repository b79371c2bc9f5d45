"""Layer outputs and output-gradients of Flax models, without changing their code (private).

Both frameworks reduce to one *runner*, ``spec.run(state, inputs, kwargs,
index, hook)``: it applies the model and passes the output ``y`` of every
eligible layer call through ``hook(i, module, y) -> y``, where ``i`` is the
layer's position in ``layer_keys``.

* linen: ``nn.intercept_methods`` sees every module method call.
* nnx: ``nnx.merge`` builds a private copy of the module graph; the copies of
  eligible layers get a subclass whose ``__call__`` reports to the hook.
  (Python looks ``__call__`` up on the type, so patching an instance attribute
  would not work; the user's module objects are never touched.)

Activation statistics read ``y``. Gradient statistics add zero perturbations,
``y + ε``, and differentiate the loss with respect to ε: ∂loss/∂ε = ∂loss/∂y.
One jitted forward (and backward) pass gives the per-unit means of every layer.
"""

from __future__ import annotations

import contextvars
import functools
import math
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from . import _checks

LAYER_TYPES = {
    "linen": (nn.Dense, nn.DenseGeneral, nn.Conv),
    "nnx": (nnx.Linear, nnx.LinearGeneral, nnx.Conv),
}


def framework(model) -> str | None:
    if isinstance(model, nn.Module):
        return "linen"
    if isinstance(model, nnx.Module):
        return "nnx"
    return None


def unit_ndim(module) -> int:
    """How many trailing output axes index units: len(features) for DenseGeneral-style layers."""
    features = getattr(module, "features", getattr(module, "out_features", None))
    return len(features) if isinstance(features, (tuple, list)) else 1


def unit_mean(y, ndim: int = 1):
    """Mean of ``y`` over all but its last ``ndim`` axes, flattened to one axis of units."""
    units = math.prod(y.shape[y.ndim - ndim:])
    return jnp.mean(jnp.reshape(y, (-1, units)), axis=0)


class Linen(NamedTuple):
    model: Any
    layer_filter: Callable

    def run(self, variables, inputs, kwargs, index, hook):
        def interceptor(next_fun, args, kw, context):
            out = next_fun(*args, **kw)
            module = context.module
            i = index.get(tuple(map(str, module.path)))
            if context.method_name == "__call__" and i is not None and self.layer_filter(module.path, module):
                out = hook(i, module, out)
            return out

        with nn.intercept_methods(interceptor):
            return self.model.apply(variables, inputs, **kwargs)


_HOOK = contextvars.ContextVar("gifjax_nnx_hook", default=None)


@functools.lru_cache(maxsize=None)
def _hooked(cls):
    """Subclass of an nnx layer class whose ``__call__`` passes its output to the active hook."""

    def __call__(self, *args, **kwargs):
        out = cls.__call__(self, *args, **kwargs)
        hook = _HOOK.get()
        return out if hook is None else hook(self, out)

    return type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})


class Nnx(NamedTuple):
    graphdef: Any
    layer_filter: Callable

    def run(self, state, inputs, kwargs, index, hook):
        model = nnx.merge(self.graphdef, *state)  # a private copy: safe to re-class
        position = {}
        for path, module in nnx.iter_modules(model):
            i = index.get(tuple(map(str, path)))
            if i is not None and self.layer_filter(path, module):
                object.__setattr__(module, "__class__", _hooked(type(module)))
                position[id(module)] = i
        token = _HOOK.set(lambda module, out: hook(position[id(module)], module, out))
        try:
            return model(inputs, **kwargs)
        finally:
            _HOOK.reset(token)


def _outputs(spec, kind, state, inputs, kwargs, layer_keys, eps=None):
    """Model output and, in call order, (layer index, unit ndim, layer output); ``eps[n]`` is
    added to the n-th eligible call's output."""
    index = {k: i for i, k in enumerate(layer_keys)}
    calls = []

    def hook(i, module, y):
        ndim = unit_ndim(module)
        if not isinstance(y, jax.Array) or y.ndim < ndim:
            raise _checks.error(f"selection.{kind}_scores", "layers",
                                f"layer {'/'.join(layer_keys[i])} ({type(module).__name__}) returning "
                                f"{type(y).__name__} {getattr(y, 'shape', '')}",
                                f"eligible layers that return one array with >= {ndim} axes",
                                "leave this layer out of the `layers` filter.", kind=TypeError)
        n = len(calls)
        calls.append((i, ndim, y))
        return y if eps is None else y + eps[n]

    return spec.run(state, inputs, kwargs, index, hook), calls


#: Per-unit statistics: (map on the values before the mean, |·| after the mean).
STATISTICS = {"abs_mean": (None, True), "signed_mean": (None, False),
              "mean_abs": (jnp.abs, False), "relu_mean": (jax.nn.relu, False)}


def statistic(values, ndim: int = 1, name: str = "abs_mean"):
    """One call's unit statistic before the mean over calls (see :data:`STATISTICS`)."""
    before, _ = STATISTICS[name]
    return unit_mean(values if before is None else before(values), ndim)


def _per_layer(calls, values, name="abs_mean"):
    """The unit statistic ``name`` (default: the absolute mean) averaged over calls, keyed by layer index."""
    means = {}
    for (i, ndim, _), v in zip(calls, values):
        means.setdefault(i, []).append(statistic(v, ndim, name))
    after = jnp.abs if STATISTICS[name][1] else (lambda a: a)
    return {i: after(jnp.mean(jnp.stack(m), axis=0)) for i, m in means.items()}


class Static:
    """A static jit argument compared part by part (the fields of a tuple): by value where a
    part is hashable, by identity where it is not (e.g. a linen ``Sequential`` holds a list).
    jit's cache keeps the parts alive, so an id cannot be reused while it is cached."""

    def __init__(self, value):
        self.value = value
        self._parts = tuple(value) if isinstance(value, tuple) else (value,)
        self._keys = tuple(_hash_key(p) for p in self._parts)

    def __hash__(self):
        return hash((type(self.value), self._keys))

    def __eq__(self, other):
        return (isinstance(other, Static) and type(self.value) is type(other.value)
                and self._keys == other._keys
                and all(a is b or a == b for a, b in zip(self._parts, other._parts)))


def _hash_key(part):
    try:
        return hash(part)
    except TypeError:
        return ("id", id(part))


def layer_stats(spec, kind, loss_fn, layer_keys, static_kwargs, state, inputs, dynamic_kwargs,
                stat="abs_mean"):
    """{layer index: unit scores} for ``kind`` "activation" or "gradient" (one jitted pass)."""
    return _layer_stats(Static(spec), kind, Static(loss_fn), layer_keys, static_kwargs, stat,
                        state, inputs, dynamic_kwargs)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _layer_stats(spec, kind, loss_fn, layer_keys, static_kwargs, stat, state, inputs, dynamic_kwargs):
    spec, loss_fn = spec.value, loss_fn.value
    kwargs = {**dict(static_kwargs), **dynamic_kwargs}
    # Also tells the shapes of the perturbations; XLA drops it when unused.
    _, calls = _outputs(spec, kind, state, inputs, kwargs, layer_keys)
    if kind == "activation":
        return _per_layer(calls, [y for _, _, y in calls], stat)

    def loss_of(eps):
        out, _ = _outputs(spec, kind, state, inputs, kwargs, layer_keys, eps)
        loss = loss_fn(out)
        if jnp.shape(loss) != ():
            raise _checks.error("selection.gradient_scores", "loss_fn",
                                f"an output of shape {jnp.shape(loss)}", "a scalar (shape ())",
                                "reduce the loss over the batch, e.g. with jnp.mean.")
        return loss

    grads = jax.grad(loss_of)([jnp.zeros_like(y) for _, _, y in calls])
    return _per_layer(calls, grads, stat)


def nnx_split(model):
    """(graphdef, params, rest) of an nnx module, params being its ``nnx.Param`` state."""
    return nnx.split(model, nnx.Param, ...)
