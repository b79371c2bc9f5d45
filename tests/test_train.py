"""Training, evaluation and the retraining baselines, on a slice of the bundled digits."""

from __future__ import annotations

import sys

import flax.linen as nn
import jax
import jax.flatten_util
import numpy as np
import optax
import pytest

from gifjax.experiments import data, models, train

FAST = dict(epochs=3, batch_size=32, learning_rate=1e-2, progress=False)


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", seed=0, val_fraction=0.2, max_train=300, max_test=100)


@pytest.fixture(scope="module")
def mlp():
    return models.create("mlp", 10, hidden=(32,))


def _equal(a, b):
    return jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, a, b))


def _flat(tree):
    return np.asarray(jax.flatten_util.ravel_pytree(tree)[0])


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_loss_goes_down_and_model_learns(digits, name):
    model = models.create(name, 10)
    result = train.fit(model, *digits.train, epochs=8, batch_size=16, learning_rate=1e-2,
                       seed=0, progress=False)
    loss, acc = result.history["loss"], result.history["accuracy"]
    assert len(loss) == len(acc) == 8
    assert loss[-1] < 0.5 * loss[0]
    assert acc[-1] > 0.8
    assert train.evaluate(model, result.variables, *digits.test) > 0.7


def test_fit_is_deterministic_by_seed(digits, mlp):
    a, b, c = (train.fit(mlp, *digits.train, seed=s, **FAST) for s in (0, 0, 1))
    assert _equal(a.variables, b.variables) and a.history == b.history
    assert not np.array_equal(_flat(a.variables), _flat(c.variables))


@pytest.mark.parametrize("optimizer, learning_rate", [("sgd", 0.3), ("adam", 0.05)])
def test_trained_point_is_stationary_for_make_loss_fn(optimizer, learning_rate):
    """fit minimises exactly models.make_loss_fn's objective, weight decay included.

    Full-batch training of softmax regression (an MLP without hidden layers:
    strongly convex with wd > 0) must end where ∇ loss_fn = 0. A decoupled
    decay (AdamW) or a different wd factor would stop elsewhere.
    """
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3)).astype(np.float32)
    y = (x[:, 0] + rng.normal(size=40) > 0).astype(np.int32)  # not separable
    model = models.create("mlp", 2, hidden=())
    wd = 0.1
    init = models.init(model, x, seed=0)
    result = train.fit(model, x, y, optimizer=optimizer, learning_rate=learning_rate,
                       epochs=300, batch_size=len(y), weight_decay=wd, seed=0, progress=False)
    loss_fn = models.make_loss_fn(model, result.variables, weight_decay=wd)
    grad_norm = lambda v: np.linalg.norm(_flat(jax.grad(loss_fn)(v["params"], x, y)))
    assert grad_norm(result.variables) < 1e-4 * grad_norm(init)
    # The reported loss is the same objective (taken just before the last step).
    np.testing.assert_allclose(result.history["loss"][-1],
                               loss_fn(result.variables["params"], x, y), rtol=1e-5)


def test_weight_decay_shrinks_parameters(digits, mlp):
    kw = dict(FAST, optimizer="sgd", learning_rate=0.05)
    plain = train.fit(mlp, *digits.train, weight_decay=0.0, **kw)
    decayed = train.fit(mlp, *digits.train, weight_decay=0.5, **kw)
    assert np.linalg.norm(_flat(decayed.variables)) < 0.9 * np.linalg.norm(_flat(plain.variables))


class _BNNet(nn.Module):
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(16)(x.reshape((x.shape[0], -1)))
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        return nn.Dense(self.num_classes)(x)


def test_batchnorm_statistics_are_trained_and_used_in_eval(digits):
    model = _BNNet()
    init = models.init(model, digits.train.x, seed=0)
    result = train.fit(model, *digits.train, seed=0, **FAST)
    assert set(result.variables) == {"params", "batch_stats"}
    stats = result.variables["batch_stats"]["BatchNorm_0"]
    assert not np.allclose(stats["mean"], init["batch_stats"]["BatchNorm_0"]["mean"])
    # Eval mode: a prediction does not depend on the rest of its batch.
    x = digits.test.x
    np.testing.assert_allclose(train.predict(model, result.variables, x[:5]),
                               train.predict(model, result.variables, x)[:5], atol=1e-5)
    assert train.evaluate(model, result.variables, *digits.test) > 0.5


def test_predict_and_evaluate_are_batched_consistently(digits, mlp):
    variables = train.fit(mlp, *digits.train, **FAST).variables
    full = train.predict(mlp, variables, digits.test.x)
    chunked = train.predict(mlp, variables, digits.test.x, batch_size=7)  # 100 = 14·7 + 2
    assert full.shape == (100, 10)
    np.testing.assert_allclose(chunked, full, atol=1e-5)
    acc = train.evaluate(mlp, variables, *digits.test, batch_size=7)
    assert acc == np.mean(full.argmax(-1) == digits.test.y)


