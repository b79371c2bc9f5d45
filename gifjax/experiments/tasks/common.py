"""Pieces shared by the class-removal and backdoor tasks.

* :class:`TaskConfig` — one small frozen value: estimator, parameter
  selection, protocol, solver budget and step grid;
* :func:`f1` — the harmonic mean the paper scores both tasks with;
* :func:`solve` — one jitted influence solve (any estimator), compiled ahead
  of time so its compile time and its run time are reported apart;
* :func:`predictions_along` — class predictions at θ + s·d for every step s of
  a grid (:func:`gifjax.stepping.along`: one jitted program, ``lax.map`` over
  the steps; fixed-size batches of inputs); the direction d = Δ/‖Δ‖ and the
  choice of the step (best F1, ties to the smallest step) are
  :func:`gifjax.stepping.unit_direction` and :func:`gifjax.stepping.best_index`;
* :func:`selection_mask` — unit scores on the examined data U → element mask;
* :func:`removal_grad` / :func:`relabel_grad` — the right-hand sides g;
* :func:`split_for_protocol` — which split the step is chosen on.

Solver setup (the same for IF, PIF, FIF and GIF, so their HVP counts and
errors are comparable): :class:`gifjax.solvers.LSTSQ` with a fixed budget of
``max_steps`` iterations (CGLS: 1 + 2·max_steps HVPs; the tolerance
``rtol=1e-6`` is rarely met, so "converged" is usually False and the budget
is what stops it), on H + λI with a small damping λ (``damping``). CG is not
used: a trained CNN's Hessian is indefinite, and CG stops at the first
negative curvature (``failure="indefinite"``), whereas CGLS minimises the
residual of the same system, indefinite or not.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gifjax import METHODS, _checks, _repr
from gifjax import influence as _influence_fn
from gifjax import removal_gradient as _removal_gradient
from gifjax import selection as _selection
from gifjax import solvers as _solvers
from gifjax import stepping as _stepping

from .. import models as _models
from .. import train as _train

PROTOCOLS = ("heldout", "paper")
SCORES = ("outputs", "gradients")
RULES = ("highest", "lowest", "exclusive", "random", "threshold")
CLASSIFIER = _selection.CLASSIFIER
#: Unit statistics (``TaskConfig.statistic``): one of :data:`gifjax.selection.STATISTICS`
#: for every layer, or a per-layer mix: ``"signed_logits"`` = ``"abs_mean"`` on hidden
#: layers and the *signed* mean on the classifier (the logits), ``"post_activation"``
#: = mean of relu(y) on hidden layers (the models' nonlinearity) and ``"abs_mean"`` on
#: the classifier, which has no nonlinearity.
STATISTICS = _selection.STATISTICS + ("signed_logits", "post_activation")
_MIXED = {"signed_logits": ("abs_mean", "signed_mean"), "post_activation": ("relu_mean", "abs_mean")}


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    r"""How one estimator run is set up (a small frozen value; hashable).

    Fields:
      method: ``"if"``, ``"pif"``, ``"fif"`` or ``"gif"``.
      ratio: fraction in (0, 1] of each Dense/Conv layer's parameters that
        pif / fif / gif may change (``gifjax.selection.select``, per-layer
        budget); ``if`` changes all parameters and ignores it.
      rule: selection rule, one of ``"highest"``, ``"lowest"``,
        ``"exclusive"``, ``"random"``, ``"threshold"``.
      scores: which unit statistic on U ranks the units: ``"outputs"``
        (\|mean pre-activation\|, :func:`gifjax.selection.activation_scores`) or
        ``"gradients"`` (\|mean ∂loss(U)/∂output\|).
      protocol: ``"heldout"`` (Hessian on training data, step chosen on the
        validation split, metrics on test) or ``"paper"`` (the paper's code:
        Hessian on a test batch and step chosen on the test set — a leak,
        reproduced for comparison).
      damping: λ ≥ 0 added to the Hessian (on top of the model's weight decay).
      max_steps: LSTSQ (CGLS) iterations; each costs 2 HVPs.
      hessian_size: how many examples the Hessian averages over (a seeded
        random subset; ``None`` = all available).
      min_step, max_step, num_steps: the step grid, s = 0 (the original
        model) and ``num_steps`` lengths spaced geometrically from
        ``min_step`` to ``max_step``. s is the Euclidean distance moved in
        parameter space (the direction has unit norm). Geometric, because the
        best distance differs by orders of magnitude between estimators
        (all-parameter IF moves little, a 5 % mask far), and one grid with
        the same relative resolution must serve them all.
      seed: draws the Hessian subset and the random parts of selection.
      classifier: the classifier layer's part in the mask, for every rule
        (:data:`gifjax.selection.CLASSIFIER`): ``"rule"`` (the official code:
        like any layer), ``"exclude"`` (none of it; its budget is dropped) or
        ``"target_row"`` (only the removed class's / backdoor target's row).
      statistic: the unit statistic that ranks units (:data:`STATISTICS`);
        ``"abs_mean"`` is the official \|mean\|, the others are ablations.
      max_self_acc: class removal only: keep the best F1 only among steps
        whose self-accuracy on the selection split is below this (the
        official code: 0.005); ``None`` (default): the best F1 over all steps.
        No step qualifying means no change (s = 0).
    """

    method: str = "gif"
    ratio: float = 0.05
    rule: str = "highest"
    scores: str = "outputs"
    protocol: str = "heldout"
    damping: float = 1e-3
    max_steps: int = 40
    hessian_size: int | None = 512
    min_step: float = 0.01
    max_step: float = 100.0
    num_steps: int = 64
    seed: int = 0
    classifier: str = "rule"
    statistic: str = "abs_mean"
    max_self_acc: float | None = None

    def validate(self, fn: str = "experiments.tasks.TaskConfig") -> "TaskConfig":
        """Check every field; return ``self`` (errors name the field, got vs expected)."""
        _checks.check_choice(fn, "method", self.method, METHODS)
        _checks.check_choice(fn, "rule", self.rule, RULES)
        _checks.check_choice(fn, "scores", self.scores, SCORES)
        _checks.check_choice(fn, "protocol", self.protocol, PROTOCOLS)
        if not is_number(self.ratio) or not 0 < self.ratio <= 1:
            raise _checks.error(fn, "ratio", repr(self.ratio), "a float in (0, 1]",
                                "pass e.g. ratio=0.05 to select 5 % of each layer's parameters.")
        if self.rule == "exclusive" and self.ratio > 0.5:
            raise _checks.error(fn, "ratio", repr(self.ratio), "ratio <= 0.5 for rule='exclusive'",
                                "lower the ratio or use another rule.")
        _checks.check_nonnegative(fn, "damping", self.damping)
        for arg, value in (("max_steps", self.max_steps), ("num_steps", self.num_steps)):
            if not is_int(value) or value < 1:
                raise _checks.error(fn, arg, repr(value), "an int >= 1",
                                    f"pass `{arg}` as a positive whole number.")
        if self.hessian_size is not None and (not is_int(self.hessian_size)
                                              or self.hessian_size < 1):
            raise _checks.error(fn, "hessian_size", repr(self.hessian_size), "None or an int >= 1",
                                "pass e.g. hessian_size=512, or None for all examples.")
        if not is_number(self.min_step) or not 0 < self.min_step < np.inf:
            raise _checks.error(fn, "min_step", repr(self.min_step), "a finite float > 0",
                                "pass the smallest non-zero step length to try, e.g. min_step=0.01.")
        if not is_number(self.max_step) or not self.min_step <= self.max_step < np.inf:
            raise _checks.error(fn, "max_step", repr(self.max_step),
                                f"a finite float >= min_step ({self.min_step!r})",
                                "pass the largest step length to try, e.g. max_step=100.0.")
        if not is_int(self.seed):
            raise _checks.error(fn, "seed", repr(self.seed), "an int", "pass e.g. seed=0.")
        _checks.check_choice(fn, "classifier", self.classifier, CLASSIFIER)
        _checks.check_choice(fn, "statistic", self.statistic, STATISTICS)
        if self.scores == "gradients" and self.statistic in ("relu_mean", "post_activation"):
            raise _checks.error(fn, "statistic", repr(self.statistic),
                                "'abs_mean', 'signed_mean', 'mean_abs' or 'signed_logits' with scores='gradients'",
                                "use a post-activation statistic with scores='outputs'.")
        if self.max_self_acc is not None and (not is_number(self.max_self_acc)
                                              or not 0 < self.max_self_acc <= 1):
            raise _checks.error(fn, "max_self_acc", repr(self.max_self_acc), "None or a float in (0, 1]",
                                "pass max_self_acc=0.005 for the official step rule, or None.")
        return self

    @property
    def solver(self) -> _solvers.LSTSQ:
        """The solver every estimator uses: LSTSQ (CGLS) with a fixed budget."""
        return _solvers.LSTSQ(rtol=1e-6, max_steps=int(self.max_steps))

    def grid(self) -> np.ndarray:
        """The step lengths tried: 0, then ``geomspace(min_step, max_step, num_steps)``."""
        return np.concatenate([[0.0], np.geomspace(float(self.min_step), float(self.max_step),
                                                   int(self.num_steps))]).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How the original model and the retrained baseline are trained (:func:`gifjax.experiments.train.fit`).

    The defaults train the small CNN on the 8×8 digits to ~97–98 % test
    accuracy in a few seconds on a CPU. ``weight_decay`` is also the one in
    the Hessian's objective, so θ̂ is (nearly) a stationary point of it.
    ``momentum``, ``schedule`` and ``checkpoint`` are :func:`fit`'s; with
    ``checkpoint="best_val"`` the tasks pass the data set's validation split
    (without the removed class for the class-removal baseline).
    :meth:`paper` is the official code's recipe (:data:`gifjax.experiments.train.PAPER_SGD`).

    Example:
      >>> from gifjax.experiments.tasks import TrainConfig
      >>> cfg = TrainConfig.paper(epochs=30)
      >>> cfg.optimizer, cfg.learning_rate, cfg.schedule, cfg.checkpoint, cfg.epochs
      ('sgd', 0.1, 'cosine', 'best_val', 30)
    """

    optimizer: str = "adam"
    learning_rate: float = 3e-3
    epochs: int = 20
    batch_size: int = 64
    weight_decay: float = 1e-3
    seed: int = 0
    momentum: float = 0.9
    schedule: Any = None
    checkpoint: str = "last"

    @classmethod
    def paper(cls, **overrides) -> "TrainConfig":
        """:data:`gifjax.experiments.train.PAPER_SGD` as a config, with ``overrides`` (e.g. ``epochs``, ``seed``)."""
        return cls(**(dict(_train.PAPER_SGD) | overrides))

    def fit_kwargs(self, progress: bool = False, validation=None) -> dict:
        """Keyword arguments for :func:`gifjax.experiments.train.fit` and the retraining baselines.

        ``validation`` is passed on only with ``checkpoint="best_val"`` (which needs it).
        """
        kwargs = dict(optimizer=self.optimizer, learning_rate=self.learning_rate,
                      epochs=self.epochs, batch_size=self.batch_size,
                      weight_decay=self.weight_decay, seed=self.seed, progress=progress,
                      momentum=self.momentum, schedule=self.schedule, checkpoint=self.checkpoint)
        if self.checkpoint != "last":
            kwargs["validation"] = validation
        return kwargs


def is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def f1(a, b):
    """Harmonic mean 2ab / (a + b) of two fractions in [0, 1]; 0 where a + b = 0.

    Class removal uses ``f1(1 - self_acc, test_acc)``; the backdoor task
    ``f1(relabel_acc, clean_acc)``. Works elementwise on arrays.

    Example:
      >>> from gifjax.experiments.tasks import f1
      >>> round(f1(1 - 0.0, 0.9), 4)   # removed class forgotten, 90 % on the rest
      0.9474
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    s = a + b
    out = np.where(s > 0, 2 * a * b / np.where(s > 0, s, 1.0), 0.0)
    return out if out.ndim else float(out)


def accuracy(predictions, labels, where=None):
    """Fraction of ``predictions == labels`` along the last axis (over ``where`` if given).

    ``predictions`` may carry leading (step) axes; returns ``nan`` when
    ``where`` selects nothing.
    """
    correct = np.asarray(predictions) == np.asarray(labels)
    if where is not None:
        where = np.asarray(where, bool)
        if not where.any():
            return np.full(correct.shape[:-1], np.nan) if correct.ndim > 1 else float("nan")
        correct = correct[..., where]
    out = correct.mean(axis=-1)
    return out if np.ndim(out) else float(out)


# ----------------------------------------------------------------------------- data per protocol


def split_for_protocol(dataset, protocol: str):
    """The split the step is chosen on: validation (``heldout``) or test (``paper``)."""
    return dataset.test if protocol == "paper" else dataset.val


def subsample(x, y, size: int | None, seed: int, *, salt: int = 0):
    """A seeded random subset of ``size`` examples (all when ``size`` is None or larger), in order."""
    n = len(y)
    if size is None or size >= n:
        return x, y
    idx = np.sort(np.random.default_rng([seed, salt]).choice(n, size, replace=False))
    return x[idx], y[idx]


# ----------------------------------------------------------------------------- selection


class _LabelledXent(NamedTuple):
    """Mean cross-entropy of fixed labels; a value-hashable callable (one compile per shape)."""

    labels: tuple
    minus: tuple = ()  # optional second label set subtracted (the backdoor's correction loss)

    def __call__(self, logits):
        y = jnp.asarray(self.labels, jnp.int32)
        out = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        if self.minus:
            y2 = jnp.asarray(self.minus, jnp.int32)
            out = out - optax.softmax_cross_entropy_with_integer_labels(logits, y2).mean()
        return out


def selection_mask(model, variables, x_u, labels, config: TaskConfig, *, minus_labels=None,
                   target: int | None = None):
    """Element mask of the parameters pif / fif / gif may change (``None`` for ``if``).

    Unit scores are computed on the examined data U (``x_u``): activation
    scores for ``config.scores == "outputs"``; for ``"gradients"`` the
    output-gradients of the mean cross-entropy of ``labels`` on U (minus that
    of ``minus_labels`` when given — the backdoor's correction loss), with
    ``config.statistic``. Then :func:`gifjax.selection.select` with
    ``config.rule``, ``config.ratio`` (per-layer budget, key from
    ``config.seed``) and ``config.classifier`` (``target``: the class whose
    row ``"target_row"`` keeps — the removed class or the backdoor target).

    Returns:
      ``(mask, selected, total)``: the mask (``None`` for ``method="if"``) and
      the number of selected / all parameters.
    """
    params = variables["params"]
    total = sum(int(np.size(p)) for p in jax.tree_util.tree_leaves(params))
    if config.method == "if":
        return None, total, total
    loss = None if config.scores == "outputs" else _LabelledXent(
        tuple(int(v) for v in np.asarray(labels)),
        () if minus_labels is None else tuple(int(v) for v in minus_labels))

    def unit_scores(statistic):
        if loss is None:
            return _selection.activation_scores(model, variables, jnp.asarray(x_u), train=False,
                                                statistic=statistic)
        return _selection.gradient_scores(model, variables, jnp.asarray(x_u), loss, train=False,
                                          statistic=statistic)

    hidden, head = _MIXED.get(config.statistic, (config.statistic, config.statistic))
    scores = unit_scores(hidden)
    if head != hidden:  # a per-layer mix: the classifier's scores from a second pass
        path = _selection.classifier_layer(scores)
        scores = {**scores, path: unit_scores(head)[path]}
    mask = _selection.select(params, scores, float(config.ratio), rule=config.rule,
                             key=jax.random.key(config.seed), classifier=config.classifier,
                             target=target if config.classifier == "target_row" else None)
    selected = sum(int(np.count_nonzero(m)) for m in jax.tree_util.tree_leaves(mask))
    if selected == 0:
        raise _checks.error("experiments.tasks.selection_mask", "ratio", repr(config.ratio),
                            "a ratio that selects at least one parameter of this model",
                            "raise the ratio (floor(ratio × layer size) is 0 for every layer).")
    return mask, selected, total


def classifier_rows(params, mask, target: int | None = None):
    """``(rows, target_row)``: the classifier rows a mask touches and whether ``target``'s is one.

    The classifier is the last Dense/Conv layer (a layer with a ``kernel``) in
    natural order (:func:`gifjax.selection.classifier_layer`); a row is one
    output unit (a class's logit). ``mask=None`` (IF: all parameters) touches
    every row. ``target_row`` is ``None`` when ``target`` is.

    Example:
      >>> import numpy as np
      >>> from gifjax.experiments.tasks.common import classifier_rows
      >>> params = {"Dense_0": {"kernel": np.zeros((3, 4)), "bias": np.zeros(4)}}
      >>> mask = {"Dense_0": {"kernel": np.eye(3, 4, 2, bool), "bias": np.zeros(4, bool)}}
      >>> classifier_rows(params, mask, target=0)
      ((2, 3), False)
    """
    layers = {k: v for k, v in params.items() if isinstance(v, dict) and "kernel" in v}
    shapes = {(k,): np.zeros(np.shape(v["kernel"])[-1]) for k, v in layers.items()}
    if mask is None:
        units = len(shapes[_selection.classifier_layer(shapes)])
        return tuple(range(units)), (None if target is None else True)
    report = _selection.report({k: mask[k] for k in layers}, shapes, target=target)
    return report.classifier_rows, report.target_row


def rows_text(rows, target_row, target=None) -> str:
    """A table cell for :func:`classifier_rows`: ``"1 (target 0: no)"``, ``"all"`` for every row."""
    text = ", ".join(map(str, rows)) or "none"
    return text if target_row is None else f"{text} ({'' if target is None else f'target {target}: '}" \
        f"{'yes' if target_row else 'no'})"


# ----------------------------------------------------------------------------- the solve


def run_compiled(jitted, *args, **static):
    """Compile ``jitted`` ahead of time for ``args``, then run it: ``(output, compile_s, run_s)``.

    Separates compilation (paid once per shape and static configuration)
    from execution, so per-estimator wall times compare the methods, not
    the compiler.
    """
    t0 = time.perf_counter()
    compiled = jitted.lower(*args, **static).compile()
    t1 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    return out, t1 - t0, time.perf_counter() - t1


@_repr.compact_repr()
class SolveOutput(NamedTuple):
    """What :func:`solve` returns (concrete values)."""

    delta: dict            # Δ, like params
    num_hvps: int
    converged: bool
    failure: str           # name from gifjax.solvers.FAILURES
    residual_norm: float
    compile_s: float       # ahead-of-time compile of this solve
    time_s: float          # its execution (compile excluded)


@functools.partial(jax.jit, static_argnames=("model", "method", "weight_decay"))
def _solve(variables, g, mask, hx, hy, damping, solver, *, model, method, weight_decay):
    loss_fn = _models.make_loss_fn(model, variables, weight_decay=weight_decay)
    out = _influence_fn(loss_fn, variables["params"], g, hx, hy, mask=mask, method=method,
                        solver=solver, damping=damping)
    return out.delta, out.num_hvps, out.converged, out.failure, out.residual_norm


def solve(model, variables, g, hessian_x, hessian_y, config: TaskConfig, *, mask,
          weight_decay: float) -> SolveOutput:
    """Δ = estimator⁻¹ g for ``config.method`` with the task solver (see module docstring).

    The Hessian is that of ``models.make_loss_fn(model, variables,
    weight_decay=weight_decay)`` on ``(hessian_x, hessian_y)``, plus
    ``config.damping``·I; ``mask`` is the element mask (``None`` for ``if``).
    ``time_s`` is the solve alone and ``compile_s`` its compilation.
    """
    args = (variables, g, mask, jnp.asarray(hessian_x), jnp.asarray(hessian_y),
            jnp.float32(config.damping), config.solver)
    (delta, hvps, converged, failure, residual), compile_s, run_s = run_compiled(
        _solve, *args, model=model, method=config.method, weight_decay=float(weight_decay))
    return SolveOutput(delta, int(hvps), bool(converged), _solvers.FAILURES[int(failure)],
                       float(residual), compile_s, run_s)


@functools.partial(jax.jit, static_argnames=("model", "weight_decay", "num_train"))
def removal_grad(variables, x_u, y_u, *, model, weight_decay, num_train):
    """g = m/(n − m)·∇(mean_U ℓ + R) of the training objective (:func:`gifjax.removal_gradient`)."""
    loss_fn = _models.make_loss_fn(model, variables, weight_decay=weight_decay)
    return _removal_gradient(loss_fn, variables["params"], x_u, y_u, num_train=num_train)


@functools.partial(jax.jit, static_argnames=("model", "num_train"))
def relabel_grad(variables, x_u, y_from, y_to, *, model, num_train):
    """g = m/n·[∇ mean_U ℓ(x, y_from) − ∇ mean_U ℓ(x, y_to)] for relabelling U from y_from to y_to.

    Changing the labels of the m examples U of an n-example mean loss from
    ``y_from`` to ``y_to`` changes the objective by (m/n)(mean_U ℓ(y_to) −
    mean_U ℓ(y_from)); the Newton step is then H⁻¹ g with this g (the
    regulariser cancels), the same sign convention as removal: Δ = H⁻¹ g.
    """
    loss_fn = _models.make_loss_fn(model, variables, weight_decay=0.0)
    grad = jax.grad(lambda p: loss_fn(p, x_u, y_from) - loss_fn(p, x_u, y_to))(variables["params"])
    m = x_u.shape[0]
    return jax.tree_util.tree_map(lambda a: a * (m / num_train), grad)


# ----------------------------------------------------------------------------- the step grid


class _ClassPredictions(NamedTuple):
    """``argmax`` of the eval-mode logits of ``model`` at ``params``: the function stepped along.

    A value-hashable callable (equal for equal models), so
    :func:`gifjax.stepping.along` compiles once per model and batch shape and
    every later call, with any direction and grid, reuses that program.
    ``rest`` holds the other variable collections (BatchNorm's
    ``batch_stats``), passed as data: BatchNorm runs in eval mode.
    """

    model: Any

    def __call__(self, params, rest, x):
        return jnp.argmax(self.model.apply({"params": params, **rest}, x, train=False), -1)


def predictions_along(model, variables, direction, steps, x, *, batch_size: int = 512) -> np.ndarray:
    """Predicted classes at θ + s·d for every s in ``steps``: int array [len(steps), len(x)].

    :func:`gifjax.stepping.along` per input batch: one jitted program
    evaluates every step (``lax.map`` over steps); inputs go in fixed-size
    batches (the last padded), so one compile serves any number of inputs,
    directions and grids of one length. BatchNorm models run in eval mode.

    Example:
      >>> import numpy as np, jax
      >>> from gifjax.experiments import models
      >>> from gifjax.experiments.tasks import predictions_along
      >>> m = models.create("mlp", 3); v = models.init(m, np.ones((1, 4)))
      >>> d = jax.tree_util.tree_map(np.zeros_like, v["params"])
      >>> predictions_along(m, v, d, np.array([0.0, 1.0]), np.ones((5, 4), np.float32)).shape
      (2, 5)
    """
    params, rest = _models.split_variables(variables)
    steps = jnp.asarray(steps, jnp.float32)
    predict = _ClassPredictions(model)
    out = [_stepping.along(predict, params, direction, steps, rest, batch)
           for batch in _train.fixed_batches(x, batch_size)]
    return np.concatenate([np.asarray(o) for o in out], axis=1)[:, :len(x)]


def timed(fn, *args, **kwargs):
    """``(fn(*args, **kwargs), seconds)`` with the result blocked until ready."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    return out, time.perf_counter() - t0


def mean_std(values) -> tuple:
    """(mean, sample std) of a list of numbers; std 0 for one value."""
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def compare_estimators(net, variables, methods, config, splits, *, make_mask, run, say):
    """Run ``run(config_for_method, mask)`` for each method with one shared mask.

    The mask (``make_mask(config)[0]``, skipped when only IF runs) is built once
    and timed as ``selection_s``; the step-grid evaluation is compiled on
    ``splits`` first so no estimator's time includes that compile.
    Returns ``(runs, selection_s)``.
    """
    t0 = time.perf_counter()
    mask = None
    if any(m != "if" for m in methods):
        mask = make_mask(dataclasses.replace(config, method="gif"))[0]
    selection_s = time.perf_counter() - t0
    zero = _stepping.unit_direction(jax.tree_util.tree_map(jnp.zeros_like, variables["params"]))[0]
    for split in splits:
        predictions_along(net, variables, zero, config.grid(), split.x)
    runs = []
    for method in methods:
        say(f"running {method.upper()} ...")
        runs.append(run(dataclasses.replace(config, method=method), mask))
    return tuple(runs), selection_s
