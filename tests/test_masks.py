"""Element masks: counts, application, gather/scatter, random masks, validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gifjax
from gifjax import masks

PARAMS = {"a": jnp.zeros((3, 4)), "b": [jnp.zeros(5), jnp.zeros((2, 2, 2))]}
TOTAL = 12 + 5 + 8


@pytest.mark.parametrize("count", [1, 7, 13, TOTAL])
def test_random_mask_has_exact_count(count):
    mask = masks.random_mask(jax.random.key(0), PARAMS, count=count)
    assert int(masks.count(mask)) == count
    assert masks.fraction(mask) == pytest.approx(count / TOTAL)
    assert jax.tree_util.tree_structure(mask) == jax.tree_util.tree_structure(PARAMS)
    assert all(m.dtype == jnp.bool_ and m.shape == p.shape
               for m, p in zip(jax.tree_util.tree_leaves(mask), jax.tree_util.tree_leaves(PARAMS)))


def test_random_mask_determinism_and_fraction():
    a = masks.random_mask(jax.random.key(1), PARAMS, fraction=0.3)
    b = masks.random_mask(jax.random.key(1), PARAMS, fraction=0.3)
    c = masks.random_mask(jax.random.key(2), PARAMS, fraction=0.3)
    assert int(masks.count(a)) == int(np.floor(0.3 * TOTAL))
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda x, y: bool(jnp.all(x == y)), a, b))
    assert not jax.tree_util.tree_all(jax.tree_util.tree_map(lambda x, y: bool(jnp.all(x == y)), a, c))


def test_apply_zeroes_outside_and_none_is_identity():
    x = jax.tree_util.tree_map(lambda p: jnp.ones_like(p) * 2.0, PARAMS)
    mask = masks.random_mask(jax.random.key(0), PARAMS, count=6)
    out = masks.apply(mask, x)
    for m, o in zip(jax.tree_util.tree_leaves(mask), jax.tree_util.tree_leaves(out)):
        np.testing.assert_array_equal(o, np.where(m, 2.0, 0.0))
    assert masks.apply(None, x) is x


def test_gather_scatter_roundtrip_matches_ravel_order():
    x = masks.random_mask(jax.random.key(0), PARAMS, count=TOTAL)  # all true
    values = jax.tree_util.tree_map(lambda p: jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape), PARAMS)
    mask = masks.random_mask(jax.random.key(4), PARAMS, count=9)
    flat = jax.flatten_util.ravel_pytree(values)[0]
    idx = masks.flat_indices(mask)
    np.testing.assert_array_equal(masks.gather(values, mask), flat[idx])
    back = masks.scatter(masks.gather(values, mask), mask, values)
    np.testing.assert_array_equal(jax.flatten_util.ravel_pytree(back)[0],
                                  jax.flatten_util.ravel_pytree(masks.apply(mask, values))[0])
    assert len(masks.flat_indices(x)) == TOTAL


def test_count_is_traceable():
    mask = masks.random_mask(jax.random.key(0), PARAMS, count=11)
    assert int(jax.jit(masks.count)(mask)) == 11


def test_validate_none_gives_full_mask():
    full = masks.validate(None, PARAMS)
    assert int(masks.count(full)) == TOTAL


def test_validate_structure_mismatch_prints_both_trees():
    bad = {"a": jnp.ones((3, 4), bool)}
    with pytest.raises(ValueError, match=r"gifjax\.masks\.validate: bad `mask`: got tree structure(.|\n)*expected the structure of `params`"):
        masks.validate(bad, PARAMS)


def test_validate_shape_mismatch():
    bad = {"a": jnp.ones((4, 3), bool), "b": [jnp.ones(5, bool), jnp.ones((2, 2, 2), bool)]}
    with pytest.raises(ValueError, match=r"got shape \(4, 3\) at \['a'\]; expected shape \(3, 4\)"):
        masks.validate(bad, PARAMS)


def test_validate_non_boolean_mask():
    bad = jax.tree_util.tree_map(lambda p: jnp.ones_like(p), PARAMS)
    with pytest.raises(TypeError, match=r"bad `mask`: got dtype float32 at \['a'\]; expected bool"):
        masks.validate(bad, PARAMS)


def test_validate_empty_mask():
    empty = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, bool), PARAMS)
    with pytest.raises(ValueError, match="no True entry"):
        masks.validate(empty, PARAMS)


def test_random_mask_bad_arguments():
    with pytest.raises(ValueError, match=r"random_mask: bad `count/fraction`"):
        masks.random_mask(jax.random.key(0), PARAMS, count=3, fraction=0.5)
    with pytest.raises(ValueError, match=r"bad `fraction`: got 1.5"):
        masks.random_mask(jax.random.key(0), PARAMS, fraction=1.5)
    with pytest.raises(ValueError, match=r"bad `count`: got 26; expected an int in \[1, 25\]"):
        masks.random_mask(jax.random.key(0), PARAMS, count=26)


def test_masked_influence_accepts_random_mask():
    mask = masks.random_mask(jax.random.key(0), {"w": jnp.zeros(4)}, count=2)
    loss = lambda w: 0.5 * jnp.sum(w**2 * jnp.arange(1.0, 5.0))
    out = gifjax.influence(loss, jnp.zeros(4), jnp.ones(4), mask=mask["w"], method="gif", solver="dense")
    np.testing.assert_array_equal(np.asarray(out.delta) != 0, np.asarray(mask["w"]))
