r"""Parameter selection: unit scores from a model, and selection rules that make element masks.

GIF's accuracy depends on which parameters θ_t it may change (Lyu et al. 2024,
§4): the units with the highest activation or output-gradient statistics on
the examined data U beat random choices, and ~5 % of the parameters chosen
this way can beat updating all of them. This module

1. scores the *units* of every eligible layer on U, in one jitted forward (and
   backward) pass, for Flax linen and nnx models, without changing their code:

   * :func:`activation_scores`: s_j = \| mean over batch (and spatial axes) of y_j \|,
   * :func:`gradient_scores`:   s_j = \| mean over batch (and spatial axes) of ∂loss(U)/∂y_j \|,

   with y the layer's output before any activation function (Flax applies
   activations outside the layer, so y is the layer's return value);
   :func:`unit_scores` does the same reduction on outputs captured any other way;
2. turns scores into an element mask with :func:`select`, and describes one
   with :func:`report`.

**Units.** A unit is one output neuron of ``Dense``/``DenseGeneral`` (nnx
``Linear``/``LinearGeneral``) or one output channel of ``Conv``: the slice of
the kernel along its output axis (the last axis of a Flax kernel) together
with its bias entry; for a Conv kernel (kh, kw, cin, cout), unit j is
``kernel[..., j]`` and ``bias[j]``. ``DenseGeneral`` with several feature
axes has one unit per *flattened* output feature (the kernel's trailing
feature axes). Biasless layers: a unit is its kernel slice alone. A layer's
*size* is its number of parameters (kernel + bias entries). Only Dense,
DenseGeneral and Conv layers are eligible by default; normalisation layers,
embeddings etc. only through an explicit ``layers=`` filter.

**Layer paths.** Scores map a layer's path in ``params`` to a 1-D array with
one score per unit. A path is the tuple of keys that leads to the layer's own
parameter dict: ``("Dense_0",)`` or ``("Block_0", "Conv_0")`` in linen's
``variables["params"]``; ``("layers", 0)`` in an nnx ``nnx.state(model,
nnx.Param)``. :func:`select` also accepts ``"Block_0/Conv_0"`` strings and
nested dicts ``{"Block_0": {"Conv_0": s}}``, and compares keys as strings.

**Other frameworks.** Keep each layer's arrays in a dict (``{"dense1":
{"kernel": W, "bias": b}}``, units on the kernel's trailing axis), compute
scores yourself (e.g. :func:`unit_scores` of outputs your model returns) and
call :func:`select`.

Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, gifjax.selection as sel
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
    >>> x = jax.random.normal(jax.random.key(0), (16, 5)); y = jnp.arange(16) % 3
    >>> variables = model.init(jax.random.key(1), x)
    >>> xent = lambda logits: -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(16), y])
    >>> scores = sel.gradient_scores(model, variables, x, xent)
    >>> {path: s.shape for path, s in scores.items()}
    {('layers_0',): (8,), ('layers_2',): (3,)}
    >>> mask = sel.select(variables["params"], scores, 0.25, key=jax.random.key(2))
    >>> [int(m.sum()) for m in jax.tree_util.tree_leaves(mask)]   # bias, kernel per layer
    [2, 10, 0, 6]
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _checks, _repr

RULES = ("highest", "lowest", "exclusive", "random", "threshold", "magnitude")
BUDGETS = ("layer", "global")
#: Unit statistics of a layer's outputs y (or output gradients) over the examined data;
#: ``"abs_mean"`` is the paper's rule, the others are ablations of it:
#: ``"abs_mean"`` \|mean y\|, ``"signed_mean"`` mean y, ``"mean_abs"`` mean \|y\|,
#: ``"relu_mean"`` mean max(y, 0) (the post-activation of a ReLU layer).
STATISTICS = ("abs_mean", "signed_mean", "mean_abs", "relu_mean")
#: What :func:`select` does with the classifier layer (the last Dense layer):
#: ``"rule"`` treats it like any other layer (the official code), ``"exclude"``
#: selects none of it, ``"target_row"`` only the target class's row.
CLASSIFIER = ("rule", "exclude", "target_row")
# Rules whose choice of units or entries is random as a whole: a forgotten key
# would silently give every "random baseline" the same draw, so one is required.
KEYED_RULES = ("exclusive", "random", "threshold")


# --------------------------------------------------------------------------- unit scores


def activation_scores(model, variables, inputs, *, layers=None, statistic: str = "abs_mean",
                      **apply_kwargs) -> dict:
    r"""Activation score of every unit: \|mean of the layer's output\| over the examined data.

    s_j = \| mean_{n, spatial} y_{n, …, j} \|, y = the layer's return value
    (pre-activation), for every eligible layer, from one jitted forward pass.
    A layer called several times gets the mean of its per-call means.
    ``statistic`` swaps the reduction for an ablation (:data:`STATISTICS`):
    ``"signed_mean"`` mean y (no \|·\|), ``"mean_abs"`` mean \|y\|,
    ``"relu_mean"`` mean max(y, 0), the post-activation of a ReLU layer.

    Args:
      model: a linen ``nn.Module`` or an nnx ``nnx.Module``; its code is not changed.
      variables: linen: the full ``variables`` dict (with ``"params"``).
        nnx: ``None`` to use the module's own parameters, or a params state
        like ``nnx.state(model, nnx.Param)`` to score at those instead.
      inputs: the examined data, passed as the model's single positional argument.
      layers: eligible layers (static): ``None`` for Dense / DenseGeneral /
        Conv (nnx Linear / LinearGeneral / Conv); a class or tuple of classes;
        or a callable ``(path, module) -> bool``. Only layers that own
        parameters directly (no parameterised submodules) and are called
        through ``__call__`` are scored.
      **apply_kwargs: extra keyword arguments for ``model.apply`` (linen) or
        the nnx call, e.g. ``train=False``; arrays are traced, other values static.
      statistic: the unit statistic, one of :data:`STATISTICS` (static);
        ``"abs_mean"`` (default) is the paper's rule.

    Returns:
      dict mapping each scored layer's path (a tuple of keys into the params,
      see the module docstring) to a 1-D float array with one score per unit,
      in the params' order.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, gifjax.selection as sel
      >>> model = nn.Dense(2)
      >>> variables = {"params": {"kernel": jnp.array([[1.0, -2.0]]), "bias": jnp.zeros(2)}}
      >>> sel.activation_scores(model, variables, jnp.array([[1.0], [3.0]]))
      {(): Array([2., 4.], dtype=float32)}
      >>> sel.activation_scores(model, variables, jnp.array([[1.0], [3.0]]), statistic="relu_mean")
      {(): Array([2., 0.], dtype=float32)}
    """
    return _model_scores("selection.activation_scores", "activation", model, variables, inputs,
                         None, layers, apply_kwargs, statistic)


def gradient_scores(model, variables, inputs, loss_fn: Callable, *, layers=None,
                    statistic: str = "abs_mean", **apply_kwargs) -> dict:
    r"""Output-gradient score of every unit: \|mean of ∂loss/∂(layer output)\|.

    s_j = \| mean_{n, spatial} ∂loss_fn(model(inputs)) / ∂y_{n, …, j} \|, from one
    jitted forward and backward pass: zero perturbations are added to every
    eligible layer's output and the loss is differentiated with respect to
    them. A layer called several times gets the mean over its calls.

    Args:
      model, variables, inputs, layers, \*\*apply_kwargs: as in :func:`activation_scores`.
      statistic: ``"abs_mean"`` (default, the paper's), ``"signed_mean"`` or
        ``"mean_abs"`` of the output gradients (static; ``"relu_mean"`` is for
        activations only).
      loss_fn: ``loss_fn(outputs) -> scalar``, outputs being what the model
        returns (static; reuse one function object so the compiled pass is
        reused). Close over labels, e.g. the mean cross-entropy of U.

    Returns:
      dict from layer path to a 1-D array of unit scores, as in :func:`activation_scores`.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, gifjax.selection as sel
      >>> model = nn.Dense(2)
      >>> variables = {"params": {"kernel": jnp.array([[1.0, -2.0]]), "bias": jnp.zeros(2)}}
      >>> sel.gradient_scores(model, variables, jnp.array([[1.0], [3.0]]), lambda y: jnp.sum(y ** 2))
      {(): Array([4., 8.], dtype=float32)}
    """
    if not callable(loss_fn):
        raise _checks.error("selection.gradient_scores", "loss_fn", type(loss_fn).__name__,
                            "a callable loss_fn(outputs) -> scalar",
                            "pass e.g. lambda logits: jnp.mean("
                            "optax.softmax_cross_entropy_with_integer_labels(logits, y)).",
                            kind=TypeError)
    if statistic == "relu_mean":
        raise _checks.error("selection.gradient_scores", "statistic", repr(statistic),
                            "'abs_mean', 'signed_mean' or 'mean_abs' for output gradients",
                            "use relu_mean with activation_scores (it is a post-activation statistic).")
    return _model_scores("selection.gradient_scores", "gradient", model, variables, inputs,
                         loss_fn, layers, apply_kwargs, statistic)


def unit_scores(outputs: Mapping, *, unit_ndim: int = 1, statistic: str = "abs_mean") -> dict:
    r"""Unit scores from layer outputs (or output gradients) you captured yourself.

    s_j = \| mean over all but the last ``unit_ndim`` axes of y_{…, j} \|, the
    unit axes flattened. This is the reduction :func:`activation_scores` and
    :func:`gradient_scores` apply; use it for models outside Flax.

    Args:
      outputs: mapping from layer path to that layer's output (or the
        gradient of the loss with respect to it) on the examined data.
      unit_ndim: number of trailing axes that index units (static).
      statistic: one of :data:`STATISTICS` (default ``"abs_mean"``, the formula above).

    Returns:
      dict with the same keys and 1-D score arrays.

    Example:
      >>> import jax.numpy as jnp, gifjax.selection as sel
      >>> sel.unit_scores({"dense1": jnp.array([[1.0, -2.0], [3.0, 0.0]])})
      {'dense1': Array([2., 1.], dtype=float32)}
      >>> sel.unit_scores({"dense1": jnp.array([[1.0, -2.0], [3.0, 0.0]])}, statistic="signed_mean")
      {'dense1': Array([ 2., -1.], dtype=float32)}
    """
    from . import _capture  # imports flax; deferred so that `import gifjax` stays light

    fn = "selection.unit_scores"
    _checks.check_choice(fn, "statistic", statistic, STATISTICS)
    if not isinstance(outputs, Mapping) or not outputs:
        raise _checks.error(fn, "outputs", type(outputs).__name__, "a non-empty mapping path -> array",
                            "pass e.g. {'dense1': hidden_pre_activation}.", kind=TypeError)
    scores = {}
    for path, y in outputs.items():
        y = jnp.asarray(y)
        if y.ndim < unit_ndim:
            raise _checks.error(fn, "outputs", f"shape {y.shape} for {path!r}",
                                f"at least unit_ndim={unit_ndim} axes",
                                "pass the layer's output with its unit axes last.")
        stat = _capture.statistic(y, unit_ndim, statistic)
        scores[path] = jnp.abs(stat) if _capture.STATISTICS[statistic][1] else stat
    return scores


def _model_scores(fn, kind, model, variables, inputs, loss_fn, layers, apply_kwargs,
                  statistic="abs_mean") -> dict:
    from . import _capture  # imports flax; deferred so that `import gifjax` stays light

    _checks.check_choice(fn, "statistic", statistic, STATISTICS)
    framework = _capture.framework(model)
    if framework is None:
        raise _checks.error(fn, "model", type(model).__name__, "a flax.linen.Module or flax.nnx.Module",
                            "for other models compute per-layer scores yourself (e.g. with "
                            "gifjax.selection.unit_scores) and pass them to gifjax.selection.select.",
                            kind=TypeError)
    if framework == "linen":
        if not isinstance(variables, Mapping) or "params" not in variables:
            got = f"keys {list(variables)}" if isinstance(variables, Mapping) else type(variables).__name__
            raise _checks.error(fn, "variables", got, "the variables dict of a linen model, with 'params'",
                                "pass the output of model.init(...) (or {'params': params}).")
        params, state = variables["params"], variables
        spec = _capture.Linen(model, _layer_filter(fn, layers, _capture.LAYER_TYPES["linen"]))
    else:
        graphdef, params, rest = _capture.nnx_split(model)
        if variables is not None:
            _checks.check_like(fn, "variables", variables, params, ref_name="nnx.state(model, nnx.Param)")
            params = variables
        state = (params, rest)
        spec = _capture.Nnx(graphdef, _layer_filter(fn, layers, _capture.LAYER_TYPES["nnx"]))

    static, dynamic = _split_kwargs(fn, apply_kwargs)
    found = list(_leaf_layers(params).values())
    keys = tuple(tuple(map(str, layer.path)) for layer in found)
    stats = _capture.layer_stats(spec, kind, loss_fn, keys, static, state, inputs, dynamic, statistic)
    if not stats:
        if layers is None:
            names = ", ".join(t.__name__ for t in _capture.LAYER_TYPES[framework])
            raise _checks.error(fn, "model", f"a {type(model).__name__} that calls no {names} layer",
                                "a model with at least one eligible layer",
                                "pass layers=(...) or a callable (path, module) -> bool to make other "
                                "layer types eligible, or score the layers yourself and call select.")
        raise _checks.error(fn, "layers", repr(layers),
                            "a filter matching at least one layer the model calls",
                            "match layer classes the model uses (e.g. layers=(nn.Dense, nn.Conv)); "
                            "only layers that own parameters directly are eligible.")
    return {found[i].path: s for i, s in sorted(stats.items())}


class _TypeFilter(NamedTuple):
    """``(path, module) -> bool`` by ``isinstance``; hashable by value, so the compiled pass is reused."""

    types: tuple

    def __call__(self, path, module) -> bool:
        return isinstance(module, self.types)


def _layer_filter(fn, layers, default):
    if layers is None:
        return _TypeFilter(default)
    if isinstance(layers, type):
        layers = (layers,)
    if isinstance(layers, tuple) and layers and all(isinstance(t, type) for t in layers):
        return _TypeFilter(layers)
    if callable(layers):
        return layers
    raise _checks.error(fn, "layers", repr(layers),
                        "None, a layer class, a tuple of classes, or a callable (path, module) -> bool",
                        "pass e.g. layers=(nn.Dense, nn.Conv, nn.LayerNorm).", kind=TypeError)


def _split_kwargs(fn, kwargs):
    """(static, dynamic): array-valued keyword arguments are traced, the rest compile in."""
    is_arrays = lambda v: bool(jax.tree_util.tree_leaves(v)) and all(
        isinstance(leaf, (jax.Array, np.ndarray)) for leaf in jax.tree_util.tree_leaves(v))
    dynamic = {k: v for k, v in kwargs.items() if is_arrays(v)}
    static = tuple(sorted((k, v) for k, v in kwargs.items() if k not in dynamic))
    try:
        hash(static)
    except TypeError:
        raise _checks.error(fn, "apply_kwargs", dict(static),
                            "arrays or hashable values (bools, strings, tuples)",
                            "pass lists as tuples (e.g. mutable=('batch_stats',)).", kind=TypeError) from None
    return static, dynamic


# --------------------------------------------------------------------------- layers of a params tree


class _Layer(NamedTuple):
    path: tuple      # the keys as they appear in params, e.g. ("Block_0", "Dense_0") or ("layers", 0)
    leaves: tuple    # positions of the layer's arrays among params' leaves
    names: tuple     # each array's name inside the layer: "kernel", "bias", …


def _key(entry):
    """Plain key of a jax key-path entry (dict key, attribute name or sequence index)."""
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return str(entry)


def _leaf_layers(params) -> dict:
    """Every *leaf layer* of ``params`` — a dict of arrays with no nested dict, i.e. a module
    owning parameters and no parameterised submodule — keyed by its path as strings."""
    groups = {}
    for i, (key_path, _) in enumerate(jax.tree_util.tree_flatten_with_path(params)[0]):
        keys = tuple(_key(k) for k in key_path)
        if key_path and isinstance(key_path[-1], jax.tree_util.GetAttrKey) and keys[-1] == "value":
            keys = keys[:-1]  # an nnx Variable holds its array in `.value`
        if keys:
            groups.setdefault(keys[:-1], []).append((i, str(keys[-1])))
    inner = {path[:j] for path in groups for j in range(len(path))}
    return {tuple(map(str, path)): _Layer(path, tuple(i for i, _ in g), tuple(n for _, n in g))
            for path, g in groups.items() if path not in inner}


class _Scored(NamedTuple):
    layer: _Layer
    rows: tuple            # per array of the layer: entries per unit
    scores: np.ndarray     # float64, one per unit

    @property
    def unit_size(self) -> int:
        return sum(self.rows)


def _scored_layers(fn, params, scores) -> list:
    """Validated scores joined with their layers' unit geometry, in params order."""
    if not isinstance(scores, Mapping) or not scores:
        raise _checks.error(fn, "scores", type(scores).__name__,
                            "a non-empty mapping layer path -> unit scores",
                            "pass the dict returned by activation_scores / gradient_scores.", kind=TypeError)
    layers = _leaf_layers(params)
    shapes = [np.shape(leaf) for leaf in jax.tree_util.tree_leaves(params)]
    found = {}
    for key, (path, s) in _flatten_scores(scores).items():
        layer = layers.get(key)
        if layer is None:
            known = ", ".join(repr(layer.path) for layer in layers.values())
            hint = (" Pass variables['params'], not variables." if ("params",) + key in layers else "")
            raise _checks.error(fn, "scores", f"a score entry for layer {path!r}",
                                f"paths of layers in params, here: {known or 'none'}",
                                "key scores by the tuple of keys leading to a layer's kernel/bias "
                                "dict." + hint)
        s = np.asarray(s, np.float64)
        if s.ndim != 1 or s.size == 0:
            raise _checks.error(fn, "scores", f"shape {s.shape} for layer {path!r}",
                                "a 1-D array, one score per unit",
                                "pass the layer's unit scores as a vector (flatten multi-axis features).")
        if not np.all(np.isfinite(s)):
            raise _checks.error(fn, "scores", f"non-finite values for layer {path!r}", "finite scores",
                                "check the model output and loss on the examined data for NaN/inf.")
        found[layer.leaves[0]] = _Scored(layer, _rows(fn, path, layer, shapes, s.size), s)
    return [found[i] for i in sorted(found)]


