"""Training with optax, evaluation, and the retraining baselines.

:func:`fit` trains any :mod:`gifjax.experiments.models` classifier by minibatch SGD
(with momentum) or Adam on

    L(θ) = (1/n) Σ_i CE(f(x_i; θ), y_i) + ½·wd·‖θ‖²,

the same objective :func:`gifjax.experiments.models.make_loss_fn` builds for influence.
Weight decay is an L2 term *in the loss*, not ``optax.add_decayed_weights``:
with Adam the decoupled form (AdamW) is not the gradient of any loss, so the
trained θ̂ would not be a stationary point of the objective whose Hessian
influence inverts. (For SGD the two are the same update.)

Each minibatch is one jitted step gathering its examples from data kept on
device; the shuffling permutation is drawn from ``seed`` and the epoch
number, so a seed fixes the whole run (initialisation included). The last
minibatch of an epoch is padded with zero-weight examples, so every example
counts exactly once per epoch and all steps share one compiled shape.

The retraining baselines of the paper's experiments are thin wrappers:
:func:`retrain_without_class` (class removal) and :func:`retrain_on_labels`
(label correction) call :func:`fit` from scratch with the same keyword
arguments.

Example:
  >>> from gifjax.experiments import data, models, train
  >>> ds = data.load("digits", seed=0)
  >>> model = models.create("mlp", ds.num_classes, hidden=(32,))
  >>> result = train.fit(model, *ds.train, epochs=3, batch_size=64,
  ...                    learning_rate=1e-2, seed=0, progress=False)
  >>> train.evaluate(model, result.variables, *ds.test) > 0.8
  True
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gifjax import _checks

from . import models as _models

OPTIMIZERS = ("adam", "sgd")


class FitResult(NamedTuple):
    """What :func:`fit` returns.

    ``variables`` is the Flax variables dict (``params`` plus, with
    BatchNorm, ``batch_stats``). ``history`` maps ``"loss"`` (the training
    objective averaged over the epoch's examples, each taken before its
    step's update) and
    ``"accuracy"`` (training accuracy seen during the epoch) to one float per
    epoch, and ``"val_accuracy"`` too when ``validation`` was given.
    """

    variables: dict
    history: dict


def fit(model: nn.Module, x, y, *, optimizer="adam", learning_rate: float = 1e-3,
        epochs: int = 10, batch_size: int = 128, weight_decay: float = 0.0,
        momentum: float = 0.9, seed: int = 0, variables=None, validation=None,
        progress: bool = True) -> FitResult:
    """Train ``model`` on ``(x, y)`` from scratch (or from ``variables``).

    Args:
      model: a linen classifier called as ``model.apply(v, x, train=...)``
        (every :mod:`gifjax.experiments.models` model).
      x: inputs [n, ...] (e.g. NHWC float32 from :func:`gifjax.experiments.data.load`).
      y: int labels [n], in ``[0, model.num_classes)``.
      optimizer: ``"adam"``, ``"sgd"`` (heavy-ball momentum ``momentum``), or
        any ``optax.GradientTransformation`` (then ``learning_rate`` and
        ``momentum`` are not used).
      learning_rate: constant step size.
      epochs: passes over the data (0 returns the initial variables).
      batch_size: minibatch size (capped at n).
      weight_decay: wd ≥ 0 of the ½·wd·‖θ‖² term in the loss.
      momentum: SGD momentum.
      seed: fixes initialisation and shuffling: same seed, same result.
      variables: start from these instead of a fresh :func:`models.init`.
      validation: optional ``(x_val, y_val)``; adds ``"val_accuracy"``.
      progress: show a tqdm bar over epochs (needs ``tqdm``).

    Returns:
      :class:`FitResult` ``(variables, history)``.

    Example:
      >>> import numpy as np
      >>> from gifjax.experiments import models, train
      >>> x = np.random.default_rng(0).normal(size=(64, 4, 4, 1)).astype(np.float32)
      >>> y = (x.mean(axis=(1, 2, 3)) > 0).astype(np.int32)
      >>> r = train.fit(models.create("mlp", 2), x, y, epochs=5, batch_size=16,
      ...               learning_rate=1e-2, progress=False)
      >>> r.history["loss"][-1] < r.history["loss"][0]
      True
    """
    fn = "experiments.train.fit"
    x, y = _check_data(fn, model, x, y)
    tx = _optimizer(fn, optimizer, learning_rate, momentum)
    for arg, value, low in (("epochs", epochs, 0), ("batch_size", batch_size, 1)):
        if not isinstance(value, (int, np.integer)) or value < low:
            raise _checks.error(fn, arg, repr(value), f"an int >= {low}",
                                f"pass `{arg}` as a whole number >= {low}.")
    _checks.check_nonnegative(fn, "weight_decay", weight_decay)
    if validation is not None:
        validation = _check_data(fn, model, *validation, arg="validation")

    n = len(y)
    if variables is None:
        variables = _models.init(model, x, seed=seed)
    params, rest = _models.split_variables(variables)
    state = (params, rest, tx.init(params))
    xd, yd = jnp.asarray(x), jnp.asarray(y)
    shuffle_key = jax.random.fold_in(jax.random.key(seed), 1)  # init used key(seed) itself
    history = {"loss": [], "accuracy": []} | ({"val_accuracy": []} if validation else {})

    bar = _progress_bar(epochs, progress)
    for epoch in range(epochs):
        state, (loss_sum, correct) = _run_epoch(
            model, tx, float(weight_decay), int(min(batch_size, n)),
            state, xd, yd, jax.random.fold_in(shuffle_key, epoch))
        history["loss"].append(float(loss_sum) / n)
        history["accuracy"].append(float(correct) / n)
        if validation:
            history["val_accuracy"].append(
                evaluate(model, {"params": state[0], **state[1]}, *validation))
        if bar is not None:
            bar.set_postfix({k: f"{v[-1]:.4f}" for k, v in history.items()})
            bar.update()
    if bar is not None:
        bar.close()
    return FitResult({"params": state[0], **state[1]}, history)


def _run_epoch(model, tx, weight_decay, batch_size, state, x, y, key):
    idx, weights = _epoch_batches(key, y.shape[0], batch_size)
    loss_sum = correct = 0.0
    # A Python loop of jitted steps, not one lax.scan: XLA:CPU runs
    # convolutions inside while-loops ~15x slower than at top level.
    for i, w in zip(idx, weights):
        state, (batch_loss, batch_correct) = _train_step(model, tx, weight_decay, state, x, y, i, w)
        loss_sum, correct = loss_sum + batch_loss, correct + batch_correct
    return state, (loss_sum, correct)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _epoch_batches(key, n, batch_size):
    """A permutation of range(n) as [num_batches, batch_size] indices and 0/1 weights.

    The last batch is padded with repeats of the first examples, weighted 0,
    so every step has one shape and every example counts once.
    """
    num_batches = -(-n // batch_size)
    perm = jax.random.permutation(key, n)
    pad = num_batches * batch_size - n
    idx = jnp.concatenate([perm, perm[:pad]]).reshape(num_batches, batch_size)
    weights = (jnp.arange(num_batches * batch_size) < n).reshape(num_batches, batch_size)
    return idx, weights.astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _train_step(model, tx, weight_decay, state, x, y, i, w):
    params, rest, opt_state = state

    def loss(p):
        logits, new_rest = model.apply({"params": p, **rest}, x[i], train=True,
                                       mutable=list(rest))
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y[i])
        objective = jnp.sum(w * ce) / jnp.sum(w) + _models.l2_penalty(p, weight_decay)
        correct = jnp.sum(w * (jnp.argmax(logits, -1) == y[i]))
        return objective, (new_rest, objective * jnp.sum(w), correct)

    grads, (rest, loss_sum, correct) = jax.grad(loss, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), rest, opt_state), (loss_sum, correct)


def predict(model: nn.Module, variables, x, *, batch_size: int = 1024) -> np.ndarray:
    """Eval-mode logits of ``model`` on ``x``, [n, num_classes], computed in batches.

    Batches have one fixed size (the last is padded, then trimmed), so one
    compile serves any n.

    Example:
      >>> import numpy as np
      >>> from gifjax.experiments import models, train
      >>> m = models.create("mlp", 3); v = models.init(m, np.ones((1, 5)))
      >>> train.predict(m, v, np.ones((7, 5), np.float32), batch_size=4).shape
      (7, 3)
    """
    out = [_logits(model, variables, batch) for batch in fixed_batches(x, batch_size)]
    return np.concatenate([np.asarray(o) for o in out])[:len(x)]


def fixed_batches(x, batch_size: int):
    """Consecutive batches of ``x`` of one size (the last padded by repeating x[0]).

    One shape for every batch means one compile; callers trim outputs to len(x).
    """
    x = np.asarray(x)
    batch_size = max(1, min(batch_size, len(x)))
    pad = -len(x) % batch_size
    xp = np.concatenate([x, np.repeat(x[:1], pad, axis=0)]) if pad else x
    return [jnp.asarray(xp[s:s + batch_size]) for s in range(0, len(xp), batch_size)]


@functools.partial(jax.jit, static_argnums=0)
def _logits(model, variables, x):
    return model.apply(variables, x, train=False)


def evaluate(model: nn.Module, variables, x, y, *, batch_size: int = 1024) -> float:
    """Accuracy (fraction in [0, 1]) of ``model`` on ``(x, y)`` in eval mode.

    Example:
      >>> import numpy as np
      >>> from gifjax.experiments import models, train
      >>> m = models.create("mlp", 2); v = models.init(m, np.ones((1, 3)))
      >>> 0.0 <= train.evaluate(m, v, np.ones((5, 3), np.float32), np.zeros(5, np.int32)) <= 1.0
      True
    """
    x, y = _check_data("experiments.train.evaluate", model, x, y)
    return float(np.mean(predict(model, variables, x, batch_size=batch_size).argmax(-1) == y))


def retrain_without_class(model: nn.Module, x, y, removed_class: int, **fit_kwargs) -> FitResult:
    """Class-removal baseline: :func:`fit` from scratch on the examples not of ``removed_class``.

    The model keeps all its outputs (the removed class's logit is simply
    never a target), so it is directly comparable with the original.

    Args:
      model, x, y: as in :func:`fit` (the full training data).
      removed_class: the label to drop; must occur in ``y``.
      **fit_kwargs: passed to :func:`fit` — use the original run's seed and
        hyperparameters.

    Returns:
      :class:`FitResult` of the retrained model.

    Example:
      >>> from gifjax.experiments import data, models, train
      >>> ds = data.load("digits", seed=0)
      >>> m = models.create("mlp", 10, hidden=(32,))
      >>> r = train.retrain_without_class(m, *ds.train, 3, epochs=3, learning_rate=1e-2,
      ...                                 progress=False)
      >>> int((train.predict(m, r.variables, ds.test.x).argmax(-1) == 3).sum())
      0
    """
    fn = "experiments.train.retrain_without_class"
    x, y = _check_data(fn, model, x, y)
    keep = y != removed_class
    if keep.all() or not keep.any():
        raise _checks.error(fn, "removed_class", repr(removed_class),
                            f"one of the labels present in `y` ({sorted(set(y.tolist()))[:20]}), "
                            "not the only one", "pass a class that occurs in `y`.")
    return fit(model, x[keep], y[keep], **fit_kwargs)


def retrain_on_labels(model: nn.Module, x, y, indices, labels, **fit_kwargs) -> FitResult:
    """Label-correction baseline: :func:`fit` from scratch with ``y[indices] = labels``.

    Args:
      model, x, y: as in :func:`fit` (``y`` the labels the model was trained on).
      indices: [k] int positions of the examples to relabel (e.g. the
        triggered images of the backdoor experiment).
      labels: [k] int corrected labels (e.g. their true classes).
      **fit_kwargs: passed to :func:`fit` — the original seed and
        hyperparameters.

    Returns:
      :class:`FitResult` of the retrained model.

    Example:
      >>> import numpy as np
      >>> from gifjax.experiments import models, train
      >>> x = np.random.default_rng(0).normal(size=(32, 3)).astype(np.float32)
      >>> y = np.zeros(32, np.int32)
      >>> r = train.retrain_on_labels(models.create("mlp", 2), x, y, [0, 1], [1, 1],
      ...                             epochs=1, progress=False)
      >>> sorted(r.history)
      ['accuracy', 'loss']
    """
    fn = "experiments.train.retrain_on_labels"
    x, y = _check_data(fn, model, x, y)
    indices = np.asarray(indices)
    labels = np.asarray(labels)
    if (indices.shape != labels.shape or indices.ndim != 1
            or not all(np.issubdtype(a.dtype, np.integer) for a in (indices, labels))):
        raise _checks.error(fn, "labels", f"indices {indices.shape} {indices.dtype}, labels "
                            f"{labels.shape} {labels.dtype}",
                            "two 1-D int arrays of the same length",
                            "pass one integer corrected label per index.")
    corrected = y.copy()
    corrected[indices] = labels
    return fit(model, x, _check_data(fn, model, x, corrected, arg="labels")[1], **fit_kwargs)


def _check_data(fn, model, x, y, arg="y"):
    """Inputs as arrays; labels 1-D ints in [0, num_classes), one per input."""
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim < 2 or len(x) == 0:
        raise _checks.error(fn, "x" if arg == "y" else arg, f"shape {x.shape}",
                            "a non-empty batch [n, ...]",
                            "pass inputs with a leading example axis, e.g. (n, H, W, C).")
    num_classes = getattr(model, "num_classes", None)
    bad_range = y.size and (y.min() < 0 or (num_classes is not None and y.max() >= num_classes))
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer) or bad_range:
        got = f"shape {y.shape}, dtype {y.dtype}" + (
            f", values in [{y.min()}, {y.max()}]" if y.size and np.issubdtype(y.dtype, np.number)
            else "")
        raise _checks.error(fn, arg, got, f"int labels of shape ({len(x)},) in "
                            f"[0, {num_classes if num_classes is not None else 'C'})",
                            "pass one integer class label per input (cast with .astype(np.int32)).")
    return x, y.astype(np.int32)


@functools.lru_cache(maxsize=None)
def _named_optimizer(name, learning_rate, momentum):
    # Cached so repeated fits with the same settings reuse one optax object,
    # and with it the compiled epoch (the optimizer is a static jit argument).
    if name == "adam":
        return optax.adam(learning_rate)
    return optax.sgd(learning_rate, momentum=momentum or None)


def _optimizer(fn, optimizer, learning_rate, momentum):
    if isinstance(optimizer, optax.GradientTransformation):
        return optimizer
    _checks.check_choice(fn, "optimizer", optimizer, OPTIMIZERS)
    for arg, value in (("learning_rate", learning_rate), ("momentum", momentum)):
        _checks.check_nonnegative(fn, arg, value)
    return _named_optimizer(optimizer, float(learning_rate), float(momentum))


def _progress_bar(total, progress):
    if not progress:
        return None
    try:
        from tqdm import tqdm  # optional: only for the progress bar
    except ImportError as e:
        raise _checks.error("experiments.train.fit", "progress", "True, but tqdm is not installed",
                            "tqdm to be importable", "pip install tqdm, or pass progress=False.",
                            kind=ImportError) from e
    return tqdm(total=total, desc="train", unit="epoch")
