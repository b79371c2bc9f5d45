"""gifjax.stepping: moving along an update and choosing the step, against hand computations."""

from __future__ import annotations

import chex
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import gifjax
from gifjax import stepping
from gifjax.stepping import DEFAULT_STEPS, along, best_index, step_search, unit_direction

tree_map = jax.tree_util.tree_map


def moved(params, direction, s):
    return tree_map(lambda p, d: p + s * d, params, direction)


def small_net(params, x):
    """A tiny two-layer net: a pytree of outputs (logits and their mean)."""
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    out = h @ params["w2"]
    return {"logits": out, "mean": out.mean()}


def net_problem(dtype):
    k = jax.random.split(jax.random.key(0), 5)
    params = {"w1": jax.random.normal(k[0], (3, 4), dtype), "b1": jax.random.normal(k[1], (4,), dtype),
              "w2": jax.random.normal(k[2], (4, 2), dtype)}
    direction = tree_map(lambda p, kk: jax.random.normal(kk, p.shape, dtype), params,
                         {"w1": k[3], "b1": k[4], "w2": k[0]})
    x = jax.random.normal(k[1], (5, 3), dtype)
    return params, direction, x


# ----------------------------------------------------------------------------- unit_direction


def test_unit_direction_matches_the_hand_norm_over_all_leaves(x64):
    delta = {"a": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "b": (jnp.array([4.0]), jnp.array(-1.5))}
    flat = np.array([1.0, -2.0, 0.5, 3.0, 4.0, -1.5])
    d, n = unit_direction(delta)
    assert isinstance(n, jax.Array) and n.shape == () and n.dtype == jnp.float64
    np.testing.assert_allclose(float(n), np.sqrt((flat ** 2).sum()), rtol=1e-14)
    np.testing.assert_allclose(jax.flatten_util.ravel_pytree(d)[0], flat / np.linalg.norm(flat), rtol=1e-14)
    assert jax.tree_util.tree_structure(d) == jax.tree_util.tree_structure(delta)


@pytest.mark.parametrize("bad", [0.0, np.nan, np.inf])
def test_unit_direction_is_zero_for_a_zero_or_non_finite_delta(x64, bad):
    delta = {"a": jnp.array([bad, 0.0]), "b": jnp.zeros(3)}
    d, n = unit_direction(delta)
    assert all((leaf == 0).all() for leaf in jax.tree_util.tree_leaves(d))
    assert float(n) == 0.0 if bad == 0.0 else not np.isfinite(float(n))


def test_unit_direction_keeps_float32_and_does_not_overflow():
    d, n = unit_direction({"w": jnp.array([3e20, 4e20], jnp.float32)})
    assert d["w"].dtype == jnp.float32 and np.isfinite(float(n))
    np.testing.assert_allclose(d["w"], [0.6, 0.8], rtol=1e-6)


# ----------------------------------------------------------------------------- along


