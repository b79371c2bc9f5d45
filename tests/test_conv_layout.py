"""The XLA:CPU convolution-layout workaround changes no value, only layouts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import gifjax
from gifjax._conv_layout import _has_noncanonical_conv, canonicalize_convolutions


def conv_net(params, x):
    """Strided, dilated, grouped NCHW convolution, then an NHWC one."""
    h = lax.conv_general_dilated(x, params["k1"], (2, 1), [(1, 0), (0, 1)], rhs_dilation=(1, 2),
                                 dimension_numbers=("NCHW", "OIHW", "NCHW"), feature_group_count=2)
    h = jnp.tanh(h).transpose(0, 2, 3, 1)
    h = lax.conv_general_dilated(h, params["k2"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(jnp.sin(h))


@pytest.fixture
def setup(x64):
    k = jax.random.split(jax.random.key(0), 3)
    params = {"k1": jax.random.normal(k[0], (4, 1, 3, 2)), "k2": jax.random.normal(k[1], (2, 2, 4, 3))}
    x = jax.random.normal(k[2], (3, 2, 7, 6))
    return params, x


def test_rewritten_hvp_equals_plain_hvp(setup):
    params, x = setup
    v = jax.tree_util.tree_map(jnp.ones_like, params)
    plain = lambda v: jax.jvp(lambda p: jax.grad(conv_net)(p, x), (params,), (v,))[1]
    fixed = canonicalize_convolutions(plain)
    assert _has_noncanonical_conv(jax.make_jaxpr(plain)(v).jaxpr)  # backward convs are not canonical
    assert not _has_noncanonical_conv(jax.make_jaxpr(fixed)(v).jaxpr)
    for a, b in zip(jax.tree_util.tree_leaves(fixed(v)), jax.tree_util.tree_leaves(plain(v))):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_library_hvps_match_dense_hessian_on_such_a_net(setup):
    params, x = setup
    mean_loss = lambda p, x: conv_net(p, x) / x.shape[0]  # batched_hvp averages mean losses
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    H = jax.hessian(lambda f: mean_loss(unravel(f), x))(flat)
    v = unravel(jnp.linspace(-1.0, 1.0, flat.size))
    expected = H @ jax.flatten_util.ravel_pytree(v)[0]
    for hv in (gifjax.hvp(mean_loss, params, v, x), gifjax.linearize_hvp(mean_loss, params, x)(v),
               gifjax.batched_hvp(mean_loss, params, v, x, chunk_size=2)):
        np.testing.assert_allclose(jax.flatten_util.ravel_pytree(hv)[0], expected, rtol=1e-10)


# --- convolutions inside higher-order primitives (remat, scan, cond, while, custom_jvp) ---------

import flax.linen as nn  # noqa: E402
from jax.sharding import Mesh, PartitionSpec  # noqa: E402


def _sub_jaxprs(params):
    """Every sub-jaxpr held by an equation's params (alone, or in a tuple like cond's branches)."""
    for val in params.values():
        for v in val if isinstance(val, (tuple, list)) else (val,):
            if isinstance(v, jax.extend.core.ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, jax.extend.core.Jaxpr):
                yield v


def _walk(jaxpr, path=()):
    """(path of enclosing primitive names, eqn) for every equation at any nesting depth."""
    for eqn in jaxpr.eqns:
        yield path, eqn
        for sub in _sub_jaxprs(eqn.params):
            yield from _walk(sub, path + (eqn.primitive.name,))


def _noncanonical(jaxpr):
    """Paths of all non-canonical convolutions (independent of the module's own detector)."""
    out = []
    for path, eqn in _walk(jaxpr):
        if eqn.primitive is lax.conv_general_dilated_p:
            n = eqn.invars[0].aval.ndim
            canon = ((0, n - 1) + tuple(range(1, n - 1)), (n - 1, n - 2) + tuple(range(n - 2)),
                     (0, n - 1) + tuple(range(1, n - 1)))
            if tuple(map(tuple, eqn.params["dimension_numbers"])) != canon:
                out.append(path)
    return out


def _primitives(jaxpr):
    return {eqn.primitive.name for _, eqn in _walk(jaxpr)}


F64 = dict(dtype=jnp.float64, param_dtype=jnp.float64)


class _ConvBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.tanh(nn.Conv(3, (3, 3), **F64)(x))


class _RematNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.mean(jnp.sin(nn.remat(_ConvBlock)()(x)) ** 2)


class _ScanLayer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return jnp.tanh(nn.Conv(3, (3, 3), **F64)(x)), None


class _ScanNet(nn.Module):
    """A scanned stack of two same-shape conv layers (their kernels stacked on a leading axis)."""

    @nn.compact
    def __call__(self, x):
        x, _ = nn.scan(_ScanLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                       length=2)()(x, None)
        return jnp.mean(jnp.sin(x) ** 2)


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))  # no per-shape compile