def _flatten_scores(scores, prefix=()) -> dict:
    """{path as strings: (path, scores)}; keys may be tuples, "a/b" strings or nested dicts."""
    flat = {}
    for k, v in scores.items():
        if isinstance(k, tuple):
            path = prefix + k
        else:
            path = prefix + (tuple(k.split("/")) if isinstance(k, str) else (k,))
        if isinstance(v, Mapping):
            flat.update(_flatten_scores(v, path))
        else:
            flat[tuple(map(str, path))] = (path, v)
    return flat


def _rows(fn, path, layer, shapes, units) -> tuple:
    """Entries per unit of each of the layer's arrays, whose trailing axes hold the units."""
    rows = []
    for i in layer.leaves:
        shape = shapes[i]
        k = next((k for k in range(1, len(shape) + 1) if math.prod(shape[-k:]) == units), None)
        if k is None:
            arrays = ", ".join(f"`{n}` {shapes[j]}" for n, j in zip(layer.names, layer.leaves))
            raise _checks.error(fn, "scores", f"{units} scores for layer {path!r}",
                                f"one score per unit, i.e. as many as the trailing axes of each of "
                                f"{arrays} hold",
                                "score each output neuron/channel once (the kernel's last axis).")
        rows.append(math.prod(shape[:-k]))
    return tuple(rows)


