r"""Class removal: make a trained classifier forget one class, and compare with retraining.

The paper's first experiment (Lyu et al. 2024, §5). For a model θ̂ trained on
n examples and a class c with m training examples U:

1. g = m/(n − m)·∇(mean_U ℓ + R)(θ̂) (:func:`gifjax.removal_gradient`, the
   group-removal scaling for a Hessian of the remaining data);
2. Δ from the estimator (``if`` / ``pif`` / ``fif`` / ``gif``), with the
   target parameters chosen by a selection rule on U's unit scores;
3. d = Δ / ‖Δ‖ (:func:`gifjax.stepping.unit_direction`), and a step search
   over θ̂ + s·d, s on a fixed grid (:class:`~gifjax.experiments.tasks.TaskConfig`
   ``max_step``, ``num_steps``; s = 0 is the original model);
4. at each step: **self-acc** = accuracy on images of class c (lower is
   better), **test-acc** = accuracy on the other classes, and
   **F1** = 2(1 − self)(test) / ((1 − self) + test); the step with the best
   F1 is kept (:func:`gifjax.stepping.best_index`: non-finite F1 never wins,
   ties go to the smallest step).

Protocols (``config.protocol``):

* ``"heldout"`` (default, honest): the Hessian averages over training examples
  of the remaining classes, the step is chosen by F1 on the validation split,
  the metrics are reported on the test split;
* ``"paper"``: the paper's code — the Hessian averages over a batch of test
  images of the remaining classes (the official code drops the removed class)
  and the step is chosen by F1 on the test split itself, so test numbers are
  optimistic. For comparison only.

``config.max_self_acc`` = 0.005 follows the official step rule: the best F1
only among steps whose self-accuracy is below 0.5 %.

The baseline is the model retrained from scratch without class c
(:func:`gifjax.experiments.train.retrain_without_class`); its F1 is the target.

Example (CPU, ~1 minute):
  >>> from gifjax.experiments import data, models, train
  >>> from gifjax.experiments.tasks import class_removal, TaskConfig
  >>> ds = data.load("digits", seed=0)
  >>> model = models.create("cnn", ds.num_classes)
  >>> fit = train.fit(model, *ds.train, epochs=20, batch_size=64, learning_rate=3e-3,
  ...                 weight_decay=1e-3, progress=False)
  >>> out = class_removal.remove_class(model, fit.variables, ds, 3, TaskConfig(method="gif"),
  ...                                  weight_decay=1e-3)
  >>> out.metrics.self_acc < 0.5                            # doctest: +SKIP
  True
"""

from __future__ import annotations

import time
from typing import NamedTuple

import jax
import numpy as np

from gifjax import METHODS, _checks, _repr, stepping

from .. import models as _models
from .. import train as _train
from . import common
from .common import TaskConfig, TrainConfig


@_repr.compact_repr()
class RemovalMetrics(NamedTuple):
    """Class-removal metrics (fractions in [0, 1]; arrays along a step grid, floats at one step)."""

    self_acc: float   # accuracy on the removed class (lower is better)
    test_acc: float   # accuracy on the other classes
    f1: float         # 2(1 − self)(test) / ((1 − self) + test)


@_repr.compact_repr()
class RemovalResult(NamedTuple):
    """One estimator's class-removal run.

    ``metrics`` are on the test split at the chosen step; ``curve`` holds the
    metrics along the whole grid on the split the step was chosen on
    (validation for ``heldout``, test for ``paper``) and ``test_curve`` on the
    test split. ``time_s`` = selection + gradient + solve + step search
    (compilation excluded; ``compile_s`` is the solve's compile).
    """

    method: str
    config: TaskConfig
    metrics: RemovalMetrics
    step: float             # chosen step length s (0 = no change helped)
    steps: np.ndarray       # the grid
    curve: RemovalMetrics   # along the grid, on the selection split
    test_curve: RemovalMetrics
    num_hvps: int
    converged: bool
    failure: str
    residual_norm: float
    delta_norm: float       # ‖Δ‖ before normalisation
    num_selected: int       # parameters the estimator may change
    num_params: int
    time_s: float
    compile_s: float
    timings: dict           # seconds per stage: selection, gradient, solve, search
    classifier_rows: tuple = ()     # classifier rows (logit units) the mask touches (all for IF)
    target_row: bool | None = None  # whether the removed class's row is among them
    agreement: float | None = None  # share of the other classes' test images predicted as ``reference``


