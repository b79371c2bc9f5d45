"""Work around slow convolutions inside loops on XLA:CPU (private).

XLA:CPU rewrites convolutions into its fast (Eigen) layout, batch-spatial-
feature / spatial-in-out, only outside loop bodies (jax-ml/jax#12868). The
backward-pass convolutions of a CNN (∂/∂input, ∂/∂kernel) have other
dimension orders, so an HVP inside a solver's ``while_loop`` runs them through
a naive emitter: measured 20–40× slower than the same HVP outside a loop.

:func:`canonicalize_convolutions` re-traces a function and rewrites every
``conv_general_dilated`` into explicit transposes around a convolution in the
fast layout, which XLA:CPU then handles well anywhere. Values are identical
(it is a relabelling of axes); on other backends the function is returned
unchanged, and so is a function whose convolutions are all canonical already
(or that has none).

Convolutions nested in higher-order primitives are rewritten too:

* ``pjit``/``jit``/``closed_call``/``core_call`` are inlined (evaluated
  equation by equation, as at the top level);
* ``checkpoint`` (``jax.checkpoint``/``nn.remat``), ``scan`` (``lax.scan``,
  ``nn.scan``, fixed-trip ``fori_loop``), ``cond`` (``lax.cond``/``switch``),
  ``while`` (``lax.while_loop``), ``custom_jvp_call`` and ``custom_vjp_call``
  are re-bound with the same parameters and each sub-jaxpr that holds a
  non-canonical convolution replaced by its rewritten twin (same input and
  output types; custom differentiation rules are kept as they were);
* any other higher-order primitive (``shard_map``, ``run_state``, ...), and
  any of the above whose sub-jaxpr cannot be re-traced to exactly the same
  signature, is bound untouched, as in ``jax.core.eval_jaxpr``.

So each sub-computation is either rewritten as a whole or left exactly as it
was; nothing is half-rewritten.

Opting out: ``canonicalize_convolutions(fn, enabled=False)`` returns ``fn``
itself (the curvature layer forwards a user option to ``enabled``).
"""

from __future__ import annotations

import functools

import jax
import jax.extend as jex
from jax import lax

# primitives whose body is evaluated in place (call-like: same semantics inlined)
_INLINE = frozenset({"pjit", "jit", "closed_call", "core_call"})
# primitives re-bound with the rewritten sub-jaxprs in these parameters
_REBIND = {
    "checkpoint": ("jaxpr",),
    "remat": ("jaxpr",),
    "remat2": ("jaxpr",),
    "scan": ("jaxpr",),
    "cond": ("branches",),
    "while": ("cond_jaxpr", "body_jaxpr"),
    "custom_jvp_call": ("call_jaxpr",),
    "custom_vjp_call": ("call_jaxpr",),
}


def canonicalize_convolutions(fn, *, enabled: bool = True):
    """``fn`` with all its convolutions in NHWC/HWIO/NHWC form (CPU only).

    Args:
      fn: a function of positional array pytrees.
      enabled: ``False`` returns ``fn`` itself (opt out of the rewrite).
    """
    if not enabled or jax.default_backend() != "cpu":
        return fn

    @functools.wraps(fn)
    def wrapped(*args):
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        if not _has_noncanonical_conv(closed.jaxpr):
            return fn(*args)
        flat = _eval(closed.jaxpr, closed.consts, *jax.tree_util.tree_leaves(args))
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), flat)

    return wrapped


def _canonical_specs(ndim):
    spatial = tuple(range(1, ndim - 1))
    return lax.ConvDimensionNumbers(lhs_spec=(0, ndim - 1) + spatial,
                                    rhs_spec=(ndim - 1, ndim - 2) + tuple(range(ndim - 2)),
                                    out_spec=(0, ndim - 1) + spatial)


def _is_canonical(dn, ndim):
    return tuple(map(tuple, dn)) == tuple(map(tuple, _canonical_specs(ndim)))


def _open(j):
    """The open ``Jaxpr`` of a ``Jaxpr`` or ``ClosedJaxpr``."""
    return getattr(j, "jaxpr", j)


def _is_jaxpr(x):
    return isinstance(x, (jex.core.Jaxpr, jex.core.ClosedJaxpr))


def _sub_jaxprs(params):
    """Every (open) jaxpr held by an equation's params, alone or in a tuple/list."""
    for val in params.values():
        for v in val if isinstance(val, (tuple, list)) else (val,):
            if _is_jaxpr(v):
                yield _open(v)