# --------------------------------------------------------------------------- selection


def select(params, scores, ratio: float, *, rule: str = "highest", key=None, budget: str | None = None,
           threshold: float = 1.0, threshold_step: float = 0.01, classifier: str = "rule",
           target: int | None = None, classifier_layer=None):
    r"""Element mask of target parameters θ_t from unit scores and a selection rule.

    **Budget.** With ``budget="layer"`` (default) every scored layer ℓ
    contributes exactly c_ℓ = floor(ratio · size_ℓ) parameters, size_ℓ =
    kernel + bias entries (the paper's rule); with ``budget="global"`` the
    scored layers together contribute floor(ratio · Σ_ℓ size_ℓ), ranked
    across layers. Unscored layers (norms, embeddings, …) stay all-False.

    **Units → entries.** Units are taken whole (kernel slice and bias entry)
    in the rule's order while they fit in the budget; the remainder
    r = c − Σ(whole units' sizes) is r entries drawn uniformly at random from
    the kernel slice of the next unit in order. That partial unit's bias entry
    stays unselected (the paper's code does the same; the bias then moves only
    with a whole unit).

    =============  ================================================================
    rule           order of units (s = unit scores)
    =============  ================================================================
    ``highest``    decreasing s (ties: lower index first)
    ``lowest``     increasing s — exactly ``highest`` applied to −s
    ``exclusive``  random among the units outside the k units ``highest`` takes
                   whole (k = its number of whole units); needs ratio ≤ 0.5
    ``threshold``  random among units with s > τ, τ lowered from ``threshold``
                   by ``threshold_step`` until those units hold ≥ c parameters
    ``random``     no units: c entries uniformly at random (element level)
    ``magnitude``  no units: ``scores`` is a pytree like ``params`` (e.g.
                   gradients) and the floor(ratio · size(params)) entries with the
                   largest \|score\| are selected, over all parameters (global)
    =============  ================================================================

    **The classifier layer** (the last Dense layer, see :func:`classifier_layer`;
    its units are the logit rows) is handled by ``classifier``, for every rule:

    ================  ===============================================================
    ``"rule"``        like any other layer (the official code; default)
    ``"exclude"``     none of it; its budget is **dropped**, not given to the other
                      layers, so the hidden layers' masks equal those of ``"rule"``
                      and the two masks differ only in the classifier
    ``"target_row"``  only unit ``target`` (the removed / backdoor class's row):
                      min(c_ℓ, unit size) of its entries, c_ℓ = floor(ratio · size_ℓ)
                      the classifier's own budget — the whole row with its bias
                      when c_ℓ covers it, else c_ℓ random entries of its kernel slice
    ================  ===============================================================

    With ``budget="global"`` the classifier leaves the shared ranking under
    ``"exclude"`` and ``"target_row"`` (the latter then gets its own c_ℓ).
    At small ratios the classifier's budget is less than one logit row, so
    under ``"rule"`` it all lands in the one row with the top score, which need
    not be the target's (:func:`report` says which rows a mask touches).

    **Randomness** comes from ``key`` only: the same key gives the same mask.
    ``exclusive``, ``random`` and ``threshold`` need a key; ``highest`` and
    ``lowest`` use ``jax.random.key(0)`` when none is given (it only picks the
    partial unit's entries); ``magnitude`` draws nothing. Draws use NumPy's generator
    seeded with the key's bits and the layer's position, so this function
    runs eagerly (scores must be concrete); the returned mask is an ordinary
    traceable array pytree.

    Args:
      params: parameter pytree (linen ``variables["params"]``, an nnx params
        state, or nested dicts); only shapes and structure are read.
      scores: mapping layer path → 1-D unit scores (see the module docstring
        for paths), e.g. from :func:`activation_scores`; for ``magnitude`` a
        pytree like ``params``. Ignored apart from naming the layers for ``random``.
      ratio: fraction of parameters in (0, 1] (Python float).
      rule: one of :data:`RULES`.
      key: ``jax.random.key`` (or legacy uint32 key).
      budget: ``"layer"`` or ``"global"``; ``None`` means ``"layer"`` (``"global"`` for ``magnitude``).
      threshold, threshold_step: τ's start and decrement for ``rule="threshold"``.
      classifier: one of :data:`CLASSIFIER` (not for ``magnitude``).
      target: the class whose row ``classifier="target_row"`` selects (an int
        in [0, units of the classifier layer)).
      classifier_layer: the classifier's path in ``scores`` (a tuple or
        ``"a/b"`` string); ``None``: :func:`classifier_layer` of ``scores``.

    Returns:
      boolean mask with exactly ``params``' structure and shapes. It is
      all-False when floor(ratio · size) is 0 everywhere (a tiny ratio on
      small layers); :func:`gifjax.influence` rejects such a mask.

    Example:
      >>> import jax, jax.numpy as jnp, gifjax.selection as sel
      >>> params = {"dense": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros(4)}}
      >>> scores = {("dense",): jnp.array([0.1, 0.9, 0.5, 0.2])}
      >>> mask = sel.select(params, scores, 0.5)  # floor(0.5 · 16) = 8 = units 1 and 2, whole
      >>> mask["dense"]["bias"]
      Array([False,  True,  True, False], dtype=bool)
      >>> row = sel.select(params, scores, 0.5, classifier="target_row", target=3)  # 8 ≥ a row's 4
      >>> row["dense"]["bias"], row["dense"]["kernel"][:, 3]
      (Array([False, False, False,  True], dtype=bool), Array([ True,  True,  True], dtype=bool))

    Warning:
      Scores from different layers live on different scales; ``budget="global"``
      ranks them against each other as they are.
    """
    fn = "selection.select"
    ratio = _check_ratio(fn, ratio, rule)
    _checks.check_choice(fn, "rule", rule, RULES)
    budget = _check_budget(fn, budget, rule)
    words = _key_words(fn, key, rule)
    if rule == "threshold" and not (np.isfinite(threshold) and np.isfinite(threshold_step)
                                    and threshold_step > 0):
        raise _checks.error(fn, "threshold/threshold_step", f"{threshold}/{threshold_step}",
                            "a finite threshold and a step > 0",
                            "pass e.g. threshold=1.0, threshold_step=0.01.")
    _checks.check_choice(fn, "classifier", classifier, CLASSIFIER)
    if rule == "magnitude" and classifier != "rule":
        raise _checks.error(fn, "classifier", repr(classifier), "'rule' for rule='magnitude'",
                            "magnitude ranks entries, not units; use a unit rule (e.g. 'highest') "
                            "to control the classifier layer.")
    if classifier != "target_row" and target is not None:
        raise _checks.error(fn, "target", repr(target), f"None for classifier={classifier!r}",
                            "pass classifier='target_row' with target, or drop target.")
    leaves, treedef = jax.tree_util.tree_flatten(params)
    masks = [np.zeros(np.shape(leaf), bool) for leaf in leaves]

    if rule == "magnitude":
        _checks.check_like(fn, "scores", scores, params)
        magnitude = np.concatenate([np.abs(np.asarray(s, np.float64)).ravel()
                                    for s in jax.tree_util.tree_leaves(scores)])
        if not np.all(np.isfinite(magnitude)):
            raise _checks.error(fn, "scores", "non-finite values", "finite scores",
                                "check the loss and gradients for NaN/inf.")
        chosen = np.zeros(magnitude.size, bool)
        chosen[np.argsort(-magnitude, kind="stable")[:math.floor(ratio * magnitude.size)]] = True
        _unflatten_into(masks, chosen)
    else:
        scored = _scored_layers(fn, params, scores)
        head = None
        if classifier != "rule":
            path = _find_classifier(fn, scored, classifier_layer)
            head = next(s for s in scored if s.layer.path == path)
            scored = [s for s in scored if s is not head]
        for group in ([[s] for s in scored] if budget == "layer" else [scored] if scored else []):
            count = math.floor(ratio * sum(s.unit_size * s.scores.size for s in group))
            rng = np.random.default_rng([*words, group[0].layer.leaves[0]])
            _select_group(group, masks, count, rule, rng, threshold, threshold_step)
        if classifier == "target_row":
            units = head.scores.size
            if (not isinstance(target, (int, np.integer)) or isinstance(target, bool)
                    or not 0 <= target < units):
                raise _checks.error(fn, "target", repr(target),
                                    f"an int in [0, {units}) (a unit of the classifier layer "
                                    f"{'/'.join(map(str, head.layer.path))})",
                                    "pass the removed / backdoor class, e.g. target=0.")
            count = min(math.floor(ratio * head.unit_size * units), head.unit_size)
            rng = np.random.default_rng([*words, head.layer.leaves[0]])
            _select_group([head], masks, count, rule, rng, threshold, threshold_step,
                          order=np.array([int(target)]))

    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(m) for m in masks])