def agreement(predictions, reference, where=None):
    """Share of examples (in ``where``) where ``predictions`` equal ``reference``: [..., N] → [...].

    With ``reference`` the retrained model's predicted classes, this scores an
    edited model by how closely it reproduces retraining, beyond accuracy
    (which saturates): two models can both be 98 % accurate and still
    disagree on different images. ``nan`` when ``where`` selects nothing.

    Example:
      >>> import numpy as np
      >>> from gifjax.experiments.tasks.class_removal import agreement
      >>> agreement(np.array([[1, 2, 3], [1, 0, 1]]), np.array([1, 2, 0]))
      array([0.66666667, 0.33333333])
    """
    return common.accuracy(predictions, reference, where)


def removal_metrics(predictions, labels, removed_class: int) -> RemovalMetrics:
    """Self-acc, test-acc and F1 from predicted classes.

    Args:
      predictions: int array [..., N] (leading axes, e.g. steps, are kept).
      labels: int array [N].
      removed_class: the class c.

    Returns:
      :class:`RemovalMetrics` (floats, or arrays shaped like the leading axes).

    Example:
      >>> import numpy as np
      >>> from gifjax.experiments.tasks import removal_metrics
      >>> removal_metrics(np.array([0, 1, 1, 2]), np.array([0, 0, 1, 2]), 0)
      RemovalMetrics(self_acc=0.5, test_acc=1.0, f1=0.6666666666666666)
    """
    labels = np.asarray(labels)
    self_acc = common.accuracy(predictions, labels, labels == removed_class)
    test_acc = common.accuracy(predictions, labels, labels != removed_class)
    return RemovalMetrics(self_acc, test_acc, common.f1(1.0 - np.asarray(self_acc), test_acc))


def evaluate(model, variables, split, removed_class: int) -> RemovalMetrics:
    """:func:`removal_metrics` of a model on a split (e.g. the retrained baseline on test)."""
    preds = _train.predict(model, variables, split.x).argmax(-1)
    return removal_metrics(preds, split.y, removed_class)


def _check_class(fn, dataset, removed_class):
    if (not isinstance(removed_class, (int, np.integer)) or isinstance(removed_class, bool)
            or not 0 <= removed_class < dataset.num_classes):
        raise _checks.error(fn, "removed_class", repr(removed_class),
                            f"an int in [0, {dataset.num_classes})",
                            "pass a class label of the data set, e.g. removed_class=0.")
    for name, split in (("train", dataset.train), ("val", dataset.val), ("test", dataset.test)):
        if not np.any(split.y == removed_class):
            raise _checks.error(fn, "dataset", f"no examples of class {removed_class} in its "
                                f"{name} split", "every split to contain the removed class",
                                "use more data (max_train / val_fraction) or another class.")


def hessian_data(dataset, removed_class: int, config: TaskConfig):
    """(x, y) the Hessian averages over under ``config.protocol`` (see module docstring)."""
    x, y = dataset.test if config.protocol == "paper" else dataset.train
    keep = y != removed_class  # both protocols: the remaining classes (as the official code)
    x, y = x[keep], y[keep]
    return common.subsample(x, y, config.hessian_size, config.seed, salt=1)


