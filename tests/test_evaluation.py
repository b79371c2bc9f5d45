"""gifjax.evaluation: statistics vs SciPy/sklearn, retraining exactness, LOO / LDS / mislabels."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from sklearn.metrics import roc_auc_score

import gifjax
from gifjax import evaluation as ev

# ----------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("seed", range(4))
def test_statistics_equal_scipy_and_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 41  # one shape: one compile of each statistic
    x = rng.integers(0, 6, n).astype(float)          # many ties
    y = x + rng.integers(0, 4, n)
    z = rng.normal(size=n)
    np.testing.assert_allclose(ev.rankdata(jnp.asarray(x)), scipy.stats.rankdata(x), rtol=1e-6)
    for a, b in ((x, y), (z, y), (x, z)):
        np.testing.assert_allclose(ev.pearson(a, b), scipy.stats.pearsonr(a, b).statistic,
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ev.spearman(a, b), scipy.stats.spearmanr(a, b).statistic, atol=1e-6,
                                   rtol=1e-5)
    labels = rng.random(n) < 0.3
    labels[:2] = [True, False]
    for s in (x, z):
        np.testing.assert_allclose(ev.auc(s, labels), roc_auc_score(labels, s), rtol=1e-6)


def test_statistics_are_jittable_and_vmappable():
    x = jnp.array([[1.0, 2, 2, 5], [4, 3, 2, 1]])
    y = jnp.array([[1.0, 3, 3, 4], [1, 2, 3, 4]])
    np.testing.assert_allclose(jax.jit(jax.vmap(ev.spearman))(x, y), [1.0, -1.0], rtol=1e-6)


# ----------------------------------------------------------------------------- models


def _ridge_loss(w, xy):
    return 0.5 * (xy[0] @ w - xy[1]) ** 2


_ridge_objective = ev.weighted_objective(_ridge_loss, lambda w: 0.05 * w @ w)


def _ridge():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(30, 4))
    y = X @ np.array([1.0, -2.0, 0.5, 0.0]) + 0.3 * rng.normal(size=30)

    def closed_form(keep):  # argmin Σ_keep ½(xᵀw − y)²/m + 0.05‖w‖²
        m = keep.sum()
        A = X[keep].T @ X[keep] / m + 0.1 * np.eye(4)
        return np.linalg.solve(A, X[keep].T @ y[keep] / m)

    return jnp.asarray(X), jnp.asarray(y), _ridge_loss, _ridge_objective, closed_form


def test_newton_retrain_is_exact_on_ridge_and_equals_influence_of_removal_gradient(x64):
    X, y, ex, f, closed_form = _ridge()
    n = 30
    w_hat = jnp.asarray(closed_form(np.ones(n, bool)))
    removed = np.array([0, 7, 19])
    weights = np.ones((3, n))
    weights[np.arange(3), removed] = 0
    one_step = ev.retrain(f, w_hat, weights, (X, y), optimizer=ev.Newton(max_steps=1, cg_rtol=1e-14))
    assert one_step.num_steps.tolist() == [1, 1, 1]
    assert bool(one_step.converged.all()) and float(one_step.grad_norm.max()) < 1e-12
    for k, i in enumerate(removed):
        np.testing.assert_allclose(one_step.params[k], closed_form(np.arange(n) != i), rtol=1e-10)
    # ... and equals the library's Newton step Δ = H_remaining⁻¹ · 1/(n−1) ∇(ℓ_i + R)
    loss = lambda w, X, y: f(w, jnp.ones(len(y)), (X, y))
    keep = np.arange(n) != 7

    @jax.jit
    def newton_step(w):
        g = gifjax.removal_gradient(loss, w, X[7:8], y[7:8], num_train=n)
        return w + gifjax.influence(loss, w, g, X[keep], y[keep], method="if", solver="dense").delta

    np.testing.assert_allclose(newton_step(w_hat), one_step.params[1], rtol=1e-10)
    # L-BFGS reaches the same optima (converged to its tolerance)
    lb = ev.retrain(f, w_hat, weights, (X, y), optimizer=ev.LBFGS(max_steps=200))
    assert bool(lb.converged.all()) and lb.gtol == 1e-9
    np.testing.assert_allclose(lb.params, one_step.params, rtol=1e-7)


def _logit_loss(p, xy):
    logit = xy[0] @ p["w"] + p["b"]
    return jnp.logaddexp(0.0, logit) - xy[1] * logit


_logit_objective = ev.weighted_objective(_logit_loss, lambda p: 0.5e-2 * p["w"] @ p["w"])


def _logistic_data(n, d, seed, separable):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n + 20, d))
    w_true = rng.normal(size=d)
    if separable:
        yb = X @ w_true > 0
        X = X + 2.0 * np.where(yb, 1.0, -1.0)[:, None] * w_true / np.linalg.norm(w_true)
    else:
        yb = rng.random(n + 20) < 1 / (1 + np.exp(-2.0 * X @ w_true))
    return X, yb.astype(np.float64)


def _fit(f, train, d):
    p0 = {"w": jnp.zeros(d), "b": jnp.zeros(())}
    fit = ev.retrain(f, p0, np.ones(len(train[1])), train)
    assert bool(fit.converged[0])
    return jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a)[0]), fit.params)


@functools.lru_cache(maxsize=None)
def _logistic(n=120, d=5, seed=0, separable=False):
    """L2-regularised logistic regression, trained to convergence (float64; call under x64)."""
    X, y = _logistic_data(n, d, seed, separable)
    train, test = (jnp.asarray(X[:n]), jnp.asarray(y[:n])), (jnp.asarray(X[n:]), jnp.asarray(y[n:]))
    f = _logit_objective
    loss = lambda p, X, y: f(p, jnp.ones(len(y)), (X, y))
    return _logit_loss, f, loss, _fit(f, train, d), train, test


@functools.lru_cache(maxsize=None)
def _logistic_scores():
    """IF scores in one jitted program (eager dispatch would compile each small op)."""
    ex, _, loss, params, train, test = _logistic()
    return jax.jit(lambda p, tr, te: gifjax.influence_scores(
        loss, p, ex, tr, te, *tr, solver=gifjax.solvers.CG(rtol=1e-12)))(params, train, test)


def test_loo_on_logistic_regression_pearson_at_least_098(x64):
    ex, f, loss, params, train, test = _logistic()
    scores = _logistic_scores()
    out = ev.leave_one_out(f, params, scores, np.arange(0, 120, 3), ex, test, train)
    assert out.predicted.shape == out.actual.shape == (40, 20)
    assert bool(out.retrain.converged.all()) and float(out.retrain.grad_norm.max()) <= 1e-9
    assert int(out.retrain.num_steps.max()) <= 5 and int(out.retrain.num_hvps.min()) > 0
    assert float(out.reference.grad_norm) <= 1e-9
    assert float(out.pearson) >= 0.98, float(out.pearson)
    assert float(jnp.min(out.pearson_per_test)) >= 0.98
    assert float(jnp.median(out.spearman_per_test)) >= 0.98
    # pooled ranks mix test points of different loss scales, so pooled Spearman is lower
    assert float(out.spearman) >= 0.8, float(out.spearman)
    # the sign: predicted and actual changes agree in sign on the large ones
    big = jnp.abs(out.actual) > jnp.quantile(jnp.abs(out.actual), 0.9)
    assert bool(jnp.all(jnp.sign(out.predicted[big]) == jnp.sign(out.actual[big])))


def test_lds_high_for_influence_and_near_zero_for_random_scores(x64):
    ex, f, loss, params, train, test = _logistic()
    scores = _logistic_scores()
    noise = jax.random.normal(jax.random.key(3), scores.shape, scores.dtype)
    both = ev.linear_datamodeling_score(f, params, {"if": scores, "random": noise}, ex, test,
                                        train, num_subsets=24, key=0)
    out = both["if"]
    assert out.subsets.shape == (24, 120) and bool((out.subsets.sum(1) == 60).all())
    assert out.warm_start and out.alpha == 0.5 and bool(out.retrain.converged.all())
    assert both["random"].actual is out.actual  # one set of retrains serves both
    lds_if, lds_random = float(out.score), float(both["random"].score)
    assert lds_if >= 0.9, lds_if
    assert abs(lds_random) <= 0.2, lds_random
    # same subsets from the same key; different from another key
    again = ev.random_subsets(jax.random.fold_in(jax.random.key(0), 0), 120, 24)
    assert bool((again == out.subsets).all())


def test_lds_from_a_given_init_records_it(x64):
    X, y, ex, f, closed_form = _ridge()
    scores = np.asarray(jax.random.normal(jax.random.key(0), (30, 4)))  # any scores will do here
    out = ev.linear_datamodeling_score(f, jnp.zeros(4), scores, ex, (X[:4], y[:4]), (X, y),
                                       num_subsets=8, init=lambda k: jax.random.normal(k, (4,)),
                                       optimizer=ev.Newton(max_steps=5))
    assert not out.warm_start and bool(out.retrain.converged.all())
    assert bool((out.retrain.num_steps >= 1).all())
    kept = np.asarray(out.subsets[0])
    expected = 0.5 * (np.asarray(X[:4]) @ closed_form(kept) - np.asarray(y[:4])) ** 2
    np.testing.assert_allclose(out.actual[0], expected, rtol=1e-9)


# ----------------------------------------------------------------------------- mislabels


def test_mislabel_detection_perfect_inverted_and_tied_rankings():
    m = np.zeros(20, bool)
    m[[2, 5, 11, 17]] = True
    si = np.where(m, -10.0, -1.0) + np.linspace(0, 0.1, 20)   # mislabelled most negative
    out = ev.mislabel_detection(si, m, fractions=(0.1, 0.2, 0.5))
    assert out.auc == 1.0 and out.recall.tolist() == [0.5, 1.0, 1.0] and out.num_mislabelled == 4
    assert set(out.ranking[:4].tolist()) == {2, 5, 11, 17}
    assert ev.mislabel_detection(si, m, suspicious="high").auc == 0.0
    tied = ev.mislabel_detection(np.zeros(20), m, fractions=(0.05, 0.25))
    assert tied.auc == 0.5
    np.testing.assert_allclose(tied.recall, [0.05, 0.25])     # expected under random tie-breaking


def test_flip_labels_is_deterministic_and_changes_class():
    y = np.arange(200) % 10
    a, fa = map(np.asarray, ev.flip_labels(jax.random.key(5), y, 0.1))
    b, fb = map(np.asarray, ev.flip_labels(5, y, 0.1))
    c, _ = map(np.asarray, ev.flip_labels(6, y, 0.1))
    assert (a == b).all() and (fa == fb).all() and not (a == c).all()
    assert fa.sum() == 20 and (a[fa] != y[fa]).all() and (a[~fa] == y[~fa]).all()
    assert a.max() <= 9 and a.min() >= 0


def test_self_influence_finds_flipped_labels_on_a_separable_problem(x64):
    ex, f, loss, _, train, _ = _logistic(n=120, d=5, seed=1, separable=True)
    noisy, flipped = ev.flip_labels(0, np.asarray(train[1]).astype(np.int32), 0.1, num_classes=2)
    train = (train[0], noisy.astype(jnp.float64))
    params = _fit(f, train, 5)
    si = jax.jit(lambda p, tr: gifjax.self_influence(loss, p, ex, tr, *tr, solver="dense"))(params, train)
    out = ev.mislabel_detection(si, np.asarray(flipped))
    assert out.auc >= 0.9, out.auc
    assert out.recall[1] >= 0.5  # top 10 % holds at least half of the 12 flipped labels
    assert bool((si <= 1e-12).all())  # gifjax's self-influence is ≤ 0: ranked by −I[i, i]


# ----------------------------------------------------------------------------- errors


def test_error_messages_name_function_argument_and_fix():
    f = lambda w, wt, x: jnp.sum(wt * (w - x) ** 2)
    with pytest.raises(ValueError, match=r"gifjax\.evaluation\.pearson: bad `x, y`: got shapes \(3,\) and \(4,\); expected two 1-D arrays"):
        ev.pearson(jnp.ones(3), jnp.ones(4))
    with pytest.raises(ValueError, match=r"gifjax\.evaluation\.auc: bad `labels`: got shape \(2,\) \(scores \(3,\)\)"):
        ev.auc(jnp.ones(3), jnp.ones(2, bool))
    with pytest.raises(ValueError, match=r"gifjax\.evaluation\.rankdata: bad `x`: got shape \(2, 2\); expected a 1-D array\. Fix: .*vmap"):
        ev.rankdata(jnp.ones((2, 2)))
    with pytest.raises(TypeError, match=r"gifjax\.evaluation\.retrain: bad `optimizer`: got 'adam'; expected gifjax\.evaluation\.Newton"):
        ev.retrain(f, jnp.zeros(()), jnp.ones(3), jnp.ones(3), optimizer="adam")
    with pytest.raises(ValueError, match=r"gifjax\.evaluation\.retrain: bad `weights`: got shape \(1, 2, 3\)"):
        ev.retrain(f, jnp.zeros(()), jnp.ones((1, 2, 3)), jnp.ones(3))
    with pytest.raises(ValueError, match=r"gifjax\.evaluation\.retrain: bad `chunk_size`: got 0"):
        ev.retrain(f, jnp.zeros(()), jnp.ones(3), jnp.ones(3), chunk_size=0)
    S, T = jnp.zeros((10, 2)), (jnp.ones((2, 3)), jnp.ones(2))
    ex = lambda w, xy: jnp.sum(w)
    with pytest.raises(ValueError, match=r"gifjax\.evaluation\.leave_one_out: bad `removed`: got shape \(2,\), dtype int\d+, values in \[3, 10\]; expected .*\[0, 10\)"):
        ev.leave_one_out(f, jnp.zeros(()), S, np.array([3, 10]), ex, T, jnp.ones(10))
    with pytest.raises(ValueError, match=r"gifjax\.evaluation\.leave_one_out: bad `scores`: got shape \(10, 3\), dtype float\d+; expected float influence scores \[n_train, 2\]"):
        ev.leave_one_out(f, jnp.zeros(()), jnp.zeros((10, 3)), np.arange(2), ex, T, jnp.ones(10))
    with pytest.raises(ValueError, match=r"gifjax\.evaluation\.leave_one_out: bad `test_examples`: got leading axes \['2', '3'\]"):
        ev.leave_one_out(f, jnp.zeros(()), S, np.arange(2), ex, (jnp.ones((2, 3)), jnp.ones(3)), jnp.ones(10))
    lds = functools.partial(ev.linear_datamodeling_score, f, jnp.zeros(()), S, ex, T, jnp.ones(10))
    with pytest.raises(ValueError, match=r"gifjax\.evaluation\.linear_datamodeling_score: bad `alpha`: got 1\.0; expected a float in \(0, 1\)"):
        lds(alpha=1.0)
    with pytest.raises(ValueError, match=r"linear_datamodeling_score: bad `num_subsets`: got 1; expected an int ≥ 2"):
        lds(num_subsets=1)
    with pytest.raises(TypeError, match=r"linear_datamodeling_score: bad `key`: got 'a'; expected a jax\.random\.key"):
        lds(key="a")
    with pytest.raises(ValueError, match=r"linear_datamodeling_score: bad `init`: got shape \(2,\)"):
        lds(init=jnp.zeros(2))
    m = np.array([True, False, False])
    with pytest.raises(ValueError, match=r"mislabel_detection: bad `is_mislabelled`: got 0 of 3 True; expected both"):
        ev.mislabel_detection(np.ones(3), np.zeros(3, bool))
    with pytest.raises(ValueError, match=r"mislabel_detection: bad `is_mislabelled`: got shape \(3,\), dtype int\d+; expected a bool array"):
        ev.mislabel_detection(np.ones(3), np.array([1, 0, 0]))
    with pytest.raises(ValueError, match=r"mislabel_detection: bad `scores`: got shape \(3,\), dtype float64, with non-finite values"):
        ev.mislabel_detection(np.array([1.0, np.nan, 0.0]), m)
    with pytest.raises(ValueError, match=r"mislabel_detection: bad `fractions`: got \(0\.0,\); expected fractions in \(0, 1\]"):
        ev.mislabel_detection(np.ones(3), m, fractions=(0.0,))
    with pytest.raises(ValueError, match=r"mislabel_detection: bad `suspicious`: got 'up'"):
        ev.mislabel_detection(np.ones(3), m, suspicious="up")
    with pytest.raises(ValueError, match=r"flip_labels: bad `fraction`: got 1\.5; expected a float in \[0, 1\]"):
        ev.flip_labels(0, np.arange(4), 1.5)
    with pytest.raises(ValueError, match=r"flip_labels: bad `labels`: got shape \(4,\), dtype float64"):
        ev.flip_labels(0, np.ones(4), 0.5)
    with pytest.raises(ValueError, match=r"flip_labels: bad `num_classes`: got 2; expected an int ≥ max\(2, 4\)"):
        ev.flip_labels(0, np.arange(4), 0.5, num_classes=2)