def _select_group(group, masks, count, rule, rng, threshold, step, order=None):
    """Set ``count`` entries of the group's layers in ``masks`` (params' leaves) by ``rule``
    (or in the given ``order`` of units, whatever the rule)."""
    if rule == "random" and order is None:
        arrays = [masks[i] for s in group for i in s.layer.leaves]
        chosen = np.zeros(sum(m.size for m in arrays), bool)
        chosen[rng.choice(chosen.size, count, replace=False)] = True
        _unflatten_into(arrays, chosen)
        return
    # Views of each layer's arrays with units on the last axis: (entries per unit, units).
    views = [[masks[i].reshape(r, s.scores.size) for i, r in zip(s.layer.leaves, s.rows)] for s in group]
    names = [s.layer.names for s in group]
    layer_of = np.concatenate([np.full(s.scores.size, g) for g, s in enumerate(group)])
    column = np.concatenate([np.arange(s.scores.size) for s in group])
    size = np.concatenate([np.full(s.scores.size, s.unit_size) for s in group])
    if order is None:
        order = _order(rule, np.concatenate([s.scores for s in group]), size, count, rng, threshold, step)
    whole, partial, rest = _fill(order, size, count)
    for g, layer_views in enumerate(views):
        for v in layer_views:
            v[:, column[whole[layer_of[whole] == g]]] = True
    if rest:
        g, j = layer_of[partial], column[partial]
        slots = [(v, r) for v, name in zip(views[g], names[g]) if name != "bias" for r in range(v.shape[0])]
        if len(slots) < rest:  # only for exotic layers whose biases outnumber a unit's other entries
            slots = [(v, r) for v in views[g] for r in range(v.shape[0])]
        for t in rng.choice(len(slots), rest, replace=False):
            v, r = slots[t]
            v[r, j] = True


