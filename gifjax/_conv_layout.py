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
unchanged.
"""

from __future__ import annotations

import functools

import jax
import jax.extend as jex
from jax import lax


def canonicalize_convolutions(fn):
    """``fn`` with all its convolutions in NHWC/HWIO/NHWC form (CPU only)."""
    if jax.default_backend() != "cpu":
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


def _has_noncanonical_conv(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive is lax.conv_general_dilated_p:
            if not _is_canonical(eqn.params["dimension_numbers"], eqn.invars[0].aval.ndim):
                return True
        inner = eqn.params.get("jaxpr")
        if inner is not None and _has_noncanonical_conv(getattr(inner, "jaxpr", inner)):
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
        inner = eqn.params.get("jaxpr")
        if eqn.primitive is lax.conv_general_dilated_p:
            outs = [_conv(*invals, **eqn.params)]
        elif eqn.primitive.name in ("pjit", "jit", "closed_call") and inner is not None:
            outs = _eval(inner.jaxpr, inner.consts, *invals)
        else:
            # any other primitive (higher-order ones included) binds as in jax.core.eval_jaxpr
            outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
            outs = outs if eqn.primitive.multiple_results else [outs]
        for v, x in zip(eqn.outvars, outs):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]