def remove_class(model, variables, dataset, removed_class: int, config: TaskConfig = TaskConfig(),
                 *, weight_decay: float, mask=None, reference=None) -> RemovalResult:
    """Remove class ``removed_class`` from a trained model with one estimator; see module docstring.

    Args:
      model: the linen model (e.g. :func:`gifjax.experiments.models.create`).
      variables: its trained variables (:func:`gifjax.experiments.train.fit`).
      dataset: the :class:`gifjax.experiments.data.Dataset` it was trained on (its
        ``train`` split is the training set; ``val`` and ``test`` as above).
      removed_class: the class c to forget.
      config: estimator, selection, protocol, solver budget and step grid.
      weight_decay: the weight decay training used (the Hessian is that of
        the training objective, so θ̂ is its stationary point).
      mask: optional precomputed element mask (e.g. one shared by several
        estimators, from :func:`removal_mask`); its selection time is then
        not part of ``time_s``. By default it is made from ``config`` on U.
      reference: optional predicted classes [N_test] of a reference model on
        the test split (the retrained baseline); the result's ``agreement`` is
        then the share of test images of the other classes on which the
        edited model, at the chosen step, predicts the same class
        (:func:`agreement`). Not used to choose the step.

    Returns:
      :class:`RemovalResult`.
    """
    fn = "experiments.tasks.remove_class"
    config.validate(fn)
    _check_class(fn, dataset, removed_class)
    _checks.check_nonnegative(fn, "weight_decay", weight_decay)
    timings = {}
    params = variables["params"]
    x_u, y_u = _examined(dataset, removed_class)
    total = sum(int(np.size(p)) for p in jax.tree_util.tree_leaves(params))

    t0 = time.perf_counter()
    if config.method == "if":
        mask, selected = None, total
    elif mask is None:
        mask, selected, _ = removal_mask(model, variables, dataset, removed_class, config)
    else:
        selected = sum(int(np.count_nonzero(m)) for m in jax.tree_util.tree_leaves(mask))
    timings["selection"] = time.perf_counter() - t0

    g, compile_g, timings["gradient"] = common.run_compiled(
        common.removal_grad, variables, x_u, y_u, model=model, weight_decay=float(weight_decay),
        num_train=len(dataset.train.y))

    hx, hy = hessian_data(dataset, removed_class, config)
    sol = common.solve(model, variables, g, hx, hy, config, mask=mask, weight_decay=weight_decay)
    timings["solve"] = sol.time_s

    t0 = time.perf_counter()
    direction, norm = stepping.unit_direction(sol.delta)
    steps = config.grid()
    pick = common.split_for_protocol(dataset, config.protocol)
    pick_preds = common.predictions_along(model, variables, direction, steps, pick.x)
    curve = removal_metrics(pick_preds, pick.y, removed_class)
    allowed = None if config.max_self_acc is None else np.asarray(curve.self_acc) < config.max_self_acc
    k = stepping.best_index(curve.f1, maximize=True, where=allowed)
    timings["search"] = time.perf_counter() - t0
    # Reporting, not part of the method (not timed): the test metrics along the grid.
    test_preds = pick_preds if config.protocol == "paper" else common.predictions_along(
        model, variables, direction, steps, dataset.test.x)
    test_curve = curve if config.protocol == "paper" else removal_metrics(
        test_preds, dataset.test.y, removed_class)
    at = RemovalMetrics(*(float(np.asarray(v)[k]) for v in test_curve))
    agree = None if reference is None else float(
        agreement(test_preds[k], np.asarray(reference), dataset.test.y != removed_class))
    rows, has_target = common.classifier_rows(params, mask, removed_class)
    return RemovalResult(config.method, config, at, float(steps[k]), steps, curve, test_curve,
                         sol.num_hvps, sol.converged, sol.failure, sol.residual_norm, float(norm),
                         selected, total, sum(timings.values()), sol.compile_s + compile_g, timings,
                         rows, has_target, agree)


def _examined(dataset, removed_class):
    u = dataset.train.y == removed_class
    return dataset.train.x[u], dataset.train.y[u]