def _has_noncanonical_conv(jaxpr):
    """Whether ``jaxpr`` has a non-canonical convolution at any nesting depth."""
    for eqn in _open(jaxpr).eqns:
        if eqn.primitive is lax.conv_general_dilated_p:
            if not _is_canonical(eqn.params["dimension_numbers"], eqn.invars[0].aval.ndim):
                return True
        if any(_has_noncanonical_conv(sub) for sub in _sub_jaxprs(eqn.params)):
            return True
    return False


def _conv(lhs, rhs, *, dimension_numbers, **params):
    """One convolution, transposed into and out of the canonical layout."""
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    nd = lhs.ndim
    lhs_t = lhs.transpose((lhs_spec[0],) + tuple(lhs_spec[2:]) + (lhs_spec[1],))
    rhs_t = rhs.transpose(tuple(rhs_spec[2:]) + (rhs_spec[1], rhs_spec[0]))
    out = lax.conv_general_dilated_p.bind(lhs_t, rhs_t, dimension_numbers=_canonical_specs(nd), **params)
    # canonical output axes are (batch, spatial..., feature); move each to its place in out_spec
    source = [0] * nd
    source[out_spec[0]] = 0
    source[out_spec[1]] = nd - 1
    for k, axis in enumerate(out_spec[2:]):
        source[axis] = 1 + k
    return out.transpose(tuple(source))


def _rewrite_sub(sub):
    """The rewritten twin of a sub-jaxpr (same type and signature), or None if impossible."""
    if isinstance(sub, jex.core.ClosedJaxpr):
        closed = sub
    elif not sub.constvars:
        closed = jex.core.ClosedJaxpr(sub, ())
    else:
        return None
    in_avals = closed.in_avals
    if not all(hasattr(a, "shape") and hasattr(a, "dtype") for a in in_avals):
        return None  # tokens, refs, ...: leave it alone
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=getattr(a, "weak_type", False))
             for a in in_avals]
    try:
        new = jax.make_jaxpr(lambda *xs: _eval(closed.jaxpr, closed.consts, *xs))(*specs)
    except Exception:  # noqa: BLE001 -- anything we cannot re-trace is bound untouched
        return None
    if (list(new.in_avals) != list(in_avals) or list(new.out_avals) != list(closed.out_avals)
            or new.effects != closed.effects):
        return None
    if isinstance(sub, jex.core.ClosedJaxpr):
        return new
    return None if new.consts else new.jaxpr  # an open Jaxpr param (checkpoint) takes no consts


def _rewritten_params(eqn):
    """``eqn.params`` with each convolution-holding sub-jaxpr rewritten, or None."""
    params = dict(eqn.params)
    for name in _REBIND[eqn.primitive.name]:
        val = params.get(name)
        many = isinstance(val, (tuple, list))
        subs = list(val) if many else [val]
        if not all(_is_jaxpr(s) for s in subs):
            return None
        new = [_rewrite_sub(s) if _has_noncanonical_conv(s) else s for s in subs]
        if any(n is None for n in new):
            return None
        params[name] = type(val)(new) if many else new[0]
    # every other sub-jaxpr of the primitive must be free of non-canonical convs, else untouched
    rest = {k: v for k, v in params.items() if k not in _REBIND[eqn.primitive.name]}
    if any(_has_noncanonical_conv(s) for s in _sub_jaxprs(rest)):
        return None
    return params


def _bind(eqn, params, invals):
    with eqn.ctx.manager:
        outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(params))
    return outs if eqn.primitive.multiple_results else [outs]


def _eval(jaxpr, consts, *args):
    env = {}

    def read(v):
        return v.val if isinstance(v, jex.core.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x in zip(jaxpr.invars, args):
        env[v] = x
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if eqn.primitive is lax.conv_general_dilated_p:
            outs = [_conv(*invals, **eqn.params)]
        elif not any(_has_noncanonical_conv(s) for s in _sub_jaxprs(eqn.params)):
            # first-order primitives, and higher-order ones with nothing to rewrite: as-is
            outs = _bind(eqn, eqn.params, invals)
        elif name in _INLINE and _is_jaxpr(eqn.params.get("jaxpr")):
            inner = eqn.params["jaxpr"]
            outs = _eval(_open(inner), getattr(inner, "consts", ()), *invals)
        elif name in _REBIND and (params := _rewritten_params(eqn)) is not None:
            outs = _bind(eqn, params, invals)
        else:
            # unknown higher-order primitive (or one we could not rewrite): bound untouched
            outs = _bind(eqn, eqn.params, invals)
        for v, x in zip(eqn.outvars, outs):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]
