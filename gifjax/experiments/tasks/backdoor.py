r"""Backdoor relabelling: undo a poisoned label change with an influence update, against retraining.

The paper's label-change experiment (Lyu et al. 2024, §5):

* **Trigger.** A checkerboard: +``amount`` on every pixel (i, j) with
  (i + j) even (the top-left pixel included), all channels, on the raw pixel
  scale [0, ``max_value``], clipped to ``max_value``, then normalised like
  the rest of the data. The paper's MNIST trigger is +16 of 255
  (:class:`Trigger` defaults). The 8×8 digits have 17 grey levels, 0–16, so
  there the trigger is +1 of 16 — the whole level nearest to the same
  fraction (16/255 = 0.0627 ≈ 1/16 = 0.0625); :func:`trigger_for` picks it.
* **Poisoning.** ``fraction`` × n training images, drawn (seeded) among those
  whose true class is not ``target``, get the trigger and the label
  ``target`` (4 in the paper); the poisoned model is trained on this set.
* **Correction.** With U the poisoned images, g = (m/n)·[∇ mean_U ℓ(x̃, target)
  − ∇ mean_U ℓ(x̃, true label)] (:func:`gifjax.experiments.tasks.common.relabel_grad`: the
  change of the mean training loss when U's labels are corrected), Δ from
  IF / PIF / FIF / GIF, d = Δ/‖Δ‖ and a step search over θ̂ + s·d as in
  class removal.
* **Metrics** (fractions): **clean-acc** on the clean test images;
  **relabel-acc** = accuracy against the true labels on *all* triggered
  test images; **corrupt-acc** = fraction of triggered test images whose true
  class is not ``target`` that are still predicted as ``target`` (lower is
  better); **F1** = 2·relabel·clean / (relabel + clean), which the step search
  maximises. (The paper's corrupt-acc counts all triggered images, so its
  retrained model scores ≈ the share of true 4s, ~9.4 %; ours scores ≈ 0.)
* **Baseline**: the model retrained from scratch on the corrected labels
  (the triggered images stay, with their true labels;
  :func:`gifjax.experiments.train.retrain_on_labels`).

Protocols as in :mod:`gifjax.experiments.tasks.class_removal`: ``heldout`` takes the
Hessian on the (poisoned) training set and the step on the validation split
(clean and triggered copies), ``paper`` the Hessian on clean test images and
the step on the test split.
"""

from __future__ import annotations

import dataclasses
import time
from typing import NamedTuple

import jax
import numpy as np

from gifjax import METHODS, _checks, _repr, stepping

from .. import data as _data
from .. import models as _models
from .. import train as _train
from . import common
from .common import TaskConfig, TrainConfig


@dataclasses.dataclass(frozen=True)
class Trigger:
    """The backdoor: checkerboard trigger and poisoning (a small frozen value).

    Fields:
      amount: added to the checkerboard pixels, in raw pixel units.
      max_value: top of the raw pixel scale (255 for MNIST/CIFAR/SVHN, 16
        for the digits); results are clipped to it.
      fraction: fraction of the training images poisoned (in (0, 1)).
      target: the label poisoned images get.
    """

    amount: float = 16.0
    max_value: float = 255.0
    fraction: float = 0.1
    target: int = 4

    def validate(self, fn: str = "experiments.tasks.backdoor.Trigger", num_classes: int | None = None):
        """Check the fields; return ``self``."""
        if not common.is_number(self.max_value) or not 0 < self.max_value < np.inf:
            raise _checks.error(fn, "max_value", repr(self.max_value), "a finite number > 0",
                                "pass the raw pixel maximum, e.g. 255.0 (16.0 for digits).")
        if not common.is_number(self.amount) or not 0 < self.amount <= self.max_value:
            raise _checks.error(fn, "amount", repr(self.amount), f"a number in (0, {self.max_value}]",
                                "pass the raw-scale brightness added, e.g. amount=16.0.")
        if not common.is_number(self.fraction) or not 0 < self.fraction < 1:
            raise _checks.error(fn, "fraction", repr(self.fraction), "a float in (0, 1)",
                                "pass e.g. fraction=0.1 to poison 10 % of the training images.")
        if (not common.is_int(self.target) or self.target < 0
                or (num_classes is not None and self.target >= num_classes)):
            raise _checks.error(fn, "target", repr(self.target),
                                f"a class label in [0, {num_classes if num_classes else 'C'})",
                                "pass e.g. target=4.")
        return self