def _order(rule, s, size, count, rng, threshold, step):
    """Units in the order ``rule`` takes them."""
    if rule == "lowest":
        return np.argsort(s, kind="stable")
    rank = np.argsort(-s, kind="stable")
    if rule == "highest":
        return rank
    if rule == "exclusive":
        top = len(_fill(rank, size, count)[0])
        return rng.permutation(rank[top:])
    # threshold: the fewest lowerings of τ that admit the last unit a `highest` budget needs.
    needed = s[rank[np.searchsorted(np.cumsum(size[rank]), count)]]
    tau = threshold - max(0, math.floor((threshold - needed) / step) + 1) * step
    while size[s > tau].sum() < count:  # guards float rounding in the line above
        tau -= step
    return rng.permutation(np.flatnonzero(s > tau))


def _fill(order, size, count):
    """(units taken whole, the unit receiving the remainder or None, the remainder)."""
    cumulative = np.cumsum(size[order])
    k = int(np.searchsorted(cumulative, count, side="right"))
    rest = count - (int(cumulative[k - 1]) if k else 0)
    return order[:k], (order[k] if rest else None), rest


def _unflatten_into(masks, chosen):
    """Write the flat boolean vector ``chosen`` into ``masks``, one array after another."""
    offsets = np.cumsum([0] + [m.size for m in masks])
    for m, a, b in zip(masks, offsets[:-1], offsets[1:]):
        m.reshape(-1)[:] = chosen[a:b]