def _flax_loss(module):
    x = _normal(1, (2, 6, 6, 3))
    # shapes from an abstract init (an eager Flax init is slow), values drawn directly
    leaves, tree = jax.tree_util.tree_flatten(jax.eval_shape(module.init, jax.random.key(0), x))
    params = tree.unflatten([0.5 * _normal(10 + i, s.shape) for i, s in enumerate(leaves)])
    return (lambda p: module.apply(p, x)), params


def _cond_loss():
    x = _normal(2, (2, 6, 6, 2))

    def loss(p):
        conv = lambda w, dn: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn)
        return lax.cond(jnp.sum(p["a"]) > 0,
                        lambda: jnp.mean(jnp.tanh(conv(p["a"], ("NHWC", "HWIO", "NHWC"))) ** 2),
                        lambda: jnp.mean(jnp.sin(conv(p["b"], ("NHWC", "HWIO", "NHWC")))))

    return loss, {"a": _normal(3, (3, 3, 2, 3)), "b": _normal(4, (3, 3, 2, 3))}


def _while_loss():
    """A conv net applied twice in a `lax.while_loop` (dynamic trip count: a real `while`)."""
    x = _normal(5, (2, 6, 6, 3))

    def loss(w):
        def body(c):
            i, h = c
            h = jnp.tanh(lax.conv_general_dilated(h, w, (1, 1), "SAME",
                                                  dimension_numbers=("NHWC", "HWIO", "NHWC")))
            return i + 1, h
        # forward-only: while_loop is not reverse-differentiable, so take a JVP-only HVP below
        return jnp.mean(lax.while_loop(lambda c: c[0] < 2, body, (0, x))[1] ** 2)

    return loss, 0.5 * _normal(6, (3, 3, 3, 3))


CASES = {
    "remat": (lambda: _flax_loss(_RematNet()), "remat2"),
    "scan": (lambda: _flax_loss(_ScanNet()), "scan"),
    "cond": (_cond_loss, "cond"),
}


def _assert_close(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("case", list(CASES))
def test_convs_inside_higher_order_primitives_are_rewritten(x64, case):
    make, primitive = CASES[case]
    loss, params = make()
    v = jax.tree_util.tree_map(lambda p: jnp.cos(jnp.arange(p.size, dtype=p.dtype)).reshape(p.shape), params)
    plain = lambda v: jax.jvp(jax.grad(loss), (params,), (v,))[1]
    fixed = canonicalize_convolutions(plain)

    before = _noncanonical(jax.make_jaxpr(plain)(v).jaxpr)
    assert any(primitive in path for path in before)  # the test does exercise nested convs
    after = jax.make_jaxpr(fixed)(v).jaxpr
    assert _noncanonical(after) == []
    assert primitive in _primitives(after)  # re-bound, not inlined away
    assert _has_noncanonical_conv(jax.make_jaxpr(plain)(v).jaxpr) and not _has_noncanonical_conv(after)

    expected = jax.jit(plain)(v)
    if case == "cond":  # eager and plain jit too (cheapest case; the loop below is jitted)
        _assert_close(fixed(v), expected)
        _assert_close(jax.jit(fixed)(v), expected)
    # under jit, inside a solver-like loop body (where the layout matters on XLA:CPU); one
    # trip, but a dynamic count, so XLA keeps the while loop
    looped = jax.jit(lambda v, n: lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, fixed(v)),
                                                 (0, jax.tree_util.tree_map(jnp.zeros_like, v)))[1])
    _assert_close(looped(v, 1), expected)


def test_convs_inside_a_while_loop_are_rewritten(x64):
    loss, w = _while_loss()
    # forward-over-forward second directional derivative (while_loop has no reverse mode)
    plain = lambda v: jax.jvp(lambda w: jax.jvp(loss, (w,), (v,))[1], (w,), (v,))[1]
    nchw = lambda w: lax.conv_general_dilated(w, w, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))
    f = lambda v: lax.while_loop(lambda c: c[0] < 1, lambda c: (c[0] + 1, nchw(c[1]) + plain(v)), (0, v))[1]
    fixed = canonicalize_convolutions(f)
    v = jnp.cos(jnp.arange(w.size, dtype=w.dtype)).reshape(w.shape)
    assert any("while" in path for path in _noncanonical(jax.make_jaxpr(f)(v).jaxpr))
    after = jax.make_jaxpr(fixed)(v).jaxpr
    assert _noncanonical(after) == [] and "while" in _primitives(after)
    _assert_close(jax.jit(fixed)(v), jax.jit(f)(v))


