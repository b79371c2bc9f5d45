"""Training with optax, evaluation, and the retraining baselines.

:func:`fit` trains any :mod:`gifjax.experiments.models` classifier by minibatch SGD
(with momentum) or Adam on

    L(θ) = (1/n) Σ_i CE(f(x_i; θ), y_i) + ½·wd·‖θ‖²,

the same objective :func:`gifjax.experiments.models.make_loss_fn` builds for influence,
with a constant, cosine or step-decay learning rate, keeping the last
variables or those of the epoch with the best validation accuracy.
Weight decay is an L2 term *in the loss*, not ``optax.add_decayed_weights``:
with Adam the decoupled form (AdamW) is not the gradient of any loss, so the
trained θ̂ would not be a stationary point of the objective whose Hessian
influence inverts. (For SGD the two are the same update.)

Each minibatch is one jitted step gathering its examples from data kept on
device; the shuffling permutation is drawn from ``seed`` and the epoch
number, so a seed fixes the whole run (initialisation included). The last
minibatch of an epoch is padded with zero-weight examples, so every example
counts exactly once per epoch and all steps share one compiled shape.

:data:`PAPER_SGD` is the official code's recipe as one set of :func:`fit`
keyword arguments (SGD, momentum 0.9, lr 0.1 with cosine decay, weight decay
5e-4, batch 512, best-validation checkpoint); :func:`loss_and_grad_norm`
measures how stationary the returned θ̂ is (the train loss and the full-batch
‖∇L(θ̂)‖, recorded in :attr:`FitResult.checkpoint` for ``checkpoint="best_val"``).

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
import types
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gifjax import _checks

from . import models as _models

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "cosine", "step")
CHECKPOINTS = ("last", "best_val")

PAPER_SGD = types.MappingProxyType(dict(
    optimizer="sgd", learning_rate=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine",
    epochs=100, batch_size=512, checkpoint="best_val"))
"""The official code's training recipe, as :func:`fit` keyword arguments (read-only).