def test_along_equals_a_python_loop_over_the_steps(x64):
    params, direction, x = net_problem(jnp.float64)
    steps = np.array([0.0, 0.3, -1.0, 2.5])
    got = along(small_net, params, direction, steps, x)
    for k, s in enumerate(steps):
        want = small_net(moved(params, direction, s), x)
        np.testing.assert_allclose(got["logits"][k], want["logits"], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(got["mean"][k], want["mean"], rtol=1e-12, atol=1e-14)
    assert got["logits"].shape == (4, 5, 2) and got["mean"].shape == (4,)


def test_along_under_jit_and_vmap_with_traced_inputs(x64):
    params, direction, x = net_problem(jnp.float64)
    steps = jnp.array([0.0, 0.5, 1.5])
    eager = along(small_net, params, direction, steps, x)["mean"]
    jitted = jax.jit(lambda p, d, s, x: along(small_net, p, d, s, x)["mean"])(params, direction, steps, x)
    np.testing.assert_allclose(jitted, eager, rtol=1e-12)
    directions = tree_map(lambda d: jnp.stack([d, -2 * d]), direction)
    batched = jax.vmap(lambda d: along(small_net, params, d, steps, x)["mean"])(directions)
    np.testing.assert_allclose(batched[0], eager, rtol=1e-12)
    np.testing.assert_allclose(batched[1], along(small_net, params, tree_map(lambda d: -2 * d, direction),
                                                 steps, x)["mean"], rtol=1e-12)


def test_along_compiles_once_for_new_directions_and_grids():
    params, direction, x = net_problem(jnp.float32)
    fn = chex.assert_max_traces(n=1)(lambda p, x: small_net(p, x)["mean"])
    along(fn, params, direction, [0.0, 1.0, 2.0], x)
    along(fn, params, tree_map(lambda d: 3 * d, direction), [0.5, -1.0, 7.0], x)  # no retrace


def test_along_keeps_each_parameter_dtype_under_a_float64_grid(x64):
    params = {"w": jnp.ones(2, jnp.float32), "v": jnp.ones(1, jnp.float64)}
    out = along(lambda p: p, params, tree_map(jnp.ones_like, params), np.array([0.0, 0.5]))
    assert out["w"].dtype == jnp.float32 and out["v"].dtype == jnp.float64
    np.testing.assert_array_equal(out["w"], [[1.0, 1.0], [1.5, 1.5]])


def test_predictions_along_compiles_once_per_model(monkeypatch):
    from gifjax.experiments import models
    from gifjax.experiments.tasks import common

    model = models.create("mlp", 3, hidden=(4,))
    v = models.init(model, np.ones((1, 4), np.float32))
    traces = []
    call = common._ClassPredictions.__call__
    monkeypatch.setattr(common._ClassPredictions, "__call__",
                        lambda self, *a: traces.append(1) or call(self, *a))
    x = np.arange(20, dtype=np.float32).reshape(5, 4) / 20
    d = tree_map(jnp.ones_like, v["params"])
    first = common.predictions_along(model, v, d, np.array([0.0, 1.0]), x, batch_size=4)
    second = common.predictions_along(model, v, tree_map(lambda a: -a, d), np.array([0.0, 3.0]), x,
                                      batch_size=4)
    assert first.shape == second.shape == (2, 5) and len(traces) <= 1, traces
    np.testing.assert_array_equal(first[0], second[0])  # s = 0: the original model either way


# ----------------------------------------------------------------------------- step_search


def ridge(dtype, lam=0.1):
    X = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0], [2.0, 1.0], [0.5, 2.0]], dtype)
    y = jnp.array([3.0, 1.0, 1.0, 0.0, 2.0, -1.0], dtype)

    def loss(w, X, y):
        return 0.5 * jnp.mean((X @ w - y) ** 2) + 0.5 * lam * w @ w

    def fit(X, y):
        return jnp.linalg.solve(X.T @ X / len(y) + lam * jnp.eye(2, dtype=dtype), X.T @ y / len(y))

    return loss, X, y, fit


def test_step_search_keeps_the_exact_newton_step_of_ridge_removal(x64):
    loss, X, y, fit = ridge(jnp.float64)
    w = fit(X, y)
    g = gifjax.removal_gradient(loss, w, X[:2], y[:2], num_train=6)
    delta = gifjax.influence(loss, w, g, X[2:], y[2:], method="if", solver="dense").delta
    out = step_search(loss, w, delta, X[2:], y[2:])
    assert isinstance(out, gifjax.StepSearch)
    assert float(out.step) == 1.0 and int(out.index) == int(np.flatnonzero(DEFAULT_STEPS == 1.0)[0])
    np.testing.assert_allclose(out.params, fit(X[2:], y[2:]), rtol=1e-10)
    np.testing.assert_allclose(out.steps, DEFAULT_STEPS, rtol=0)
    np.testing.assert_allclose(out.values, [loss(w + s * delta, X[2:], y[2:]) for s in DEFAULT_STEPS],
                               rtol=1e-12)
    np.testing.assert_allclose(float(out.norm), np.linalg.norm(delta), rtol=1e-14)
    assert float(out.value) == float(out.values.min())


def test_normalize_measures_distances_and_maximize_flips_the_choice(x64):
    c = jnp.array([3.0, 4.0])                       # f(θ) = ‖θ − c‖², minimum at c, ‖c‖ = 5
    f = lambda th: jnp.sum((th - c) ** 2)           # noqa: E731
    th0, delta = jnp.zeros(2), 2 * c                # Δ twice too long
    grid = np.linspace(0.0, 1.0, 11)
    assert float(step_search(f, th0, delta, steps=grid).step) == pytest.approx(0.5)
    dist = step_search(f, th0, delta, steps=np.arange(0.0, 10.5, 0.5), normalize=True)
    assert float(dist.step) == 5.0 and float(dist.norm) == pytest.approx(10.0)
    np.testing.assert_allclose(dist.params, c, rtol=1e-14)
    up = step_search(lambda th: -f(th), th0, delta, steps=grid, maximize=True)
    assert float(up.step) == pytest.approx(0.5)
    worst = step_search(f, th0, delta, steps=grid, maximize=True)
    assert float(worst.step) == 0.0 and float(worst.values[0]) == float(worst.values[-1]) == 25.0


