"""Parameter selection: unit scores (linen, nnx, plain), selection rules → masks, reports, errors.

Expected scores are computed independently, with plain jnp forwards of the same
parameters (jax.lax convolutions, hand-written norms) and jax.grad taken with
respect to each intermediate output.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gifjax
import gifjax.selection as sel

KEY = jax.random.key(0)
RATIOS = [float(r) for r in np.round(np.linspace(0.01, 1.0, 34), 4)]


def close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def xent(logits, y):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def abs_mean(y):
    """Expected unit score: |mean over every axis but the last|."""
    return jnp.abs(jnp.mean(y.reshape(-1, y.shape[-1]), axis=0))


def conv(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def leaves_equal(a, b) -> bool:
    leaves = jax.tree_util.tree_leaves
    return all(bool(jnp.all(x == y)) for x, y in zip(leaves(a), leaves(b)))


# --------------------------------------------------------------------------- tiny models


class LinenMLP(nn.Module):
    """Dense(4) → tanh → Dense(3, no bias) → LayerNorm → Dense(2)."""

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(4)(x))
        h = nn.LayerNorm()(nn.Dense(3, use_bias=False)(h))
        return nn.Dense(2)(h)


class LinenCNN(nn.Module):
    """Conv 3×3 (3 ch) → relu → Conv 2×2 (2 ch, no bias) → BatchNorm → Dense(3)."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(3, (3, 3), padding="VALID")(x))
        h = nn.Conv(2, (2, 2), padding="VALID", use_bias=False)(h)
        h = nn.BatchNorm(use_running_average=True)(h)
        return nn.Dense(3)(h.reshape(h.shape[0], -1))