def _check_ratio(fn, ratio, rule) -> float:
    try:
        value = None if isinstance(ratio, (str, bytes, bool)) else float(ratio)
    except Exception:  # noqa: BLE001 — tracers and other non-numbers alike
        value = None
    if value is None or not 0 < value <= 1:
        raise _checks.error(fn, "ratio", repr(ratio), "a Python float in (0, 1]",
                            "pass e.g. ratio=0.05 to select 5 % of each layer's parameters.")
    if rule == "exclusive" and value > 0.5:
        raise _checks.error(fn, "ratio", value, "ratio <= 0.5 for rule='exclusive'",
                            "exclusive picks outside the top-ranked units, which needs as many units left "
                            "as it selects; lower ratio or use another rule.")
    return value


def _check_budget(fn, budget, rule) -> str:
    if budget is None:
        return "global" if rule == "magnitude" else "layer"
    _checks.check_choice(fn, "budget", budget, BUDGETS)
    if rule == "magnitude" and budget != "global":
        raise _checks.error(fn, "budget", repr(budget), "'global' for rule='magnitude'",
                            "omit budget: magnitude ranks all entries of params together.")
    return budget


def _key_words(fn, key, rule) -> list:
    """The key's bits as ints (to seed NumPy); ``None`` → jax.random.key(0) where allowed."""
    if key is None:
        if rule in KEYED_RULES:
            raise _checks.error(fn, "key", None, f"a jax.random key for rule={rule!r}",
                                "pass key=jax.random.key(seed); the mask is deterministic given the key.")
        key = jax.random.key(0)
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) and key.shape == ():
        return np.asarray(jax.random.key_data(key)).ravel().tolist()
    if dtype == np.uint32 and np.shape(key) == (2,):
        return np.asarray(key).ravel().tolist()
    raise _checks.error(fn, "key", f"{type(key).__name__} {getattr(key, 'shape', '')}",
                        "one key from jax.random.key(seed) (or a legacy uint32[2] PRNGKey)",
                        "pass key=jax.random.key(0); split keys first if you hold a batch of them.",
                        kind=TypeError)