def test_custom_jvp_keeps_its_rule_and_is_rewritten(x64):
    @jax.custom_jvp
    def conv(x, w):
        return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))

    @conv.defjvp
    def _(primals, tangents):  # the true JVP, scaled by 2: shows whether the custom rule is used
        (x, w), (dx, dw) = primals, tangents
        return conv(x, w), 2.0 * (conv(dx, w) + conv(x, dw))

    x, w = _normal(7, (2, 2, 6, 6)), _normal(8, (3, 2, 3, 3))
    f = lambda w: jnp.sum(jnp.sin(conv(x, w)))
    fixed = canonicalize_convolutions(f)
    after = jax.make_jaxpr(fixed)(w).jaxpr
    assert _noncanonical(after) == [] and "custom_jvp_call" in _primitives(after)
    _assert_close(jax.jit(fixed)(w), jax.jit(f)(w))
    _assert_close(jax.jit(jax.grad(fixed))(w), jax.jit(jax.grad(f))(w))  # custom rule still applies


def test_custom_vjp_keeps_its_rule_and_is_rewritten(x64):
    conv = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))
    c = jax.custom_vjp(conv)
    c.defvjp(lambda x, w: (conv(x, w), None), lambda _, g: (None, jnp.full((3, 2, 3, 3), jnp.sum(g))))
    x, w = _normal(11, (2, 2, 6, 6)), _normal(12, (3, 2, 3, 3))
    f = lambda w: jnp.sum(jnp.sin(c(x, w)))
    fixed = canonicalize_convolutions(f)
    after = jax.make_jaxpr(fixed)(w).jaxpr
    assert _noncanonical(after) == [] and "custom_vjp_call" in _primitives(after)
    _assert_close(jax.jit(fixed)(w), jax.jit(f)(w))
    _assert_close(jax.jit(jax.grad(fixed))(w), jax.jit(jax.grad(f))(w))  # custom (non-true) bwd kept


def test_unknown_higher_order_primitive_is_left_untouched(x64):
    mesh = Mesh(np.array(jax.devices()[:1]), ("d",))
    conv = lambda w, x: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))
    sharded = jax.shard_map(conv, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec()),
                            out_specs=PartitionSpec())
    x = _normal(9, (2, 2, 6, 6))
    f = lambda w: jnp.sum(sharded(w, x) * conv(w, x))  # one conv inside shard_map, one outside
    fixed = canonicalize_convolutions(f)
    w = _normal(10, (3, 2, 3, 3))
    before, after = jax.make_jaxpr(f)(w).jaxpr, jax.make_jaxpr(fixed)(w).jaxpr
    inner = lambda j: [str(s) for _, e in _walk(j) if e.primitive.name == "shard_map" for s in _sub_jaxprs(e.params)]
    assert inner(after) == inner(before) and len(inner(before)) == 1  # bound as it was
    assert _noncanonical(after) == [("shard_map",)]  # only the outside conv was rewritten
    _assert_close(fixed(w), f(w))


def test_enabled_false_returns_the_function_itself():
    f = lambda v: v
    assert canonicalize_convolutions(f, enabled=False) is f
    assert canonicalize_convolutions(conv_net) is not conv_net  # enabled by default (on CPU)


def test_canonical_only_functions_run_as_is(x64):
    calls = []

    def f(w, x):
        calls.append(1)
        return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    w, x = jnp.ones((3, 3, 2, 3)), jnp.ones((1, 6, 6, 2))
    out = canonicalize_convolutions(f)(w, x)
    np.testing.assert_array_equal(out, f(w, x))
    assert len(calls) == 3  # traced once to inspect, then called as-is (no re-evaluation)


def test_operators_enter_solver_loops_rewritten_once_unless_opted_out():
    from gifjax import operators, solvers

    loss = lambda w: jnp.sum(w ** 2)
    for flag in (True, False):
        op = operators.Curvature(conv_layout=flag).resolve(loss, jnp.ones(3))
        prepared = solvers.CG().init(op).operator
        assert (prepared.matvec is op.matvec) is (not flag or jax.default_backend() != "cpu")
        assert not prepared.conv_layout  # never wrapped twice
        chex_close = jnp.allclose(prepared.matvec(jnp.ones(3)), op.matvec(jnp.ones(3)))
        assert bool(chex_close)