def removal_mask(model, variables, dataset, removed_class: int, config: TaskConfig = TaskConfig()):
    """The element mask of ``config`` (rule, ratio, scores) on U = the removed class's training images.

    Returns ``(mask, selected, total)``; the mask is ``None`` for ``method="if"``.
    With ``config.scores == "gradients"`` the units are ranked by the
    output-gradients of U's mean cross-entropy.
    """
    fn = "experiments.tasks.removal_mask"
    config.validate(fn)
    _check_class(fn, dataset, removed_class)
    x_u, y_u = _examined(dataset, removed_class)
    return common.selection_mask(model, variables, x_u, y_u, config, target=removed_class)


# ----------------------------------------------------------------------------- whole experiment


@_repr.compact_repr()
class RemovalExperiment(NamedTuple):
    """Train, retrain without the class, and run several estimators (:func:`run_experiment`).

    ``original`` and ``retrained`` are test metrics of the trained model and of
    the retrained baseline; ``runs`` one :class:`RemovalResult` per method;
    ``selection_s`` the time to score units and build the shared mask
    (pif / fif / gif use the same mask; compile included).
    """

    removed_class: int
    original: RemovalMetrics
    retrained: RemovalMetrics
    runs: tuple
    train_s: float
    retrain_s: float
    selection_s: float
    model: object = None
    variables: dict = None


def run_experiment(dataset, removed_class: int, *, model="cnn", methods=METHODS,
                   config: TaskConfig = TaskConfig(), training: TrainConfig = TrainConfig(),
                   progress: bool = False, log=None) -> RemovalExperiment:
    """The whole class-removal experiment on one data set, against retraining.

    1. train ``model`` on ``dataset.train`` (``training``);
    2. retrain it from scratch without ``removed_class`` (the baseline);
    3. for each of ``methods``: :func:`remove_class` with ``config`` (its
       ``method`` replaced), all masked estimators sharing one mask.

    Args:
      dataset: a :class:`gifjax.experiments.data.Dataset`.
      removed_class: the class to forget.
      model: a model name for :func:`gifjax.experiments.models.create` or a linen module.
      methods: estimators to run, a subset of ``("if", "pif", "fif", "gif")``.
      config: the estimator setup shared by all methods.
      training: optimiser settings for the model and the baseline.
      progress: show tqdm bars while training.
      log: optional ``print``-like callable for progress messages.

    Returns:
      :class:`RemovalExperiment`.
    """
    fn = "experiments.tasks.class_removal.run_experiment"
    config.validate(fn)
    _check_class(fn, dataset, removed_class)
    methods = check_methods(fn, methods)
    say = log or (lambda *a, **k: None)
    net = _models.create(model, dataset.num_classes) if isinstance(model, str) else model

    say(f"training {type(net).__name__} on {len(dataset.train.y)} {dataset.name} images ...")
    fit, train_s = common.timed(_train.fit, net, *dataset.train,
                                **training.fit_kwargs(progress, validation=dataset.val))
    say(f"retraining without class {removed_class} (the baseline) ...")
    refit, retrain_s = common.timed(_train.retrain_without_class, net, *dataset.train,
                                    removed_class,
                                    **training.fit_kwargs(progress, validation=dataset.val))
    variables = fit.variables
    original = evaluate(net, variables, dataset.test, removed_class)
    retrained = evaluate(net, refit.variables, dataset.test, removed_class)

    runs, selection_s = common.compare_estimators(
        net, variables, methods, config, (dataset.val, dataset.test),
        make_mask=lambda cfg: removal_mask(net, variables, dataset, removed_class, cfg),
        run=lambda cfg, mask: remove_class(net, variables, dataset, removed_class, cfg,
                                           weight_decay=training.weight_decay, mask=mask),
        say=say)
    return RemovalExperiment(removed_class, original, retrained, runs, train_s, retrain_s,
                             selection_s, net, variables)


def check_methods(fn, methods):
    methods = (methods,) if isinstance(methods, str) else tuple(methods)
    if not methods or any(m not in METHODS for m in methods) or len(set(methods)) != len(methods):
        raise _checks.error(fn, "methods", repr(methods),
                            f"distinct names from {list(METHODS)}",
                            "pass e.g. methods=('if', 'pif', 'fif', 'gif').")
    return methods