def test_ties_go_to_the_first_step_and_non_finite_values_never_win(x64):
    th0, delta = jnp.ones(2), jnp.array([1.0, -1.0])
    flat = step_search(lambda th: jnp.sum(th) * 0.0 + 1.0, th0, delta, steps=[0.0, 1.0, 2.0])
    assert int(flat.index) == 0 and float(flat.step) == 0.0
    # −2·log(1 − s): +Inf at s = 1, NaN past it; 0.5 is the largest finite value
    f = lambda th: jnp.log(1.0 - (th[0] - 1.0)) * -2.0   # noqa: E731
    out = step_search(f, th0, delta, steps=[0.0, 0.5, 1.0, 2.0], maximize=True)
    assert not np.isfinite(np.asarray(out.values)[2:]).any() and float(out.step) == 0.5
    none = step_search(lambda th: jnp.sum(th) * jnp.nan, th0, delta, steps=[0.5, 1.0])
    assert int(none.index) == 0 and float(none.step) == 0.5   # all non-finite: index 0


def test_a_non_finite_delta_does_not_move_the_model(x64):
    th0 = jnp.array([1.0, 2.0])
    for normalize in (False, True):
        out = step_search(lambda th: jnp.sum(th ** 2), th0, jnp.array([jnp.nan, 1.0]), normalize=normalize)
        assert int(out.index) == 0 and np.isnan(float(out.norm))
        np.testing.assert_array_equal(out.params, th0)
        np.testing.assert_array_equal(out.values, np.full(len(DEFAULT_STEPS), 5.0))


def test_step_search_under_jit_equals_eager(x64):
    loss, X, y, fit = ridge(jnp.float64)
    w = fit(X, y)
    delta = jnp.array([0.3, -0.2])
    eager = step_search(loss, w, delta, X, y, steps=np.linspace(-1.0, 1.0, 9))
    jitted = jax.jit(lambda w, d, s: step_search(loss, w, d, X, y, steps=s))(w, delta, np.linspace(-1.0, 1.0, 9))
    assert int(jitted.index) == int(eager.index)
    np.testing.assert_allclose(jitted.values, eager.values, rtol=1e-12)
    np.testing.assert_allclose(jitted.params, eager.params, rtol=1e-12)


def test_best_index_rule():
    assert best_index([3.0, 1.0, np.nan, 1.0]) == 1
    assert best_index(np.array([0.2, 0.9, np.inf, 0.9]), maximize=True) == 1
    assert best_index([-np.inf, 2.0]) == 1 and best_index([np.nan, np.nan, np.inf]) == 0
    assert best_index(np.array([4, 2, 2])) == 1                         # integers
    # float64 curves compare at float64 (they differ only past float32's precision)
    assert best_index(np.array([1.0, 1.0 + 1e-12]), maximize=True) == 1
    assert isinstance(best_index([1.0, 0.0]), int)
    traced = jax.jit(lambda v: best_index(v, maximize=True))(jnp.array([0.1, jnp.nan, 0.7, 0.7]))
    assert int(traced) == 2


def test_best_index_where_keeps_the_best_among_allowed_steps():
    """The official class-removal rule: best F1 only among steps with self-accuracy below 0.5 %."""
    f1 = np.array([0.50, 0.97, 0.95, 0.90, np.nan, 0.60])
    self_acc = np.array([0.90, 0.02, 0.004, 0.0, 0.0, 0.0])
    assert best_index(f1, maximize=True) == 1
    assert best_index(f1, maximize=True, where=self_acc < 0.005) == 2       # 0.97 is not allowed
    assert best_index(f1, maximize=True, where=np.zeros(6, bool)) == 0      # none allowed: original
    assert best_index(f1, maximize=True, where=np.arange(6) == 4) == 0      # only a NaN allowed
    assert best_index([3.0, 1.0, 2.0], where=[True, False, True]) == 2      # minimisation too
    traced = jax.jit(lambda v, w: best_index(v, maximize=True, where=w))(jnp.asarray(f1), jnp.asarray(self_acc < 0.005))
    assert int(traced) == 2
    none = jax.jit(lambda v, w: best_index(v, maximize=True, where=w))(jnp.asarray(f1), jnp.zeros(6, bool))
    assert int(none) == 0


