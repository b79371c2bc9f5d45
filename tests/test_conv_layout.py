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