class NnxNet(nnx.Module):
    """Conv 3×3 (3 ch) → relu → Linear(27→4, no bias) → BatchNorm → Linear(4→2)."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 3, (3, 3), padding="VALID", rngs=rngs)
        self.hidden = nnx.Linear(27, 4, use_bias=False, rngs=rngs)
        self.norm = nnx.BatchNorm(4, use_running_average=True, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.conv(x))
        return self.head(self.norm(self.hidden(h.reshape(h.shape[0], -1))))


@pytest.fixture(scope="module")
def mlp():
    kx, ky, kp = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (6, 5))
    y = jax.random.randint(ky, (6,), 0, 2)
    model = LinenMLP()
    variables = jax.jit(model.init)(kp, x)  # jit: op-by-op init compiles every op
    # Non-zero biases and a non-trivial LayerNorm so every term shows in the scores.
    rng = np.random.default_rng(1)
    variables = jax.tree_util.tree_map(lambda p: p + np.float32(0.3) * rng.normal(size=p.shape), variables)
    return model, variables, x, y


@pytest.fixture(scope="module")
def cnn():
    kx, ky, kp = jax.random.split(jax.random.key(2), 3)
    x = jax.random.normal(kx, (4, 5, 5, 1))
    y = jax.random.randint(ky, (4,), 0, 3)
    model = LinenCNN()
    variables = jax.jit(model.init)(kp, x)  # jit: op-by-op init compiles every op
    variables = {"params": jax.tree_util.tree_map(lambda p: p + 0.2, variables["params"]),
                 "batch_stats": {"BatchNorm_0": {"mean": jnp.array([0.1, -0.2]),
                                                 "var": jnp.array([0.5, 2.0])}}}
    return model, variables, x, y


def mlp_reference(p, x, y):
    """Plain-jnp layer outputs of LinenMLP and the loss as a function of each of them."""
    d0, d1, ln, d2 = p["Dense_0"], p["Dense_1"], p["LayerNorm_0"], p["Dense_2"]

    def layer_norm(h):
        mu, var = jnp.mean(h, -1, keepdims=True), jnp.var(h, -1, keepdims=True)
        return (h - mu) / jnp.sqrt(var + 1e-6) * ln["scale"] + ln["bias"]

    from_out = lambda out: xent(out, y)
    from_h1 = lambda h1: from_out(layer_norm(h1) @ d2["kernel"] + d2["bias"])
    from_h0 = lambda h0: from_h1(jnp.tanh(h0) @ d1["kernel"])
    h0 = x @ d0["kernel"] + d0["bias"]
    h1 = jnp.tanh(h0) @ d1["kernel"]
    out = layer_norm(h1) @ d2["kernel"] + d2["bias"]
    return {("Dense_0",): (h0, from_h0), ("Dense_1",): (h1, from_h1), ("Dense_2",): (out, from_out)}


# --------------------------------------------------------------------------- unit scores


def test_linen_mlp_scores_match_plain_jnp(mlp):
    model, variables, x, y = mlp
    ref = mlp_reference(variables["params"], x, y)
    act = sel.activation_scores(model, variables, x)
    grad = sel.gradient_scores(model, variables, x, lambda out: xent(out, y))
    assert list(act) == list(grad) == [("Dense_0",), ("Dense_1",), ("Dense_2",)]  # LayerNorm ineligible
    for path, (h, from_h) in ref.items():
        close(act[path], abs_mean(h))
        close(grad[path], abs_mean(jax.grad(from_h)(h)))
    # Closed form at the head: ∂ mean-xent / ∂ logits = (softmax − onehot) / N.
    out = ref[("Dense_2",)][0]
    close(grad[("Dense_2",)], jnp.abs(jnp.mean((jax.nn.softmax(out) - jax.nn.one_hot(y, 2)) / len(y), 0)))


def test_linen_cnn_scores_match_plain_jnp(cnn):
    model, variables, x, y = cnn
    p, stats = variables["params"], variables["batch_stats"]["BatchNorm_0"]

    def from_c1(c1):
        bn = p["BatchNorm_0"]
        h = (c1 - stats["mean"]) / jnp.sqrt(stats["var"] + 1e-5) * bn["scale"] + bn["bias"]
        return xent(h.reshape(len(x), -1) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"], y)

    from_c0 = lambda c0: from_c1(conv(jax.nn.relu(c0), p["Conv_1"]["kernel"]))
    c0 = conv(x, p["Conv_0"]["kernel"]) + p["Conv_0"]["bias"]
    c1 = conv(jax.nn.relu(c0), p["Conv_1"]["kernel"])
    act = sel.activation_scores(model, variables, x)
    grad = sel.gradient_scores(model, variables, x, lambda out: xent(out, y))
    assert set(act) == {("Conv_0",), ("Conv_1",), ("Dense_0",)}  # BatchNorm ineligible
    close(act[("Conv_0",)], abs_mean(c0))   # mean over batch and both spatial axes
    close(act[("Conv_1",)], abs_mean(c1))
    close(grad[("Conv_0",)], abs_mean(jax.grad(from_c0)(c0)))
    close(grad[("Conv_1",)], abs_mean(jax.grad(from_c1)(c1)))


def test_nnx_scores_match_plain_jnp_and_leave_the_module_alone():
    x = jax.random.normal(jax.random.key(3), (4, 5, 5, 1))
    y = jnp.array([0, 1, 1, 0])
    model = NnxNet(nnx.Rngs(0))
    model.norm.mean[...] = jnp.array([0.1, 0.0, -0.1, 0.2])
    before = model(x)
    params = nnx.state(model, nnx.Param)

    def reference(p):
        c = conv(x, p["conv"]["kernel"][...]) + p["conv"]["bias"][...]
        h = jax.nn.relu(c).reshape(len(x), -1) @ p["hidden"]["kernel"][...]
        bn = p["norm"]

        def from_h(h):
            normed = (h - model.norm.mean[...]) / jnp.sqrt(model.norm.var[...] + 1e-5)
            normed = normed * bn["scale"][...] + bn["bias"][...]
            return xent(normed @ p["head"]["kernel"][...] + p["head"]["bias"][...], y)

        from_c = lambda c: from_h(jax.nn.relu(c).reshape(len(x), -1) @ p["hidden"]["kernel"][...])
        return {("conv",): (c, from_c), ("hidden",): (h, from_h)}

    loss = lambda out: xent(out, y)
    for p, variables in [(params, None), (jax.tree_util.tree_map(lambda a: 1.5 * a, params), "given")]:
        variables = p if variables else None
        act = sel.activation_scores(model, variables, x)
        grad = sel.gradient_scores(model, variables, x, loss)
        assert set(act) == set(grad) == {("conv",), ("hidden",), ("head",)}  # BatchNorm ineligible
        for path, (h, from_h) in reference(p).items():
            close(act[path], abs_mean(h))
            close(grad[path], abs_mean(jax.grad(from_h)(h)))
    assert type(model.conv) is nnx.Conv and type(model.hidden) is nnx.Linear
    close(model(x), before)
    mask = sel.select(params, grad, 0.3, key=KEY)
    assert jax.tree_util.tree_structure(mask) == jax.tree_util.tree_structure(params)
    assert not any(bool(jnp.any(m)) for m in jax.tree_util.tree_leaves(mask["norm"]))


def test_dense_general_units_are_flattened_features():
    x = jax.random.normal(jax.random.key(4), (5, 4))
    model = nn.DenseGeneral((2, 3))
    variables = model.init(KEY, x)
    p = variables["params"]
    scores = sel.activation_scores(model, variables, x)
    expected = abs_mean((jnp.einsum("ni,ijk->njk", x, p["kernel"]) + p["bias"]).reshape(5, 6))
    close(scores[()], expected)
    mask = sel.select(p, scores, 0.5)  # 4·6 + 6 = 30 → 15 = three whole units of 5
    top = np.argsort(-np.asarray(expected))[:3]
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(mask["bias"]).ravel()), np.sort(top))
    assert np.asarray(mask["kernel"]).reshape(4, 6)[:, top].all() and int(mask["kernel"].sum()) == 12


def test_layer_filter_makes_norm_layers_eligible(mlp):
    model, variables, x, y = mlp
    scores = sel.activation_scores(model, variables, x, layers=(nn.Dense, nn.LayerNorm))
    assert ("LayerNorm_0",) in scores
    only_norm = sel.activation_scores(model, variables, x, layers=lambda path, m: isinstance(m, nn.LayerNorm))
    assert list(only_norm) == [("LayerNorm_0",)]
    h1 = mlp_reference(variables["params"], x, y)[("Dense_1",)][0]
    ln = variables["params"]["LayerNorm_0"]
    normed = (h1 - h1.mean(-1, keepdims=True)) / jnp.sqrt(h1.var(-1, keepdims=True) + 1e-6)
    close(only_norm[("LayerNorm_0",)], abs_mean(normed * ln["scale"] + ln["bias"]))
    mask = sel.select(variables["params"], only_norm, 2 / 6)  # units are (scale[j], bias[j]): 2 = one unit
    j = int(np.argmax(np.asarray(only_norm[("LayerNorm_0",)])))
    assert bool(mask["LayerNorm_0"]["scale"][j]) and bool(mask["LayerNorm_0"]["bias"][j])
    assert int(gifjax.masks.count(mask)) == 2


def test_layer_called_twice_averages_its_calls():
    class Twice(nn.Module):
        @nn.compact
        def __call__(self, x):
            dense = nn.Dense(3)
            return dense(x) + dense(-2.0 * x)  # opposite-signed means: averaging comes before |·|

    x = jax.random.normal(jax.random.key(5), (4, 3))
    variables = Twice().init(KEY, x)
    p = variables["params"]["Dense_0"]
    first, second = x @ p["kernel"] + p["bias"], (-2 * x) @ p["kernel"] + p["bias"]
    scores = sel.activation_scores(Twice(), variables, x)
    close(scores[("Dense_0",)], jnp.abs((first.mean(0) + second.mean(0)) / 2))


def test_one_compiled_pass_is_reused(mlp):
    model, variables, x, y = mlp
    traces = []

    def loss(out):
        traces.append(1)
        return xent(out, y)

    a = sel.gradient_scores(model, variables, x, loss)
    b = sel.gradient_scores(model, variables, x, loss)
    assert len(traces) == 1 and leaves_equal(a, b)


def test_plain_path_for_params_outside_flax():
    params = {"dense1": {"kernel": jax.random.normal(KEY, (4, 6)), "bias": jnp.zeros(6)},
              "dense2": {"kernel": jax.random.normal(jax.random.key(6), (6, 3)), "bias": jnp.ones(3)}}
    x = jax.random.normal(jax.random.key(7), (10, 4))
    h1 = x @ params["dense1"]["kernel"] + params["dense1"]["bias"]
    out = jnp.tanh(h1) @ params["dense2"]["kernel"] + params["dense2"]["bias"]
    scores = sel.unit_scores({("dense1",): h1, ("dense2",): out})
    close(scores[("dense1",)], abs_mean(h1))
    mask = sel.select(params, scores, 0.5)
    assert int(mask["dense1"]["kernel"].sum() + mask["dense1"]["bias"].sum()) == 15
    assert int(mask["dense2"]["kernel"].sum() + mask["dense2"]["bias"].sum()) == 10


# --------------------------------------------------------------------------- rules → masks

# Three eligible layers of different kinds and an unscored norm layer.
PARAMS = {
    "dense": {"kernel": jnp.zeros((7, 5)), "bias": jnp.zeros(5)},                            # unit 8, size 40
    "conv": {"kernel": jnp.zeros((3, 3, 2, 4))},                                             # unit 18, size 72
    "block": {"general": {"kernel": jnp.zeros((3, 2, 3)), "bias": jnp.zeros((2, 3))}},       # unit 4, size 24
    "norm": {"scale": jnp.ones(5), "bias": jnp.zeros(5)},
}
_rng = np.random.default_rng(0)
SCORES = {("dense",): _rng.permutation(5) + 0.5, ("conv",): _rng.permutation(4) * 0.1,
          ("block", "general"): _rng.permutation(6) * 2.0}


def layer_of(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def per_unit(mask, path, units):
    """(selected entries per unit, unit size, bias mask or None), read straight from the mask."""
    layer = layer_of(mask, path)
    kernel = np.asarray(layer["kernel"]).reshape(-1, units)
    bias = np.asarray(layer["bias"]).reshape(units) if "bias" in layer else None
    counts = kernel.sum(0) + (bias if bias is not None else 0)
    return counts, kernel.shape[0] + (bias is not None), bias


def layer_count(mask, path):
    return sum(int(np.sum(m)) for m in jax.tree_util.tree_leaves(layer_of(mask, path)))


def layer_size(path):
    return sum(int(np.size(m)) for m in jax.tree_util.tree_leaves(layer_of(PARAMS, path)))


@pytest.mark.parametrize("rule", ["highest", "lowest", "exclusive", "threshold", "random"])
def test_per_layer_count_is_exact_for_every_ratio(rule):
    for ratio in RATIOS:
        if rule == "exclusive" and ratio > 0.5:
            continue
        mask = sel.select(PARAMS, SCORES, ratio, rule=rule, key=KEY)
        assert jax.tree_util.tree_structure(mask) == jax.tree_util.tree_structure(PARAMS)
        for m, p in zip(jax.tree_util.tree_leaves(mask), jax.tree_util.tree_leaves(PARAMS)):
            assert m.dtype == jnp.bool_ and m.shape == p.shape
        for path in SCORES:
            assert layer_count(mask, path) == math.floor(ratio * layer_size(path)), (rule, ratio, path)
        assert layer_count(mask, ("norm",)) == 0  # unscored layers untouched


@pytest.mark.parametrize("rule", ["highest", "lowest"])
def test_whole_units_in_rank_order_then_one_partial_kernel_slice(rule):
    for ratio in RATIOS:
        mask = sel.select(PARAMS, SCORES, ratio, rule=rule)
        for path, s in SCORES.items():
            counts, unit, bias = per_unit(mask, path, len(s))
            whole, rest = divmod(math.floor(ratio * layer_size(path)), unit)
            rank = np.argsort(-s if rule == "highest" else s)
            assert np.all(counts[rank[:whole]] == unit)
            if rest:
                assert counts[rank[whole]] == rest
                assert bias is None or not bias[rank[whole]]  # the partial unit's bias stays out
            assert np.all(counts[rank[whole + (rest > 0):]] == 0)


def test_partial_unit_never_takes_its_bias():
    params = {"d": {"kernel": jnp.zeros((1, 6)), "bias": jnp.zeros(6)}}  # unit = 1 weight + 1 bias
    scores = {("d",): np.arange(6.0)}
    for seed in range(8):
        mask = sel.select(params, scores, 0.25, key=jax.random.key(seed))  # 3 = unit 5 + 1 entry of unit 4
        np.testing.assert_array_equal(np.asarray(mask["d"]["bias"]), [0, 0, 0, 0, 0, 1])
        np.testing.assert_array_equal(np.asarray(mask["d"]["kernel"])[0], [0, 0, 0, 0, 1, 1])


def test_lowest_is_highest_of_negated_scores():
    negated = {k: -v for k, v in SCORES.items()}
    for ratio in (0.05, 0.3, 0.77):
        assert leaves_equal(sel.select(PARAMS, SCORES, ratio, rule="lowest", key=KEY),
                            sel.select(PARAMS, negated, ratio, rule="highest", key=KEY))


def test_exclusive_never_touches_the_top_units():
    seen = set()
    for ratio in (0.1, 0.25, 0.4, 0.5):
        for seed in range(6):
            mask = sel.select(PARAMS, SCORES, ratio, rule="exclusive", key=jax.random.key(seed))
            for path, s in SCORES.items():
                counts, unit, _ = per_unit(mask, path, len(s))
                whole, rest = divmod(math.floor(ratio * layer_size(path)), unit)
                assert np.all(counts[np.argsort(-s)[:whole]] == 0)
                assert np.sum(counts == unit) == whole
                assert np.sum((counts > 0) & (counts < unit)) == (rest > 0)
            seen.add(tuple(np.flatnonzero(np.asarray(mask["dense"]["bias"]))))
    assert len(seen) > 2  # random among the rest, not a fixed choice


def test_threshold_lowers_tau_until_enough_units_exceed_it():
    params = {"dense": PARAMS["dense"]}
    scores = {("dense",): np.array([0.95, 0.3, 0.62, 0.58, 0.1])}
    # 16 = two whole units of 8. Step 0.1: τ 1.0 → 0.6 admits exactly units {0, 2}.
    mask = sel.select(params, scores, 0.4, rule="threshold", key=KEY, threshold_step=0.1)
    np.testing.assert_array_equal(np.asarray(mask["dense"]["bias"]), [True, False, True, False, False])
    # Step 0.25: τ 1.0 → 0.5 admits {0, 2, 3}; two of them are drawn at random.
    chosen = set()
    for seed in range(12):
        mask = sel.select(params, scores, 0.4, rule="threshold", key=jax.random.key(seed),
                          threshold_step=0.25)
        units = np.flatnonzero(np.asarray(mask["dense"]["bias"]))
        assert len(units) == 2 and set(units) <= {0, 2, 3}
        chosen |= set(units)
    assert chosen == {0, 2, 3}


def test_random_is_element_level_and_keyed():
    a = sel.select(PARAMS, SCORES, 0.5, rule="random", key=jax.random.key(1))
    b = sel.select(PARAMS, SCORES, 0.5, rule="random", key=jax.random.key(1))
    c = sel.select(PARAMS, SCORES, 0.5, rule="random", key=jax.random.key(2))
    assert leaves_equal(a, b) and not leaves_equal(a, c)
    counts, unit, _ = per_unit(a, ("dense",), 5)
    assert np.sum((counts > 0) & (counts < unit)) > 1  # entries, not units


@pytest.mark.parametrize("rule", ["highest", "exclusive", "threshold"])
def test_determinism_given_a_key_and_key_sensitivity(rule):
    ratio = 0.23  # leaves partial units of several entries in every layer
    a = sel.select(PARAMS, SCORES, ratio, rule=rule, key=jax.random.key(3), threshold=0.0)
    b = sel.select(PARAMS, SCORES, ratio, rule=rule, key=jax.random.key(3), threshold=0.0)
    c = sel.select(PARAMS, SCORES, ratio, rule=rule, key=jax.random.key(4), threshold=0.0)
    assert leaves_equal(a, b) and not leaves_equal(a, c)


def test_default_and_legacy_keys():
    default = sel.select(PARAMS, SCORES, 0.23)
    assert leaves_equal(default, sel.select(PARAMS, SCORES, 0.23, key=jax.random.key(0)))
    assert leaves_equal(default, sel.select(PARAMS, SCORES, 0.23, key=jax.random.PRNGKey(0)))


def test_global_budget_ranks_units_across_layers():
    # Every dense unit outranks every block unit, which outranks every conv unit.
    scores = {("dense",): 10 + SCORES[("dense",)], ("conv",): SCORES[("conv",)],
              ("block", "general"): 5 + 0.01 * SCORES[("block", "general")]}
    scored_size = 40 + 72 + 24
    for ratio in RATIOS:
        mask = sel.select(PARAMS, scores, ratio, budget="global", key=KEY)
        assert sum(layer_count(mask, p) for p in scores) == math.floor(ratio * scored_size)
    mask = sel.select(PARAMS, scores, 0.3, budget="global")        # 40: all of dense, nothing else
    assert layer_count(mask, ("dense",)) == 40 and layer_count(mask, ("conv",)) == 0
    mask = sel.select(PARAMS, scores, 0.4, budget="global")        # 54 = dense + 3 units + 2 of block
    counts, unit, _ = per_unit(mask, ("block", "general"), 6)
    assert layer_count(mask, ("dense",)) == 40 and sorted(counts) == [0, 0, 2, 4, 4, 4]
    for rule in ("random", "exclusive"):
        mask = sel.select(PARAMS, scores, 0.4, rule=rule, budget="global", key=KEY)
        assert sum(layer_count(mask, p) for p in scores) == 54
    assert layer_count(mask, ("dense",)) == 0  # exclusive: the globally top units are dense's five


def test_magnitude_is_a_global_top_k_over_all_parameters():
    leaves, treedef = jax.tree_util.tree_flatten(PARAMS)
    rng = np.random.default_rng(3)
    grads = jax.tree_util.tree_unflatten(treedef, [rng.normal(size=p.shape) for p in leaves])
    total = sum(p.size for p in leaves)
    for ratio in (0.01, 0.1, 0.5, 1.0):
        mask = sel.select(PARAMS, grads, ratio, rule="magnitude")
        m = np.concatenate([np.asarray(a).ravel() for a in jax.tree_util.tree_leaves(mask)])
        g = np.abs(np.concatenate([np.asarray(a).ravel() for a in jax.tree_util.tree_leaves(grads)]))
        assert m.sum() == math.floor(ratio * total)
        assert ratio == 1.0 or g[m].min() >= g[~m].max()


def test_paths_as_strings_and_nested_dicts_are_equivalent():
    general = SCORES[("block", "general")]
    strings = {"dense": SCORES[("dense",)], "conv": SCORES[("conv",)], "block/general": general}
    nested = {"dense": SCORES[("dense",)], "conv": SCORES[("conv",)], "block": {"general": general}}
    reference = sel.select(PARAMS, SCORES, 0.3)
    assert leaves_equal(reference, sel.select(PARAMS, strings, 0.3))
    assert leaves_equal(reference, sel.select(PARAMS, nested, 0.3))


def test_report_counts_units_and_parameters():
    mask = sel.select(PARAMS, SCORES, 0.3)
    rep = sel.report(mask, SCORES)
    assert list(rep.layers) == [("block", "general"), ("conv",), ("dense",)]  # params order
    for path, s in SCORES.items():
        counts, unit, _ = per_unit(mask, path, len(s))
        r = rep.layers[path]
        assert (r.units, r.partial_units) == (np.sum(counts == unit), np.sum((counts > 0) & (counts < unit)))
        assert r.parameters == math.floor(0.3 * layer_size(path)) and r.size == layer_size(path)
        assert r.fraction == pytest.approx(r.parameters / r.size)
    assert rep.parameters == int(gifjax.masks.count(mask)) and rep.size == gifjax.masks.size(PARAMS)
    assert "dense" in rep.table() and "total" in rep.table()
    assert sel.report(mask).layers == {}


def test_mask_drives_gif_and_delta_vanishes_off_the_mask(mlp):
    model, variables, x, y = mlp
    params = variables["params"]

    def loss(p, x, y):
        l2 = sum(jnp.sum(a ** 2) for a in jax.tree_util.tree_leaves(p))
        return xent(model.apply({"params": p}, x), y) + 1e-2 * l2

    g = jax.jit(jax.grad(loss))(params, x[:2], y[:2])
    scores = sel.gradient_scores(model, variables, x[:2], lambda out: xent(out, y[:2]))
    mask = sel.select(params, scores, 0.3, key=KEY)
    # jit: the dense reference solver materialises H column by column, slow op by op.
    gif = jax.jit(lambda p, g: gifjax.influence(loss, p, g, x, y, mask=mask, method="gif", solver="dense"))
    out = gif(params, g)
    for d, m in zip(jax.tree_util.tree_leaves(out.delta), jax.tree_util.tree_leaves(mask)):
        assert np.all(np.asarray(d)[~np.asarray(m)] == 0)
    inside = np.concatenate([np.asarray(d)[np.asarray(m)] for d, m in
                             zip(jax.tree_util.tree_leaves(out.delta), jax.tree_util.tree_leaves(mask))])
    assert np.all(np.isfinite(inside)) and np.any(inside != 0)
    assert not bool(jnp.any(mask["LayerNorm_0"]["scale"]))


# --------------------------------------------------------------------------- input errors


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5, float("nan"), True, "0.1"])
def test_bad_ratio(ratio):
    with pytest.raises(ValueError, match=r"selection\.select: bad `ratio`.*\(0, 1\]"):
        sel.select(PARAMS, SCORES, ratio)


@pytest.mark.parametrize("kwargs, match", [
    (dict(ratio=0.6, rule="exclusive", key=KEY), r"bad `ratio`.*ratio <= 0\.5 for rule='exclusive'"),
    (dict(ratio=0.1, rule="best"), r"bad `rule`: got 'best'.*'highest'"),
    (dict(ratio=0.1, budget="model"), r"bad `budget`: got 'model'.*'global'"),
    (dict(ratio=0.1, rule="random"), r"bad `key`: got None.*rule='random'.*Fix: pass key="),
    (dict(ratio=0.1, rule="exclusive"), r"bad `key`: got None.*rule='exclusive'"),
    (dict(ratio=0.1, rule="threshold"), r"bad `key`: got None.*rule='threshold'"),
    (dict(ratio=0.1, rule="threshold", key=KEY, threshold_step=0.0), r"bad `threshold/threshold_step`"),
])
def test_bad_selection_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sel.select(PARAMS, SCORES, **kwargs)


@pytest.mark.parametrize("key", [3, jax.random.split(KEY, 2), np.zeros(2, np.float32)])
def test_bad_key(key):
    with pytest.raises(TypeError, match=r"selection\.select: bad `key`.*jax\.random\.key"):
        sel.select(PARAMS, SCORES, 0.1, key=key)


@pytest.mark.parametrize("scores, match", [
    ({("dense_9",): np.ones(5)}, r"bad `scores`: got a score entry for layer \('dense_9',\).*\('dense',\)"),
    ({("dense",): np.ones(4)}, r"bad `scores`: got 4 scores for layer \('dense',\).*`bias` \(5,\), `kernel` \(7, 5\)"),
    ({("dense",): np.ones((5, 1))}, r"bad `scores`: got shape \(5, 1\).*1-D"),
    ({("dense",): np.array([1.0, np.nan, 0, 0, 0])}, r"bad `scores`: got non-finite"),
    ({("block",): np.ones(6)}, r"bad `scores`: got a score entry for layer \('block',\)"),
])
def test_bad_scores(scores, match):
    with pytest.raises(ValueError, match=match):
        sel.select(PARAMS, scores, 0.1)


def test_bad_scores_type_and_magnitude_structure():
    with pytest.raises(TypeError, match=r"bad `scores`: got list.*non-empty mapping"):
        sel.select(PARAMS, [np.ones(5)], 0.1)
    with pytest.raises(TypeError, match=r"bad `scores`: got dict.*non-empty mapping"):
        sel.select(PARAMS, {}, 0.1)
    with pytest.raises(ValueError, match=r"bad `scores`: got tree structure"):
        sel.select(PARAMS, SCORES, 0.1, rule="magnitude")
    with pytest.raises(ValueError, match=r"bad `budget`.*'global' for rule='magnitude'"):
        sel.select(PARAMS, PARAMS, 0.1, rule="magnitude", budget="layer")


def test_scores_keyed_into_variables_get_a_hint(mlp):
    _, variables, _, _ = mlp
    with pytest.raises(ValueError, match=r"Pass variables\['params'\], not variables"):
        sel.select(variables, {("Dense_0",): np.ones(4)}, 0.5)


def test_bad_model_arguments(mlp):
    model, variables, x, y = mlp

    class NormOnly(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.LayerNorm()(x)

    with pytest.raises(TypeError, match=r"selection\.activation_scores: bad `model`: got function.*flax"):
        sel.activation_scores(lambda v, x: x, variables, x)
    with pytest.raises(ValueError, match=r"activation_scores: bad `variables`: got keys \['Dense_0'.*'params'"):
        sel.activation_scores(model, variables["params"], x)
    with pytest.raises(ValueError, match=r"bad `layers`.*matching at least one layer"):
        sel.activation_scores(model, variables, x, layers=nn.Conv)
    with pytest.raises(TypeError, match=r"bad `layers`: got 'Dense'"):
        sel.activation_scores(model, variables, x, layers="Dense")
    norm_only = NormOnly()
    with pytest.raises(ValueError, match=r"bad `model`: got a NormOnly that calls no Dense, DenseGeneral, Conv"):
        sel.activation_scores(norm_only, norm_only.init(KEY, x), x)
    with pytest.raises(ValueError, match=r"gradient_scores: bad `loss_fn`: got an output of shape \(6, 2\)"):
        sel.gradient_scores(model, variables, x, lambda out: out)
    with pytest.raises(TypeError, match=r"gradient_scores: bad `loss_fn`: got int"):
        sel.gradient_scores(model, variables, x, 3)
    with pytest.raises(TypeError, match=r"bad `apply_kwargs`.*as tuples"):
        sel.activation_scores(model, variables, x, mutable=["batch_stats"])
    class Pair(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x * self.param("w", nn.initializers.ones, (x.shape[-1],)), x

    class UsesPair(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(Pair()(x)[0])

    uses_pair = UsesPair()
    with pytest.raises(TypeError, match=r"activation_scores: bad `layers`: got layer Pair_0 \(Pair\) returning tuple"):
        sel.activation_scores(uses_pair, uses_pair.init(KEY, x), x, layers=(nn.Dense, Pair))
    with pytest.raises(ValueError, match=r"unit_scores: bad `outputs`: got shape \(\)"):
        sel.unit_scores({"a": jnp.float32(1.0)})


def test_bad_nnx_variables():
    model = NnxNet(nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"(?s)activation_scores: bad `variables`.*nnx\.state\(model, nnx\.Param\)"):
        sel.activation_scores(model, {"conv": jnp.zeros(3)}, jnp.zeros((2, 5, 5, 1)))


# --------------------------------------------------------------------------- issue 13: statistics, classifier controls


def test_statistics_match_plain_jnp(mlp):
    """The score ablations through a model: mean of relu(y) (activations), signed mean of output gradients."""
    model, variables, x, y = mlp
    ref = mlp_reference(variables["params"], x, y)
    act = sel.activation_scores(model, variables, x, statistic="relu_mean")
    for path, (h, _) in ref.items():
        close(act[path], jax.nn.relu(h.reshape(-1, h.shape[-1])).mean(0))
    signed = sel.gradient_scores(model, variables, x, lambda out: xent(out, y), statistic="signed_mean")
    out = ref[("Dense_2",)][0]
    close(signed[("Dense_2",)], jnp.mean((jax.nn.softmax(out) - jax.nn.one_hot(y, 2)) / len(y), 0))


@pytest.mark.slow
def test_other_statistics_match_plain_jnp(mlp):
    model, variables, x, y = mlp
    ref = mlp_reference(variables["params"], x, y)
    flat = lambda a: a.reshape(-1, a.shape[-1])
    for statistic, expect in [("signed_mean", lambda h: flat(h).mean(0)),
                              ("mean_abs", lambda h: jnp.abs(flat(h)).mean(0))]:
        act = sel.activation_scores(model, variables, x, statistic=statistic)
        for path, (h, _) in ref.items():
            close(act[path], expect(h))


def test_unit_scores_statistics():
    outs = {"a": jnp.array([[1.0, -3.0], [-2.0, 1.0]])}
    close(sel.unit_scores(outs, statistic="signed_mean")["a"], [-0.5, -1.0])
    close(sel.unit_scores(outs, statistic="mean_abs")["a"], [1.5, 2.0])
    close(sel.unit_scores(outs, statistic="relu_mean")["a"], [0.5, 0.5])
    close(sel.unit_scores(outs)["a"], [0.5, 1.0])


def _stack():
    """A 3-layer dict model: Dense_0 (4→6), Dense_1 (6→5), Dense_10 (5→4 classes: the classifier)."""
    params = {"Dense_0": {"kernel": jnp.zeros((4, 6)), "bias": jnp.zeros(6)},
              "Dense_1": {"kernel": jnp.zeros((6, 5)), "bias": jnp.zeros(5)},
              "Dense_10": {"kernel": jnp.zeros((5, 4)), "bias": jnp.zeros(4)}}
    rng = np.random.default_rng(0)
    scores = {("Dense_0",): rng.random(6), ("Dense_1",): rng.random(5),
              ("Dense_10",): np.array([0.1, 0.9, 0.3, 0.2])}  # class 1's logit row scores highest
    return params, scores


def test_classifier_layer_is_the_last_in_natural_order():
    params, scores = _stack()
    assert sel.classifier_layer(scores) == ("Dense_10",)               # not Dense_1 (string order)
    assert sel.classifier_layer({"Conv_0": jnp.ones(2), "Dense_0": jnp.ones(2)}) == ("Dense_0",)
    assert sel.classifier_layer({("layers", 2): jnp.ones(2), ("layers", 10): jnp.ones(2)}) == ("layers", 10)


@pytest.mark.parametrize("rule", ["highest", "lowest", "exclusive", "random", "threshold"])
def test_classifier_controls_apply_to_every_rule(rule):
    params, scores = _stack()
    ratio = 0.2 if rule != "threshold" else 0.3
    kw = dict(rule=rule, key=jax.random.key(3), threshold=0.5)
    base = sel.select(params, scores, ratio, **kw)
    excl = sel.select(params, scores, ratio, classifier="exclude", **kw)
    row = sel.select(params, scores, ratio, classifier="target_row", target=2, **kw)
    for m in (excl, row):  # hidden layers: exactly the mask of the plain rule
        for name in ("Dense_0", "Dense_1"):
            assert leaves_equal(m[name], base[name])
    assert not any(bool(a.any()) for a in jax.tree_util.tree_leaves(excl["Dense_10"]))   # budget dropped
    budget = math.floor(ratio * 24)                                  # classifier size 5·4 + 4 = 24
    assert sum(int(a.sum()) for a in jax.tree_util.tree_leaves(base["Dense_10"])) == budget
    head = row["Dense_10"]
    assert int(head["kernel"].sum()) + int(head["bias"].sum()) == min(budget, 6)
    assert not np.asarray(head["kernel"])[:, [0, 1, 3]].any() and not np.asarray(head["bias"])[[0, 1, 3]].any()


def test_target_row_takes_the_whole_row_when_the_budget_covers_it_and_report_says_so():
    params, scores = _stack()
    row = sel.select(params, scores, 0.5, classifier="target_row", target=0)   # budget 12 ≥ row 6
    assert row["Dense_10"]["bias"].tolist() == [True, False, False, False]
    assert row["Dense_10"]["kernel"][:, 0].all() and int(row["Dense_10"]["kernel"].sum()) == 5
    r = sel.report(row, scores, target=0)
    assert r.classifier == ("Dense_10",) and r.classifier_rows == (0,) and r.target_row is True
    assert "classifier rows (Dense_10): 0 (target 0: yes)" in r.table()
    # The official rule at 20 %: a 4-entry budget < one 6-entry row, all of it in class 1's row.
    plain = sel.report(sel.select(params, scores, 0.2), scores, target=0)
    assert plain.classifier_rows == (1,) and plain.target_row is False
    assert plain.rows_text() == "1 (target 0: no)"
    excl = sel.report(sel.select(params, scores, 0.2, classifier="exclude"), scores, target=0)
    assert excl.classifier_rows == () and excl.rows_text() == "none (target 0: no)"
    assert sel.report(row).classifier is None                         # no scores: totals only


def test_classifier_controls_with_a_global_budget_and_an_explicit_layer():
    params, scores = _stack()
    total = 4 * 6 + 6 + 6 * 5 + 5 + 24
    base = sel.select(params, scores, 0.25, budget="global")
    assert sum(int(a.sum()) for a in jax.tree_util.tree_leaves(base)) == math.floor(0.25 * total)
    excl = sel.select(params, scores, 0.25, budget="global", classifier="exclude")
    assert sum(int(a.sum()) for a in jax.tree_util.tree_leaves(excl)) == math.floor(0.25 * (total - 24))
    assert not any(bool(a.any()) for a in jax.tree_util.tree_leaves(excl["Dense_10"]))
    row = sel.select(params, scores, 0.5, classifier="target_row", target=3, classifier_layer="Dense_1")
    assert int(row["Dense_1"]["bias"].sum()) == 1 and bool(row["Dense_1"]["bias"][3])
    assert sum(int(a.sum()) for a in jax.tree_util.tree_leaves(row["Dense_10"])) == 12  # a hidden layer now


def test_classifier_control_errors():
    params, scores = _stack()
    with pytest.raises(ValueError, match=r"gifjax\.selection\.select: bad `classifier`: got 'drop'"):
        sel.select(params, scores, 0.1, classifier="drop")
    with pytest.raises(ValueError, match=r"gifjax\.selection\.select: bad `target`: got None; expected an int in \[0, 4\)"):
        sel.select(params, scores, 0.1, classifier="target_row")
    with pytest.raises(ValueError, match=r"gifjax\.selection\.select: bad `target`: got 4; expected an int in \[0, 4\)"):
        sel.select(params, scores, 0.1, classifier="target_row", target=4)
    with pytest.raises(ValueError, match=r"gifjax\.selection\.select: bad `target`: got 1; expected None for classifier='rule'"):
        sel.select(params, scores, 0.1, target=1)
    with pytest.raises(ValueError, match=r"gifjax\.selection\.select: bad `classifier_layer`: got 'head'"):
        sel.select(params, scores, 0.1, classifier="exclude", classifier_layer="head")
    with pytest.raises(ValueError, match=r"gifjax\.selection\.select: bad `classifier`: got 'exclude'; expected 'rule' for rule='magnitude'"):
        sel.select(params, params, 0.1, rule="magnitude", classifier="exclude")
    with pytest.raises(ValueError, match=r"gifjax\.selection\.report: bad `target`: got 7"):
        sel.report(sel.select(params, scores, 0.1), scores, target=7)
    with pytest.raises(ValueError, match=r"gifjax\.selection\.report: bad `scores`: got None"):
        sel.report(sel.select(params, scores, 0.1), target=0)
    with pytest.raises(ValueError, match=r"gifjax\.selection\.unit_scores: bad `statistic`: got 'max'"):
        sel.unit_scores({"a": jnp.ones((2, 2))}, statistic="max")
    with pytest.raises(ValueError, match=r"gifjax\.selection\.gradient_scores: bad `statistic`: got 'relu_mean'"):
        sel.gradient_scores(nn.Dense(2), {"params": {}}, jnp.ones((1, 1)), jnp.sum, statistic="relu_mean")
    with pytest.raises(TypeError, match=r"gifjax\.selection\.classifier_layer: bad `scores`"):
        sel.classifier_layer({})