# --------------------------------------------------------------------------- the classifier layer


def _natural(path) -> tuple:
    """Sort key of a layer path comparing embedded numbers as numbers (Dense_10 after Dense_2)."""
    return tuple(tuple(int(t) if i % 2 else t for i, t in enumerate(re.split(r"(\d+)", str(k))))
                 for k in path)


def _find_classifier(fn, scored, classifier_layer) -> tuple:
    if classifier_layer is None:
        return max((s.layer.path for s in scored), key=_natural)
    want = (tuple(classifier_layer.split("/")) if isinstance(classifier_layer, str)
            else tuple(classifier_layer) if isinstance(classifier_layer, (tuple, list)) else (classifier_layer,))
    for s in scored:
        if tuple(map(str, s.layer.path)) == tuple(map(str, want)):
            return s.layer.path
    known = ", ".join(repr(s.layer.path) for s in scored)
    raise _checks.error(fn, "classifier_layer", repr(classifier_layer), f"a scored layer's path: {known}",
                        "pass the path of the last Dense layer as it appears in scores, or None.")


def classifier_layer(scores: Mapping):
    """The path of the classifier layer among scored layers: the last one in natural order.

    Paths are compared key by key with embedded numbers compared as numbers,
    so ``Dense_10`` comes after ``Dense_2`` and, in Flax's automatic names,
    ``Dense_*`` after ``Conv_*``: for the usual conv/dense stacks whose last
    Dense layer produces the logits this is that layer. Pass an explicit
    ``classifier_layer=`` to :func:`select` / :func:`report` where it is not.

    Args:
      scores: mapping layer path → unit scores (e.g. from :func:`activation_scores`).

    Returns:
      the path, as a tuple of the keys used in ``scores``.

    Example:
      >>> import jax.numpy as jnp, gifjax.selection as sel
      >>> sel.classifier_layer({("Conv_0",): jnp.ones(4), ("Dense_2",): jnp.ones(5),
      ...                       ("Dense_10",): jnp.ones(3)})
      ('Dense_10',)
    """
    flat = _flatten_scores(scores) if isinstance(scores, Mapping) and scores else None
    if not flat:
        raise _checks.error("selection.classifier_layer", "scores", type(scores).__name__,
                            "a non-empty mapping layer path -> unit scores",
                            "pass the dict returned by activation_scores / gradient_scores.", kind=TypeError)
    return max((path for path, _ in flat.values()), key=_natural)


# --------------------------------------------------------------------------- report


@_repr.compact_repr()
class LayerReport(NamedTuple):
    """What a mask selects in one scored layer."""

    units: int           # units selected whole (kernel slice and bias entry)
    partial_units: int   # units with some, not all, of their entries selected
    parameters: int      # selected entries
    size: int            # the layer's entries (kernel + bias)
    fraction: float      # parameters / size