# ----------------------------------------------------------------------------- errors


PARAMS = {"w": jnp.ones(2), "b": jnp.zeros(())}
DELTA = tree_map(jnp.ones_like, PARAMS)
OBJ = lambda p: jnp.sum(p["w"]) + p["b"]   # noqa: E731


@pytest.mark.parametrize("kwargs, kind, pattern", [
    (dict(steps=[[0.0, 1.0]]), ValueError, r"bad `steps`: got shape \(1, 2\); expected a 1-D array"),
    (dict(steps=[]), ValueError, r"bad `steps`: got shape \(0,\)"),
    (dict(steps=[0.0, np.inf]), ValueError, r"bad `steps`: got non-finite value\(s\) \[inf\] at index\(es\) \[1\]"),
    (dict(steps=[True, False]), TypeError, r"bad `steps`: got dtype bool"),
    (dict(steps="1,2"), TypeError, r"bad `steps`: got '1,2'"),
    (dict(normalize="yes"), TypeError, r"bad `normalize`: got 'yes'; expected True or False"),
    (dict(maximize=1), TypeError, r"bad `maximize`: got 1"),
])
def test_step_search_input_errors(kwargs, kind, pattern):
    with pytest.raises(kind, match=r"gifjax\.stepping\.step_search: " + pattern):
        step_search(OBJ, PARAMS, DELTA, **kwargs)


def test_errors_name_the_function_and_argument():
    with pytest.raises(ValueError, match=r"(?s)gifjax\.stepping\.step_search: bad `delta`: got tree structure"
                                         r".*expected the structure of `params`"):
        step_search(OBJ, PARAMS, {"w": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"gifjax\.stepping\.along: bad `direction`: got shape \(3,\) at \['w'\]"):
        along(OBJ, PARAMS, {"w": jnp.ones(3), "b": jnp.zeros(())}, [0.0])
    with pytest.raises(ValueError, match=r"gifjax\.stepping\.step_search: bad `objective`: got output "
                                         r"float32\[2\].*expected one real scalar per step"):
        step_search(lambda p: p["w"], PARAMS, DELTA)
    with pytest.raises(ValueError, match=r"gifjax\.stepping\.step_search: bad `objective`: got output"):
        step_search(lambda p: (p["b"], p["b"]), PARAMS, DELTA)
    with pytest.raises(TypeError, match=r"gifjax\.stepping\.along: bad `fn`: got int"):
        along(3, PARAMS, DELTA, [0.0])
    with pytest.raises(TypeError, match=r"gifjax\.stepping\.along: bad `fn`: got an unhashable"):
        along(_Unhashable(), PARAMS, DELTA, [0.0])
    with pytest.raises(ValueError, match=r"gifjax\.stepping\.best_index: bad `values`: got shape \(2, 2\)"):
        best_index(np.zeros((2, 2)))
    with pytest.raises(TypeError, match=r"gifjax\.stepping\.best_index: bad `values`: got dtype complex"):
        best_index(np.ones(2, complex))
    with pytest.raises(TypeError, match=r"gifjax\.stepping\.best_index: bad `where`: got dtype float64, shape \(2,\); "
                                        r"expected a boolean array of shape \(2,\)"):
        best_index(np.ones(2), where=np.ones(2))
    with pytest.raises(ValueError, match=r"gifjax\.stepping\.best_index: bad `where`: got dtype bool, shape \(3,\)"):
        best_index(np.ones(2), where=np.ones(3, bool))
    with pytest.raises(ValueError, match=r"gifjax\.stepping\.along: bad `steps`: got shape \(\)"):
        jax.jit(lambda s: along(OBJ, PARAMS, DELTA, s))(jnp.float32(1.0))  # checked when traced too


class _Unhashable:
    __hash__ = None

    def __call__(self, p):
        return OBJ(p)


def test_result_repr_is_compact():
    out = step_search(OBJ, PARAMS, DELTA, steps=[0.0, 1.0])
    text = repr(out)
    assert text.startswith("StepSearch(step=0.0, index=0, steps=f32[2], values=f32[2], params=<dict: 2 arrays")
    assert stepping.StepSearch is gifjax.StepSearch and gifjax.stepping is stepping
