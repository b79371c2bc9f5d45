"""HVP primitives against dense jax.hessian oracles."""

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gifjax
from conftest import RTOL, make_problem, rel_err


def _vec(problem, seed=1):
    flat = problem.flat(problem.params)
    return problem.unravel(jax.random.normal(jax.random.key(seed), flat.shape, flat.dtype))


def test_hvp_matches_dense_hessian(problem, dtype):
    v = _vec(problem)
    hv = gifjax.hvp(problem.loss, problem.params, v, problem.x, problem.y)
    assert rel_err(problem.flat(hv), problem.hessian @ problem.flat(v)) < RTOL[dtype]
    chex.assert_trees_all_equal_shapes_and_dtypes(hv, problem.params)


def test_damping_adds_lambda_v(problem, dtype):
    v = _vec(problem)
    hv = gifjax.hvp(problem.loss, problem.params, v, problem.x, problem.y, damping=0.7)
    expected = (problem.hessian + 0.7 * jnp.eye(problem.hessian.shape[0])) @ problem.flat(v)
    assert rel_err(problem.flat(hv), expected) < RTOL[dtype]


def test_linearized_equals_hvp(problem, dtype):
    v = _vec(problem)
    op = gifjax.linearize_hvp(problem.loss, problem.params, problem.x, problem.y, damping=0.3)
    ref = gifjax.hvp(problem.loss, problem.params, v, problem.x, problem.y, damping=0.3)
    assert rel_err(problem.flat(op(v)), problem.flat(ref)) < RTOL[dtype] / 10


@pytest.mark.parametrize("chunk", [1, 5, 8, 24, 100])
def test_batched_hvp_equals_full_batch(chunk, x64):
    # 24 examples: chunk 5 leaves a remainder of 4, chunk 100 is clipped to 24.
    problem = make_problem("mlp", x64)
    v = _vec(problem)
    hv = gifjax.batched_hvp(problem.loss, problem.params, v, problem.x, problem.y, chunk_size=chunk)
    assert rel_err(problem.flat(hv), problem.hessian @ problem.flat(v)) < 1e-10


def test_masked_hvp_is_zero_off_mask_and_equals_PHP(problem, dtype):
    mask = gifjax.masks.random_mask(jax.random.key(3), problem.params, fraction=0.3)
    v = _vec(problem)
    out = gifjax.masked_hvp(problem.loss, problem.params, v, mask, problem.x, problem.y)
    m = problem.flat(jax.tree_util.tree_map(lambda a: a.astype(dtype), mask))
    expected = m * (problem.hessian @ (m * problem.flat(v)))
    flat_out = problem.flat(out)
    assert np.all(np.asarray(flat_out)[np.asarray(m) == 0] == 0)  # exactly zero
    assert rel_err(flat_out, expected) < RTOL[dtype]


def test_hvp_is_symmetric(problem, dtype):
    u, v = _vec(problem, 1), _vec(problem, 2)
    Hu = gifjax.hvp(problem.loss, problem.params, u, problem.x, problem.y)
    Hv = gifjax.hvp(problem.loss, problem.params, v, problem.x, problem.y)
    a = float(jnp.vdot(problem.flat(u), problem.flat(Hv)))
    b = float(jnp.vdot(problem.flat(Hu), problem.flat(v)))
    assert abs(a - b) <= RTOL[dtype] * max(abs(a), 1.0)


def test_jit_equals_eager(x64):
    problem = make_problem("cnn", x64)
    v = _vec(problem)
    f = lambda p, v: gifjax.hvp(problem.loss, p, v, problem.x, problem.y)
    chex.assert_trees_all_close(jax.jit(f)(problem.params, v), f(problem.params, v), rtol=1e-12)


class Pair(NamedTuple):
    w: jax.Array
    b: jax.Array


@pytest.mark.parametrize("container", ["dict", "list", "tuple", "namedtuple", "nested"])
def test_pytree_structure_and_dtypes_preserved(container, x64):
    w = jnp.arange(1.0, 7.0).reshape(2, 3)
    b = jnp.array([0.5, -1.0, 2.0], jnp.float32)  # mixed dtypes on purpose
    params = {"dict": {"w": w, "b": b}, "list": [w, b], "tuple": (w, b),
              "namedtuple": Pair(w, b), "nested": {"layer": [Pair(w, b)]}}[container]

    def loss(p):
        leaves = jax.tree_util.tree_leaves(p)
        return jnp.sum(jnp.sin(leaves[0]) ** 2) * jnp.sum(leaves[1].astype(jnp.float64) ** 3)

    v = jax.tree_util.tree_map(jnp.ones_like, params)
    out = gifjax.hvp(loss, params, v)
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(params)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, params)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    H = jax.hessian(lambda f: loss(unravel(f)))(flat)
    assert rel_err(jax.flatten_util.ravel_pytree(out)[0], H @ jnp.ones_like(flat)) < 1e-6


def test_flax_variables_tree():
    import flax.linen as nn

    model = nn.Dense(3)
    x = jnp.ones((4, 2))
    variables = model.init(jax.random.key(0), x)
    loss = lambda p: jnp.sum(model.apply({"params": p}, x) ** 2)
    v = jax.tree_util.tree_map(jnp.ones_like, variables["params"])
    out = gifjax.hvp(loss, variables["params"], v)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, variables["params"])