SGD with heavy-ball momentum 0.9, learning rate 0.1 decayed to 0 by a cosine
over all steps, weight decay 5e-4 (the L2 term ½·wd·‖θ‖² in the loss: for SGD
the same update as PyTorch's ``SGD(weight_decay=5e-4)``), batch 512, and the
variables of the epoch with the best validation accuracy (pass
``validation=``). The official code trains up to 200 epochs (StepLR or
cosine) and keeps the best *test-loss* checkpoint, on train+validation; here
100 epochs (on MNIST-5k's 3,600 training images: 800 steps) and the
validation split, so the test set stays unseen. Override any value::

    train.fit(model, *ds.train, validation=ds.val, **(train.PAPER_SGD | dict(epochs=30)))

Measured on MNIST-5k (seed 0, 40 epochs, ~5 min on 2 shared CPU cores): the
paper's TinyNet reaches validation 0.97, test 0.953, and ‖∇L‖ = 0.03 at its
checkpoint (after epoch 36 of 40). The small ``cnn`` (two convs, then a global mean) is
too weak for 28×28 digits under any of these settings: validation 0.55 after
40 epochs at batch 512, 0.75 after 15 at batch 64 (1 min); use ``tinynet``
there. :attr:`FitResult.checkpoint` says how stationary the returned θ̂ is.
"""


class Checkpoint(NamedTuple):
    """Where the variables :func:`fit` returned with ``checkpoint="best_val"`` come from.

    ``epoch``: index into the ``history`` lists (0 = after the first epoch);
    ``val_accuracy``: ``history["val_accuracy"][epoch]``; ``loss`` and
    ``grad_norm``: the full-batch training objective L(θ̂) and ‖∇L(θ̂)‖₂ at
    the returned variables (:func:`loss_and_grad_norm`: eval mode, weight
    decay included — the objective whose Hessian influence uses, so a small
    ``grad_norm`` means θ̂ is nearly stationary).
    """

    epoch: int
    val_accuracy: float
    loss: float
    grad_norm: float


class FitResult(NamedTuple):
    """What :func:`fit` returns.

    ``variables`` is the Flax variables dict (``params`` plus, with
    BatchNorm, ``batch_stats``). ``history`` maps ``"loss"`` (the training
    objective averaged over the epoch's examples, each taken before its
    step's update) and
    ``"accuracy"`` (training accuracy seen during the epoch) to one float per
    epoch, ``"val_accuracy"`` too when ``validation`` was given, and
    ``"learning_rate"`` (the rate of the epoch's last step) with a
    ``schedule``. ``checkpoint`` is a :class:`Checkpoint` with
    ``checkpoint="best_val"``, else ``None``.
    """

    variables: dict
    history: dict
    checkpoint: Checkpoint | None = None


def fit(model: nn.Module, x, y, *, optimizer="adam", learning_rate: float = 1e-3,
        epochs: int = 10, batch_size: int = 128, weight_decay: float = 0.0,
        momentum: float = 0.9, seed: int = 0, variables=None, validation=None,
        progress: bool = True, schedule: str | Callable | None = None,
        checkpoint: str = "last") -> FitResult:
    """Train ``model`` on ``(x, y)`` from scratch (or from ``variables``).

    Args:
      model: a linen classifier called as ``model.apply(v, x, train=...)``
        (every :mod:`gifjax.experiments.models` model).
      x: inputs [n, ...] (e.g. NHWC float32 from :func:`gifjax.experiments.data.load`).
      y: int labels [n], in ``[0, model.num_classes)``.
      optimizer: ``"adam"``, ``"sgd"`` (heavy-ball momentum ``momentum``), or
        any ``optax.GradientTransformation`` (then ``learning_rate`` and
        ``momentum`` are not used).
      learning_rate: the (initial) step size.
      epochs: passes over the data (0 returns the initial variables).
      batch_size: minibatch size (capped at n).
      weight_decay: wd ≥ 0 of the ½·wd·‖θ‖² term in the loss.
      momentum: SGD momentum.
      seed: fixes initialisation and shuffling: same seed, same result.
      variables: start from these instead of a fresh :func:`models.init`.
      validation: optional ``(x_val, y_val)``; adds ``"val_accuracy"``.
      progress: show a tqdm bar over epochs (needs ``tqdm``).
      schedule: the learning rate over the T = ``epochs`` · ⌈n / batch_size⌉
        steps: ``None`` or ``"constant"`` (``learning_rate`` throughout, the
        default), ``"cosine"`` (``learning_rate`` · ½(1 + cos(π t / T)),
        ``optax.cosine_decay_schedule``), ``"step"`` (× 0.1 after T/2 and
        again after 3T/4 steps), or an optax schedule ``step -> rate``
        (replaces ``learning_rate``). Not with an optax ``optimizer``.
      checkpoint: ``"last"`` (default): the variables after the last epoch;
        ``"best_val"``: those after the epoch with the highest validation
        accuracy (ties go to the later epoch, the better-converged one); needs
        ``validation`` and ``epochs >= 1``. Then ``FitResult.checkpoint``
        records that epoch and the train loss and full-batch ‖∇L‖ there.

    Returns:
      :class:`FitResult` ``(variables, history, checkpoint)``.

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
    for arg, value, low in (("epochs", epochs, 0), ("batch_size", batch_size, 1)):
        if not isinstance(value, (int, np.integer)) or value < low:
            raise _checks.error(fn, arg, repr(value), f"an int >= {low}",
                                f"pass `{arg}` as a whole number >= {low}.")
    n = len(y)
    steps = int(epochs) * -(-n // int(min(batch_size, n)))
    tx, rate = _optimizer(fn, optimizer, learning_rate, momentum, schedule, steps)
    _checks.check_nonnegative(fn, "weight_decay", weight_decay)
    if validation is not None:
        validation = _check_data(fn, model, *validation, arg="validation")
    _checks.check_choice(fn, "checkpoint", checkpoint, CHECKPOINTS)
    if checkpoint == "best_val" and (validation is None or epochs < 1):
        raise _checks.error(fn, "checkpoint", "'best_val' with " + (
            "validation=None" if validation is None else f"epochs={epochs}"),
            "a validation split and epochs >= 1 to choose the best epoch from",
            "pass validation=(x_val, y_val) (e.g. the data set's val split) and epochs >= 1, "
            "or checkpoint='last'.")

    if variables is None:
        variables = _models.init(model, x, seed=seed)
    params, rest = _models.split_variables(variables)
    state = (params, rest, tx.init(params))
    xd, yd = jnp.asarray(x), jnp.asarray(y)
    shuffle_key = jax.random.fold_in(jax.random.key(seed), 1)  # init used key(seed) itself
    history = ({"loss": [], "accuracy": []} | ({"val_accuracy": []} if validation else {})
               | ({"learning_rate": []} if rate is not None else {}))
    best = None  # (val accuracy, epoch, variables) of the best epoch so far

    bar = _progress_bar(epochs, progress)
    for epoch in range(epochs):
        state, (loss_sum, correct) = _run_epoch(
            model, tx, float(weight_decay), int(min(batch_size, n)),
            state, xd, yd, jax.random.fold_in(shuffle_key, epoch))
        history["loss"].append(float(loss_sum) / n)
        history["accuracy"].append(float(correct) / n)
        if rate is not None:
            history["learning_rate"].append(float(rate(steps // epochs * (epoch + 1) - 1)))
        if validation:
            history["val_accuracy"].append(
                evaluate(model, {"params": state[0], **state[1]}, *validation))
            if checkpoint == "best_val" and (best is None or history["val_accuracy"][-1] >= best[0]):
                best = (history["val_accuracy"][-1], epoch, {"params": state[0], **state[1]})
        if bar is not None:
            bar.set_postfix({k: f"{v[-1]:.4f}" for k, v in history.items()})
            bar.update()
    if bar is not None:
        bar.close()
    if checkpoint == "last":
        return FitResult({"params": state[0], **state[1]}, history)
    val_accuracy, epoch, variables = best
    loss, grad_norm = loss_and_grad_norm(model, variables, x, y, weight_decay=weight_decay)
    return FitResult(variables, history, Checkpoint(epoch, val_accuracy, loss, grad_norm))


def loss_and_grad_norm(model: nn.Module, variables, x, y, *, weight_decay: float = 0.0,
                       batch_size: int = 1024) -> tuple[float, float]:
    """The full-batch training objective L(θ) and its gradient norm ‖∇L(θ)‖₂ at ``variables``.

        L(θ) = (1/n) Σ_i CE(f(x_i; θ), y_i) + ½·wd·‖θ‖²,

    in eval mode, exactly :func:`gifjax.experiments.models.make_loss_fn`'s
    objective (the one whose Hessian influence uses), computed over
    fixed-size batches (one compile for any n). At an exact minimiser θ̂ the
    gradient norm is 0: the smaller it is, the better the stationarity
    assumption behind influence holds.

    Args:
      model, variables: the classifier and its variables (``params`` differentiated).
      x, y: the training inputs and int labels (all of them: a full-batch gradient).
      weight_decay: the wd ≥ 0 training used.
      batch_size: examples per compiled batch (memory only; the result is the same).

    Returns:
      ``(loss, grad_norm)`` as Python floats.

    Example:
      >>> import numpy as np
      >>> from gifjax.experiments import models, train
      >>> m = models.create("mlp", 2); x = np.ones((5, 3), np.float32); y = np.zeros(5, np.int32)
      >>> v = models.init(m, x)
      >>> loss, gnorm = train.loss_and_grad_norm(m, v, x, y, weight_decay=1e-3)
      >>> loss > 0 and gnorm > 0
      True
    """
    fn = "experiments.train.loss_and_grad_norm"
    x, y = _check_data(fn, model, x, y)
    _checks.check_nonnegative(fn, "weight_decay", weight_decay)
    _checks.check_positive_int(fn, "batch_size", batch_size, example="batch_size=1024")
    params, rest = _models.split_variables(variables)
    n = len(y)
    size = min(int(batch_size), n)
    pad = -n % size
    # fixed_batches pads by repeating example 0; these weights zero the repeats.
    weights = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    loss_sum, grad_sum = 0.0, None
    for i, (xb, yb) in enumerate(zip(fixed_batches(x, size), fixed_batches(y, size))):
        loss_b, grad_b = _weighted_ce_and_grad(model, params, rest, xb, yb,
                                               jnp.asarray(weights[i * size:(i + 1) * size]))
        loss_sum = loss_sum + loss_b
        grad_sum = grad_b if grad_sum is None else jax.tree_util.tree_map(jnp.add, grad_sum, grad_b)
    loss, norm = _add_penalty(params, loss_sum, grad_sum, n, float(weight_decay))
    return float(loss), float(norm)


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


@functools.partial(jax.jit, static_argnums=0)
def _weighted_ce_and_grad(model, params, rest, x, y, w):
    """Σ_i w_i CE_i over one batch (eval mode) and its gradient in ``params``."""
    def total(p):
        logits = model.apply({"params": p, **rest}, x, train=False)
        return jnp.sum(w * optax.softmax_cross_entropy_with_integer_labels(logits, y))
    return jax.value_and_grad(total)(params)


@jax.jit
def _add_penalty(params, loss_sum, grad_sum, n, weight_decay):
    """(mean CE + ½·wd·‖θ‖², ‖mean ∇CE + wd·θ‖₂) from the batch sums."""
    loss, grad = jax.value_and_grad(lambda p: _models.l2_penalty(p, weight_decay))(params)
    grad = jax.tree_util.tree_map(lambda g, s: g + s / n, grad, grad_sum)
    return loss + loss_sum / n, optax.tree_utils.tree_norm(grad)


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
        hyperparameters. A ``validation`` split loses its ``removed_class``
        examples too, so ``checkpoint="best_val"`` picks the epoch by the
        accuracy on the classes the baseline is trained on.

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
    if fit_kwargs.get("validation") is not None:
        x_val, y_val = _check_data(fn, model, *fit_kwargs["validation"], arg="validation")
        fit_kwargs["validation"] = (x_val[y_val != removed_class], y_val[y_val != removed_class])
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
def _named_optimizer(name, learning_rate, momentum, schedule, steps):
    # Cached so repeated fits with the same settings reuse one optax object,
    # and with it the compiled epoch (the optimizer is a static jit argument).
    rate = _schedule(schedule, learning_rate, steps)
    lr = learning_rate if rate is None else rate
    if name == "adam":
        return optax.adam(lr), rate
    return optax.sgd(lr, momentum=momentum or None), rate


def _schedule(schedule, learning_rate, steps):
    """The optax schedule step -> rate, or None for a constant rate."""
    if schedule is None or schedule == "constant":
        return None
    if callable(schedule):
        return schedule
    steps = max(int(steps), 1)
    if schedule == "cosine":
        return optax.cosine_decay_schedule(learning_rate, decay_steps=steps)
    return optax.piecewise_constant_schedule(   # "step": × 0.1 at T/2 and at 3T/4
        learning_rate, {max(steps // 2, 1): 0.1, max(3 * steps // 4, 2): 0.1})


def _optimizer(fn, optimizer, learning_rate, momentum, schedule=None, steps=0):
    """``(optax transformation, schedule or None)`` for :func:`fit`'s arguments (checked)."""
    if not (schedule is None or callable(schedule)):
        _checks.check_choice(fn, "schedule", schedule, SCHEDULES)
    if isinstance(optimizer, optax.GradientTransformation):
        if schedule is not None:
            raise _checks.error(fn, "schedule", repr(schedule),
                                "None with an optax optimizer (it carries its own learning rate)",
                                "build the schedule into the optax optimizer, e.g. "
                                "optax.sgd(optax.cosine_decay_schedule(0.1, steps)), or pass "
                                "optimizer='sgd' / 'adam' with schedule=....")
        return optimizer, None
    _checks.check_choice(fn, "optimizer", optimizer, OPTIMIZERS)
    for arg, value in (("learning_rate", learning_rate), ("momentum", momentum)):
        _checks.check_nonnegative(fn, arg, value)
    if schedule == "constant":
        schedule = None
    # Only a named decaying schedule depends on the step count: leave it out of
    # the cache key otherwise, so e.g. fits with other `epochs` share one compile.
    steps = int(steps) if isinstance(schedule, str) else 0
    return _named_optimizer(optimizer, float(learning_rate), float(momentum), schedule, steps)


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
