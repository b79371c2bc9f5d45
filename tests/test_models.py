"""Reference models: architecture, forward passes, and the loss functions influence uses."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import gifjax
from gifjax.experiments import models


def _count(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def _param_shapes(model, input_shape):
    """Parameter shapes without computing anything (cheap even for large models)."""
    x = jnp.zeros((1, *input_shape))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x))["params"]


def _batch(shape, n=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, *shape)).astype(np.float32), np.arange(n, dtype=np.int32) % 10


@pytest.mark.parametrize("name, shape", [
    ("mlp", (8, 8, 1)), ("cnn", (8, 8, 1)), ("cnn", (28, 28, 1)), ("tinynet", (28, 28, 1)),
])
def test_forward_shapes(name, shape):
    model = models.create(name, 10)
    x, _ = _batch(shape)
    variables = models.init(model, x, seed=0)
    assert set(variables) == {"params"}
    logits = jax.jit(model.apply)(variables, x)
    assert logits.shape == (3, 10) and bool(jnp.isfinite(logits).all())


def test_cnn_is_small_and_size_agnostic():
    model = models.create("cnn", 10)
    small, large = _param_shapes(model, (8, 8, 1)), _param_shapes(model, (28, 28, 1))
    assert 5_000 <= _count(small) == _count(large) <= 30_000


def test_tinynet_architecture():
    params = _param_shapes(models.create("tinynet", 10), (28, 28, 1))
    kernels = [params[f"Conv_{i}"]["kernel"].shape for i in range(4)]
    assert kernels == [(3, 3, 1, 32), (3, 3, 32, 64), (3, 3, 64, 128), (3, 3, 128, 256)]
    # 28 → 14 → 7 → 4 → 2 with stride 2 and SAME padding: 2·2·256 features.
    assert params["Dense_0"]["kernel"].shape == (1024, 10)


@pytest.mark.parametrize("name, expected", [("vgg11", 9_231_114), ("resnet18", 11_173_962)])
def test_large_models_have_the_published_cifar_sizes(name, expected):
    assert _count(_param_shapes(models.create(name, 10), (32, 32, 3))) == expected


@pytest.mark.parametrize("name, shape, expected", [
    ("mlp", (8, 8, 1), {nn.Dense}),
    ("cnn", (8, 8, 1), {nn.Dense, nn.Conv}),
    ("tinynet", (28, 28, 1), {nn.Dense, nn.Conv}),
    ("vgg11", (8, 8, 3), {nn.Dense, nn.Conv, nn.BatchNorm}),
    ("resnet18", (8, 8, 3), {nn.Dense, nn.Conv, nn.BatchNorm, models._BasicBlock}),
])
def test_layers_are_stock_flax_dense_conv_batchnorm(name, shape, expected):
    """selection finds layers by type: every submodule must be a stock linen layer."""
    model = models.create(name, 10, **({"width": 8} if name in ("vgg11", "resnet18") else {}))
    found = set()

    def record(next_fun, args, kwargs, context):
        found.add(type(context.module))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        _param_shapes(model, shape)
    assert found == expected | {type(model)}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg11", "resnet18"])
def test_batchnorm_models_give_an_eval_mode_loss_and_an_hvp(name):
    model = models.create(name, 10, width=8)  # the full architecture, narrow
    x, y = _batch((8, 8, 3), n=4)
    variables = models.init(model, x, seed=0)
    assert set(variables) == {"params", "batch_stats"}
    # Non-trivial running statistics, so eval mode differs from batch mode.
    variables["batch_stats"] = jax.tree_util.tree_map(
        lambda s: s + 0.5, variables["batch_stats"])
    loss_fn = models.make_loss_fn(model, variables, weight_decay=1e-3)
    example_loss_fn = models.make_example_loss_fn(model, variables)
    params = variables["params"]
    v = jax.tree_util.tree_map(jnp.ones_like, params)

    @jax.jit  # one compile for everything below
    def run(params, v):
        return (model.apply({**variables, "params": params}, x),
                loss_fn(params, x, y) - models.l2_penalty(params, 1e-3),
                jax.vmap(example_loss_fn, in_axes=(None, 0))(params, (x, y)),
                gifjax.hvp(loss_fn, params, v, x, y))

    logits, batch_loss, per_example, hv = run(params, v)
    assert logits.shape == (4, 10) and bool(jnp.isfinite(logits).all())
    # Eval mode: examples do not interact, so the batch loss is the mean of
    # per-example losses (train-mode BatchNorm would break this).
    np.testing.assert_allclose(batch_loss, np.mean(per_example), rtol=1e-5)
    assert jax.tree_util.tree_structure(hv) == jax.tree_util.tree_structure(params)
    flat = jax.flatten_util.ravel_pytree(hv)[0]
    assert bool(jnp.isfinite(flat).all()) and float(jnp.abs(flat).max()) > 0


def test_loss_fn_hessian_matches_dense_oracle_and_includes_weight_decay():
    model = models.create("mlp", 3, hidden=(4,))
    x, y = _batch((5,), n=6)
    y = y % 3
    variables = models.init(model, x, seed=1)
    params = variables["params"]
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    wd = 0.3
    loss_fn = models.make_loss_fn(model, variables, weight_decay=wd)
    plain = models.make_loss_fn(model, variables)
    H = jax.jit(jax.hessian(lambda f: loss_fn(unravel(f), x, y)))(flat)
    H0 = jax.jit(jax.hessian(lambda f: plain(unravel(f), x, y)))(flat)
    np.testing.assert_allclose(H - H0, wd * np.eye(len(flat)), atol=1e-5)

    v = jax.random.normal(jax.random.key(2), flat.shape)
    hv = jax.jit(lambda p, v: gifjax.hvp(loss_fn, p, v, x, y))(params, unravel(v))
    hv = jax.flatten_util.ravel_pytree(hv)[0]
    np.testing.assert_allclose(hv, H @ v, rtol=1e-4, atol=1e-5)


def test_cross_entropy_and_example_loss():
    logits = jnp.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    labels = jnp.array([0, 2])
    expected = np.mean([-jax.nn.log_softmax(logits[0])[0], np.log(3.0)])
    np.testing.assert_allclose(models.cross_entropy_loss(logits, labels), expected, rtol=1e-6)

    model = models.create("cnn", 10)
    x, y = _batch((8, 8, 1), n=2)
    variables = models.init(model, x)
    ex = models.make_example_loss_fn(model, variables)
    logits = jax.jit(model.apply)(variables, x)
    losses, grads = jax.jit(jax.vmap(jax.value_and_grad(ex), in_axes=(None, 0)))(
        variables["params"], (x, y))  # vmapped, as gifjax.influence_scores uses it
    np.testing.assert_allclose(losses[1], models.cross_entropy_loss(logits[1:], y[1:]),
                               rtol=1e-6)
    assert grads["Dense_0"]["bias"].shape == (2, 10)


def test_init_is_deterministic_by_seed():
    model = models.create("mlp", 10)
    x = np.zeros((2, 8, 8, 1), np.float32)
    a, b, c = (models.init(model, x, seed=s)["params"] for s in (0, 0, 1))
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, a, b))
    assert not np.array_equal(a["Dense_0"]["kernel"], c["Dense_0"]["kernel"])


@pytest.mark.parametrize("call, error, match", [
    (lambda: models.create("vgg16", 10), ValueError,
     r"gifjax\.experiments\.models\.create: bad `name`: got 'vgg16'; expected one of \[.*'resnet18'.*Fix"),
    (lambda: models.create("mlp", 1), ValueError,
     r"models\.create: bad `num_classes`: got 1; expected an int >= 2"),
    (lambda: models.make_loss_fn(models.create("mlp", 2), {"Dense_0": {}}), ValueError,
     r"models\.split_variables: bad `variables`.*'params'.*not variables\['params'\]"),
    (lambda: models.make_loss_fn(models.create("mlp", 2), {"params": {}}, weight_decay=-1.0),
     ValueError, r"models\.make_loss_fn: bad `weight_decay`: got -1\.0"),
    (lambda: models.init(models.create("mlp", 2), np.zeros(3)), ValueError,
     r"models\.init: bad `x`: got shape \(3,\)"),
])
def test_input_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()