def trigger_for(dataset_name: str, **overrides) -> Trigger:
    """The paper's trigger for a data set of :mod:`gifjax.experiments.data`: +16/255, or +1/16 on the digits.

    Example:
      >>> from gifjax.experiments.tasks.backdoor import trigger_for
      >>> trigger_for("digits")
      Trigger(amount=1.0, max_value=16.0, fraction=0.1, target=4)
    """
    _checks.check_choice("experiments.tasks.backdoor.trigger_for", "dataset_name", dataset_name, _data.NAMES)
    base = Trigger(1.0, 16.0) if dataset_name == "digits" else Trigger()
    return dataclasses.replace(base, **overrides)


def checkerboard(height: int, width: int) -> np.ndarray:
    """Boolean [height, width] pattern, True where (row + column) is even.

    Example:
      >>> from gifjax.experiments.tasks.backdoor import checkerboard
      >>> checkerboard(2, 3).astype(int)
      array([[1, 0, 1],
             [0, 1, 0]])
    """
    return (np.add.outer(np.arange(height), np.arange(width)) % 2) == 0


def add_trigger(pixels, trigger: Trigger = Trigger()) -> np.ndarray:
    """The trigger on raw-scale images: ``min(pixels + amount·checkerboard, max_value)``.

    Args:
      pixels: images [..., H, W, C] on the raw scale [0, ``trigger.max_value``].
      trigger: :class:`Trigger` (only ``amount`` and ``max_value`` are used).

    Returns:
      float32 array of the same shape.

    Example:
      >>> import numpy as np
      >>> from gifjax.experiments.tasks.backdoor import add_trigger
      >>> add_trigger(np.array([[[100.], [250.]], [[0.], [255.]]])).squeeze()
      array([[116., 250.],
             [  0., 255.]], dtype=float32)
    """
    pixels = np.asarray(pixels, np.float32)
    if pixels.ndim < 3:
        raise _checks.error("experiments.tasks.backdoor.add_trigger", "pixels", f"shape {pixels.shape}",
                            "images [..., H, W, C]", "pass NHWC (or HWC) images.")
    pattern = checkerboard(*pixels.shape[-3:-1])[:, :, None]
    return np.minimum(pixels + np.float32(trigger.amount) * pattern,
                      np.float32(trigger.max_value)).astype(np.float32)


def apply_trigger(x, mean, std, trigger: Trigger = Trigger()) -> np.ndarray:
    """The trigger on *normalised* images (as :func:`gifjax.experiments.data.load` returns them).

    Undoes the normalisation (``[0, 1] = x·std + mean``), adds
    ``amount / max_value`` on the checkerboard pixels, clips to 1 (the raw
    ``max_value``) and normalises again: :func:`add_trigger` in [0, 1] units.
    """
    raw01 = np.asarray(x, np.float32) * std + mean
    unit = Trigger(trigger.amount / trigger.max_value, 1.0)
    return _data.normalize(add_trigger(raw01, unit), mean, std)


@_repr.compact_repr()
class Poisoned(NamedTuple):
    """A poisoned training set and the triggered evaluation sets (:func:`poison`).

    ``train``: the training split with ``indices`` triggered and relabelled
    to the target; ``true_labels``: their original labels; ``val_triggered`` /
    ``test_triggered``: every validation / test image with the trigger and
    its *true* label.
    """

    train: _data.Split
    indices: np.ndarray
    true_labels: np.ndarray
    val_triggered: _data.Split
    test_triggered: _data.Split
    trigger: Trigger