def test_validation_history_and_zero_epochs(digits, mlp):
    result = train.fit(mlp, *digits.train, validation=digits.val, seed=2, **FAST)
    assert len(result.history["val_accuracy"]) == FAST["epochs"]
    assert result.history["val_accuracy"][-1] == train.evaluate(mlp, result.variables, *digits.val)
    untrained = train.fit(mlp, *digits.train, **dict(FAST, epochs=0), seed=2)
    assert _equal(untrained.variables, models.init(mlp, digits.train.x, seed=2))


def test_custom_optax_transformation_and_progress_bar(digits, mlp, capsys):
    result = train.fit(mlp, *digits.train, optimizer=optax.sgd(0.05), epochs=2, batch_size=64,
                       progress=True)
    assert len(result.history["loss"]) == 2
    assert "2/2" in capsys.readouterr().err  # tqdm writes to stderr


def test_retrain_without_class_excludes_the_class(digits, mlp):
    kw = dict(FAST, epochs=4, seed=3)
    result = train.retrain_without_class(mlp, *digits.train, 3, **kw)
    keep = digits.train.y != 3
    manual = train.fit(mlp, digits.train.x[keep], digits.train.y[keep], **kw)
    assert _equal(result.variables, manual.variables)  # same data, seed, hyperparameters
    predicted = train.predict(mlp, result.variables, digits.train.x).argmax(-1)
    assert not np.any(predicted == 3)


def test_retrain_on_labels_trains_on_corrected_labels(digits, mlp):
    x, y = digits.train
    indices = np.arange(0, 40, 2)
    labels = (y[indices] + 1) % 10
    result = train.retrain_on_labels(mlp, x, y, indices, labels, seed=4, **FAST)
    corrected = y.copy()
    corrected[indices] = labels
    manual = train.fit(mlp, x, corrected, seed=4, **FAST)
    assert _equal(result.variables, manual.variables)
    assert not _equal(result.variables, train.fit(mlp, x, y, seed=4, **FAST).variables)


_x = np.zeros((6, 4), np.float32)
_y = np.array([0, 1, 0, 1, 0, 1])
_m = models.create("mlp", 2, hidden=(3,))


@pytest.mark.parametrize("call, error, match", [
    (lambda: train.fit(_m, _x, _y[:5]), ValueError,
     r"gifjax\.experiments\.train\.fit: bad `y`: got shape \(5,\).*expected int labels of shape \(6,\)"),
    (lambda: train.fit(_m, _x, _y.astype(np.float32)), ValueError,
     r"train\.fit: bad `y`: got shape \(6,\), dtype float32.*astype\(np\.int32\)"),
    (lambda: train.fit(_m, _x, _y * 2), ValueError,
     r"train\.fit: bad `y`:.*values in \[0, 2\].*in \[0, 2\)"),
    (lambda: train.fit(_m, _x, _y, optimizer="rmsprop"), ValueError,
     r"train\.fit: bad `optimizer`: got 'rmsprop'; expected one of \['adam', 'sgd'\]"),
    (lambda: train.fit(_m, _x, _y, batch_size=0), ValueError,
     r"train\.fit: bad `batch_size`: got 0; expected an int >= 1"),
    (lambda: train.fit(_m, _x, _y, epochs=-1), ValueError,
     r"train\.fit: bad `epochs`: got -1; expected an int >= 0"),
    (lambda: train.fit(_m, _x, _y, weight_decay=-0.1), ValueError,
     r"train\.fit: bad `weight_decay`: got -0\.1"),
    (lambda: train.fit(_m, _x, _y, validation=(_x, _y[:2])), ValueError,
     r"train\.fit: bad `validation`: got shape \(2,\)"),
    (lambda: train.fit(_m, _x[0], _y), ValueError, r"train\.fit: bad `x`: got shape \(4,\)"),
    (lambda: train.retrain_without_class(_m, _x, _y, 7), ValueError,
     r"train\.retrain_without_class: bad `removed_class`: got 7; expected one of the labels "
     r"present in `y` \(\[0, 1\]\)"),
    (lambda: train.retrain_without_class(_m, _x, np.zeros(6, int), 0), ValueError,
     r"retrain_without_class: bad `removed_class`: got 0.*not the only one"),
    (lambda: train.retrain_on_labels(_m, _x, _y, [0, 1], [1]), ValueError,
     r"train\.retrain_on_labels: bad `labels`: got indices \(2,\).*same length"),
    (lambda: train.retrain_on_labels(_m, _x, _y, [0], [0.5]), ValueError,
     r"train\.retrain_on_labels: bad `labels`:.*float64.*1-D int arrays"),
    (lambda: train.retrain_on_labels(_m, _x, _y, [0], [5]), ValueError,
     r"train\.retrain_on_labels: bad `labels`:.*values in \[0, 5\]"),
])
def test_input_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_missing_tqdm_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    with pytest.raises(ImportError, match=r"train\.fit: bad `progress`.*progress=False"):
        train.fit(_m, _x, _y, epochs=1, progress=True)
