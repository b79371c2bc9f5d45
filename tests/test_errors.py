"""Bad input fails early, names the function and argument, shows got vs expected."""

import jax
import jax.numpy as jnp
import pytest

import gifjax
from gifjax import masks

PARAMS = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
X = jnp.ones((5, 3))


def loss(p, x):
    return jnp.mean((x @ p["w"] + p["b"]) ** 2) + 0.1 * jnp.sum(p["w"] ** 2)


G = jax.tree_util.tree_map(jnp.ones_like, PARAMS)


def call(g=G, **kw):
    kw = {"mask": None, "method": "gif", "solver": "dense", "damping": 0.0} | kw
    return gifjax.influence(loss, PARAMS, g, X, **kw)


def test_mask_tree_mismatch_names_function_and_prints_both_structures():
    with pytest.raises(ValueError, match=r"(?s)gifjax\.influence: bad `mask`: got tree structure.*'w'.*expected the structure of `params`.*'b'.*'w'"):
        call(mask={"w": jnp.ones((3, 2), bool)})


def test_mask_shape_mismatch():
    with pytest.raises(ValueError, match=r"gifjax\.influence: bad `mask`: got shape \(2, 3\) at \['w'\]; expected shape \(3, 2\)"):
        call(mask={"w": jnp.ones((2, 3), bool), "b": jnp.ones(2, bool)})


def test_non_boolean_mask():
    with pytest.raises(TypeError, match=r"gifjax\.influence: bad `mask`: got dtype float32 at \['b'\]; expected bool"):
        call(mask={"w": jnp.ones((3, 2)), "b": jnp.ones(2)})


def test_empty_mask():
    empty = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, bool), PARAMS)
    with pytest.raises(ValueError, match=r"gifjax\.influence: bad `mask`: got a mask with no True entry"):
        call(mask=empty)


def test_unknown_method():
    with pytest.raises(ValueError, match=r"gifjax\.influence: bad `method`: got 'gift'; expected one of \['fif', 'gif', 'if', 'pif'\]"):
        call(method="gift")


def test_unknown_solver():
    with pytest.raises(ValueError, match=r"gifjax\.influence: bad `solver`: got 'newton'; expected one of \['cg', 'dense', 'lissa', 'lstsq', 'richardson'\]"):
        call(solver="newton")


@pytest.mark.parametrize("damping", [-0.1, float("nan")])
def test_negative_or_nan_damping(damping):
    with pytest.raises(ValueError, match=r"gifjax\.influence: bad `damping`: got .*; expected a finite number >= 0"):
        call(damping=damping)


def test_g_not_shaped_like_params():
    with pytest.raises(ValueError, match=r"gifjax\.influence: bad `g`: got shape \(6,\) at \['w'\]; expected shape \(3, 2\).*jax\.vmap"):
        call(g={"w": jnp.ones(6), "b": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"gifjax\.influence: bad `g`: got tree structure"):
        call(g=[jnp.ones((3, 2)), jnp.ones(2)])


def test_hvp_vector_not_like_params():
    with pytest.raises(ValueError, match=r"gifjax\.hvp: bad `v`: got shape \(2,\) at \['w'\]"):
        gifjax.hvp(loss, PARAMS, {"w": jnp.ones(2), "b": jnp.ones(2)}, X)


def test_batched_hvp_bad_chunk_and_unbatched_args():
    with pytest.raises(ValueError, match=r"gifjax\.batched_hvp: bad `chunk_size`: got 0; expected a positive int"):
        gifjax.batched_hvp(loss, PARAMS, G, X, chunk_size=0)
    with pytest.raises(ValueError, match=r"gifjax\.batched_hvp: bad `\*args`: got leading axes \['4', '5'\]"):
        gifjax.batched_hvp(lambda p, x, y: loss(p, x), PARAMS, G, X, jnp.ones(4), chunk_size=2)


def test_scores_errors():
    ex_loss = lambda p, x: loss(p, x[None])
    with pytest.raises(ValueError, match=r"gifjax\.influence_scores: bad `method`: got 'loo'"):
        gifjax.influence_scores(loss, PARAMS, ex_loss, X, X, X, method="loo")
    with pytest.raises(ValueError, match=r"gifjax\.influence_scores: bad `chunk size`: got -1"):
        gifjax.influence_scores(loss, PARAMS, ex_loss, X, X, X, test_chunk_size=-1)
    with pytest.raises(ValueError, match=r"gifjax\.influence_scores: bad `test_examples`: got no examples"):
        gifjax.influence_scores(loss, PARAMS, ex_loss, X, X[:0], X)


def test_masks_validate_is_usable_directly():
    with pytest.raises(ValueError, match=r"gifjax\.masks\.validate: bad `mask`"):
        masks.validate({"w": jnp.ones((3, 2), bool)}, PARAMS)