@_repr.compact_repr()
class Report(NamedTuple):
    """What a mask selects: per scored layer, in total, and in the classifier layer."""

    layers: dict         # layer path → LayerReport
    parameters: int      # selected entries in the whole mask
    size: int            # all entries of the mask
    fraction: float      # parameters / size
    classifier: tuple | None = None   # path of the classifier layer (None without scores)
    classifier_rows: tuple = ()       # its units (logit rows) with at least one selected entry
    target: int | None = None         # the class asked about
    target_row: bool | None = None    # whether the target's row is among classifier_rows

    def rows_text(self) -> str:
        """The classifier rows as a short text, e.g. ``"1, 7 (target 0: no)"``; ``"none"`` when untouched."""
        rows = ", ".join(map(str, self.classifier_rows)) or "none"
        if self.target is None:
            return rows
        return f"{rows} (target {self.target}: {'yes' if self.target_row else 'no'})"

    def table(self) -> str:
        """The report as a plain-text table."""
        lines = [f"{'layer':<32}{'units':>8}{'partial':>9}{'params':>10}{'size':>10}{'fraction':>10}"]
        for path, r in self.layers.items():
            name = "/".join(map(str, path)) or "(root)"
            lines.append(f"{name:<32}{r.units:>8}{r.partial_units:>9}{r.parameters:>10}{r.size:>10}"
                         f"{r.fraction:>10.4f}")
        lines.append(f"{'total':<32}{'':>8}{'':>9}{self.parameters:>10}{self.size:>10}{self.fraction:>10.4f}")
        if self.classifier is not None:
            name = "/".join(map(str, self.classifier)) or "(root)"
            lines.append(f"classifier rows ({name}): {self.rows_text()}")
        return "\n".join(lines)


def report(mask, scores: Mapping | None = None, *, target: int | None = None,
           classifier_layer=None) -> Report:
    """Describe a mask: per scored layer, the units and parameters it selects, and its classifier rows.

    The classifier layer (:func:`classifier_layer` of ``scores``, or the
    path given) has one unit per class, so its units touched by the mask —
    ``classifier_rows``, those with at least one selected entry — say which
    classes' logits the update can move directly; ``target_row`` says whether
    ``target``'s row (the removed / backdoor class) is among them.

    Args:
      mask: boolean mask like the params (concrete values).
      scores: the unit scores the layers were ranked by (they name the layers
        and their numbers of units); ``None`` for the totals only.
      target: optional class whose row to look for (needs ``scores``).
      classifier_layer: the classifier's path; ``None``: :func:`classifier_layer`.

    Returns:
      :class:`Report`; ``report(...).table()`` prints it.

    Example:
      >>> import jax.numpy as jnp, gifjax.selection as sel
      >>> params = {"dense": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros(4)}}
      >>> scores = {("dense",): jnp.array([0.1, 0.9, 0.5, 0.2])}
      >>> sel.report(sel.select(params, scores, 0.4), scores).layers  # 6 = unit 1 + 2 entries of unit 2
      {('dense',): LayerReport(units=1, partial_units=1, parameters=6, size=16, fraction=0.375)}
      >>> r = sel.report(sel.select(params, scores, 0.25), scores, target=0)
      >>> r.classifier_rows, r.target_row, r.rows_text()   # 4 entries: all in unit 1
      ((1,), False, '1 (target 0: no)')
    """
    fn = "selection.report"
    leaves = [np.asarray(m, bool) for m in jax.tree_util.tree_leaves(mask)]
    if target is not None and scores is None:
        raise _checks.error(fn, "scores", None, "the unit scores when target is given",
                            "pass the scores the mask was selected with, so the classifier layer is known.")
    layers, touched = {}, {}
    scored = [] if scores is None else _scored_layers(fn, mask, scores)
    for s in scored:
        per_unit = sum(leaves[i].reshape(r, s.scores.size).sum(0) for i, r in zip(s.layer.leaves, s.rows))
        size = s.unit_size * s.scores.size
        touched[s.layer.path] = tuple(int(j) for j in np.flatnonzero(per_unit))
        layers[s.layer.path] = LayerReport(int(np.sum(per_unit == s.unit_size)),
                                           int(np.sum((per_unit > 0) & (per_unit < s.unit_size))),
                                           int(per_unit.sum()), size, float(per_unit.sum() / size))
    selected, total = int(sum(m.sum() for m in leaves)), int(sum(m.size for m in leaves))
    if not scored:
        return Report(layers, selected, total, selected / max(total, 1))
    head = _find_classifier(fn, scored, classifier_layer)
    units = next(s.scores.size for s in scored if s.layer.path == head)
    if target is not None and (not isinstance(target, (int, np.integer)) or isinstance(target, bool)
                               or not 0 <= target < units):
        raise _checks.error(fn, "target", repr(target), f"None or an int in [0, {units})",
                            "pass the removed / backdoor class, e.g. target=0.")
    rows = touched[head]
    return Report(layers, selected, total, selected / max(total, 1), head, rows,
                  None if target is None else int(target), None if target is None else int(target) in rows)


__all__ = ["RULES", "BUDGETS", "KEYED_RULES", "STATISTICS", "CLASSIFIER", "activation_scores",
           "gradient_scores", "unit_scores", "select", "report", "classifier_layer", "Report", "LayerReport"]