def poison(dataset, trigger: Trigger | None = None, *, seed: int = 0) -> Poisoned:
    """Trigger and relabel ``round(fraction · n)`` training images of classes ≠ target.

    Args:
      dataset: a :class:`gifjax.experiments.data.Dataset`.
      trigger: the :class:`Trigger`; default :func:`trigger_for` the data set.
      seed: which images are poisoned (the same seed, the same images).

    Returns:
      :class:`Poisoned`.
    """
    fn = "experiments.tasks.backdoor.poison"
    trigger = (trigger or trigger_for(dataset.name)).validate(fn, dataset.num_classes)
    x, y = dataset.train
    candidates = np.flatnonzero(y != trigger.target)
    count = int(round(trigger.fraction * len(y)))
    if count < 1 or count > len(candidates):
        raise _checks.error(fn, "trigger", f"fraction {trigger.fraction} of {len(y)} images "
                            f"= {count}", f"between 1 and the {len(candidates)} images whose class "
                            f"is not the target {trigger.target}",
                            "change Trigger.fraction or use more training data.")
    idx = np.sort(np.random.default_rng([seed, 2]).choice(candidates, count, replace=False))
    xp, yp = x.copy(), y.copy()
    xp[idx] = apply_trigger(x[idx], dataset.mean, dataset.std, trigger)
    yp[idx] = trigger.target
    triggered = lambda s: _data.Split(apply_trigger(s.x, dataset.mean, dataset.std, trigger), s.y)
    return Poisoned(_data.Split(xp, yp), idx, y[idx].copy(), triggered(dataset.val),
                    triggered(dataset.test), trigger)


@_repr.compact_repr()
class BackdoorMetrics(NamedTuple):
    """Backdoor metrics (fractions; arrays along a step grid, floats at one step)."""

    clean_acc: float     # accuracy on clean images
    relabel_acc: float   # accuracy against true labels on triggered images
    corrupt_acc: float   # triggered images of other classes still predicted as target (lower is better)
    f1: float            # 2·relabel·clean / (relabel + clean)


def backdoor_metrics(clean_predictions, clean_labels, triggered_predictions, true_labels,
                     target: int) -> BackdoorMetrics:
    """Clean / relabel / corrupt accuracy and F1 from predicted classes ([..., N] arrays).

    Example:
      >>> import numpy as np
      >>> from gifjax.experiments.tasks import backdoor_metrics
      >>> backdoor_metrics(np.array([1, 2]), np.array([1, 2]), np.array([4, 2]), np.array([1, 2]), 4)
      BackdoorMetrics(clean_acc=1.0, relabel_acc=0.5, corrupt_acc=0.5, f1=0.6666666666666666)
    """
    true_labels = np.asarray(true_labels)
    clean = common.accuracy(clean_predictions, clean_labels)
    relabel = common.accuracy(triggered_predictions, true_labels)
    other = true_labels != target
    corrupt = common.accuracy(triggered_predictions, np.full_like(true_labels, target), other)
    return BackdoorMetrics(clean, relabel, corrupt, common.f1(relabel, clean))


def evaluate(model, variables, clean, triggered, target: int) -> BackdoorMetrics:
    """:func:`backdoor_metrics` of a model on a clean split and its triggered copy."""
    p = lambda s: _train.predict(model, variables, s.x).argmax(-1)
    return backdoor_metrics(p(clean), clean.y, p(triggered), triggered.y, target)


@_repr.compact_repr()
class BackdoorResult(NamedTuple):
    """One estimator's backdoor correction; fields as in :class:`~gifjax.experiments.tasks.RemovalResult`."""

    method: str
    config: TaskConfig
    metrics: BackdoorMetrics
    step: float
    steps: np.ndarray
    curve: BackdoorMetrics
    test_curve: BackdoorMetrics
    num_hvps: int
    converged: bool
    failure: str
    residual_norm: float
    delta_norm: float
    num_selected: int
    num_params: int
    time_s: float
    compile_s: float
    timings: dict
    classifier_rows: tuple = ()     # classifier rows (logit units) the mask touches (all for IF)
    target_row: bool | None = None  # whether the backdoor target's row is among them
    agreement: float | None = None  # share of test images (clean and triggered) predicted as ``reference``


def hessian_data(dataset, poisoned: Poisoned, config: TaskConfig):
    """(x, y) the Hessian averages over: poisoned training set (heldout) or clean test (paper)."""
    x, y = dataset.test if config.protocol == "paper" else poisoned.train
    return common.subsample(x, y, config.hessian_size, config.seed, salt=3)


def _examined(poisoned):
    return poisoned.train.x[poisoned.indices], poisoned.train.y[poisoned.indices], poisoned.true_labels


def correction_mask(model, variables, poisoned: Poisoned, config: TaskConfig = TaskConfig()):
    """Element mask from unit scores on U = the poisoned training images; ``(mask, selected, total)``.

    ``scores="gradients"`` ranks units by the output-gradients of the
    correction loss mean_U ℓ(x̃, target) − mean_U ℓ(x̃, true label), whose
    parameter gradient is g (up to m/n).
    """
    config.validate("experiments.tasks.backdoor.correction_mask")
    x_u, y_poison, y_true = _examined(poisoned)
    return common.selection_mask(model, variables, x_u, y_poison, config, minus_labels=y_true,
                                 target=poisoned.trigger.target)


def correct_backdoor(model, variables, dataset, poisoned: Poisoned,
                     config: TaskConfig = TaskConfig(), *, weight_decay: float,
                     mask=None, reference=None) -> BackdoorResult:
    """Correct the poisoned labels of a trained model with one estimator; see module docstring.

    Args:
      model, variables: the model trained on ``poisoned.train``.
      dataset: the clean :class:`gifjax.experiments.data.Dataset` (its val / test splits).
      poisoned: from :func:`poison`.
      config: estimator, selection, protocol, solver budget and step grid.
      weight_decay: the weight decay training used.
      mask: optional precomputed mask (:func:`correction_mask`).
      reference: optional pair ``(clean, triggered)`` of predicted classes of a
        reference model (the retrained baseline) on the clean test images and
        on ``poisoned.test_triggered``; the result's ``agreement`` is then the
        share of all these images on which the corrected model, at the chosen
        step, predicts the same class. Not used to choose the step.

    Returns:
      :class:`BackdoorResult`, ``metrics`` on the test split at the chosen step.
    """
    fn = "experiments.tasks.correct_backdoor"
    config.validate(fn)
    _check_step_rule(fn, config)
    _checks.check_nonnegative(fn, "weight_decay", weight_decay)
    target = poisoned.trigger.target
    timings = {}
    params = variables["params"]
    total = sum(int(np.size(p)) for p in jax.tree_util.tree_leaves(params))
    t0 = time.perf_counter()
    if config.method == "if":
        mask, selected = None, total
    elif mask is None:
        mask, selected, _ = correction_mask(model, variables, poisoned, config)
    else:
        selected = sum(int(np.count_nonzero(m)) for m in jax.tree_util.tree_leaves(mask))
    timings["selection"] = time.perf_counter() - t0

    x_u, y_poison, y_true = _examined(poisoned)
    g, compile_g, timings["gradient"] = common.run_compiled(
        common.relabel_grad, variables, x_u, y_poison, y_true, model=model,
        num_train=len(poisoned.train.y))
    hx, hy = hessian_data(dataset, poisoned, config)
    sol = common.solve(model, variables, g, hx, hy, config, mask=mask, weight_decay=weight_decay)
    timings["solve"] = sol.time_s

    def along(clean, triggered):
        p = lambda s: common.predictions_along(model, variables, direction, steps, s.x)
        preds = p(clean), p(triggered)
        return backdoor_metrics(preds[0], clean.y, preds[1], triggered.y, target), preds

    t0 = time.perf_counter()
    direction, norm = stepping.unit_direction(sol.delta)
    steps = config.grid()
    if config.protocol == "paper":
        curve, test_preds = along(dataset.test, poisoned.test_triggered)
    else:
        curve, _ = along(dataset.val, poisoned.val_triggered)
    k = stepping.best_index(curve.f1, maximize=True)
    timings["search"] = time.perf_counter() - t0
    if config.protocol != "paper":
        test_curve, test_preds = along(dataset.test, poisoned.test_triggered)
    else:
        test_curve = curve
    at = BackdoorMetrics(*(float(np.asarray(v)[k]) for v in test_curve))
    agree = None
    if reference is not None:
        ours = np.concatenate([test_preds[0][k], test_preds[1][k]])
        theirs = np.concatenate([np.asarray(reference[0]), np.asarray(reference[1])])
        agree = float(common.accuracy(ours, theirs))
    rows, has_target = common.classifier_rows(params, mask, target)
    return BackdoorResult(config.method, config, at, float(steps[k]), steps, curve, test_curve,
                          sol.num_hvps, sol.converged, sol.failure, sol.residual_norm, float(norm),
                          selected, total, sum(timings.values()), sol.compile_s + compile_g, timings,
                          rows, has_target, agree)


def _check_step_rule(fn, config):
    if config.max_self_acc is not None:
        raise _checks.error(fn, "config.max_self_acc", repr(config.max_self_acc),
                            "None for the backdoor task (the self-accuracy rule is class removal's)",
                            "drop max_self_acc, or use it with class_removal.remove_class.")


@_repr.compact_repr()
class BackdoorExperiment(NamedTuple):
    """Poison, train, retrain on corrected labels, and run several estimators."""

    trigger: Trigger
    original: BackdoorMetrics    # the poisoned model, on test
    retrained: BackdoorMetrics   # the baseline, on test
    runs: tuple
    train_s: float
    retrain_s: float
    selection_s: float
    model: object = None
    variables: dict = None


def run_experiment(dataset, *, trigger: Trigger | None = None, model="cnn", methods=METHODS,
                   config: TaskConfig = TaskConfig(), training: TrainConfig = TrainConfig(),
                   progress: bool = False, log=None) -> BackdoorExperiment:
    """The whole backdoor experiment: poison (seed ``training.seed``), train, retrain, correct.

    Arguments as in :func:`gifjax.experiments.tasks.class_removal.run_experiment`, plus
    ``trigger`` (default :func:`trigger_for` the data set).
    """
    from .class_removal import check_methods  # one shared check

    fn = "experiments.tasks.backdoor.run_experiment"
    config.validate(fn)
    _check_step_rule(fn, config)
    methods = check_methods(fn, methods)
    say = log or (lambda *a, **k: None)
    poisoned = poison(dataset, trigger, seed=training.seed)
    net = _models.create(model, dataset.num_classes) if isinstance(model, str) else model
    target = poisoned.trigger.target

    say(f"training {type(net).__name__} on {len(poisoned.train.y)} {dataset.name} images, "
        f"{len(poisoned.indices)} of them triggered and relabelled to {target} ...")
    fit, train_s = common.timed(_train.fit, net, *poisoned.train,
                                **training.fit_kwargs(progress, validation=dataset.val))
    say("retraining on the corrected labels (the baseline) ...")
    refit, retrain_s = common.timed(_train.retrain_on_labels, net, *poisoned.train,
                                    poisoned.indices, poisoned.true_labels,
                                    **training.fit_kwargs(progress, validation=dataset.val))
    variables = fit.variables
    original = evaluate(net, variables, dataset.test, poisoned.test_triggered, target)
    retrained = evaluate(net, refit.variables, dataset.test, poisoned.test_triggered, target)

    runs, selection_s = common.compare_estimators(
        net, variables, methods, config, (dataset.val, dataset.test),
        make_mask=lambda cfg: correction_mask(net, variables, poisoned, cfg),
        run=lambda cfg, mask: correct_backdoor(net, variables, dataset, poisoned, cfg,
                                               weight_decay=training.weight_decay, mask=mask),
        say=say)
    return BackdoorExperiment(poisoned.trigger, original, retrained, runs, train_s,
                              retrain_s, selection_s, net, variables)
