"""Reference Flax linen classifiers and the loss functions influence needs.

Five image classifiers, all NHWC in and logits out, built only from
``flax.linen`` ``Dense`` / ``Conv`` (and ``BatchNorm`` for the two large
ones), so :mod:`gifjax.selection` can find their layers by type:

============ ==============================================================
``mlp``      flatten → Dense+ReLU per hidden size → Dense
``cnn``      two 3×3 convs (32, 64; the second stride 2) → global mean →
             Dense; ~20k parameters, any input size (8×8 digits, 28×28 MNIST)
``tinynet``  the paper's TinyNet: four 3×3 stride-2 convs 32-64-128-256
             with ReLU → flatten → Dense
``vgg11``    CIFAR-style VGG-11 (3×3 conv + BatchNorm + ReLU, max-pooling)
``resnet18`` CIFAR-style ResNet-18 (3×3 stem, no stem pooling, BasicBlocks)
============ ==============================================================

Every model is called as ``model.apply(variables, x, train=...)``; ``train``
only matters for BatchNorm.

BatchNorm and ``batch_stats``
-----------------------------
``vgg11`` and ``resnet18`` keep BatchNorm running statistics in the
``"batch_stats"`` collection. Training (:func:`gifjax.experiments.train.fit`) runs them
with ``train=True`` (batch statistics, running averages updated as a mutable
collection). Influence runs them with ``train=False`` (running averages): the
loss is then a function of the parameters alone, per example, with no
coupling between examples of a batch, which is what the Hessian H = ∇²L(θ)
and the per-example gradients assume. :func:`make_loss_fn` and
:func:`make_example_loss_fn` do this for you: they split ``variables`` into
``params`` (differentiated) and everything else (closed over, constant).

Loss conventions
----------------
``loss_fn(params, x, y) = mean_i CE(f(x_i; θ), y_i) + ½·wd·‖θ‖²`` — the
training objective of :func:`gifjax.experiments.train.fit` with the same ``weight_decay``
(the penalty is on every parameter, biases and BatchNorm scales included), so
a trained θ̂ is a stationary point of exactly the ``loss_fn`` whose Hessian
influence uses. ``example_loss_fn(params, (x, y))`` is the cross-entropy of
one example (no batch axis, no penalty): what
:func:`gifjax.influence_scores` differentiates per example.

Example:
  >>> import jax, jax.numpy as jnp, numpy as np
  >>> from gifjax.experiments import models
  >>> model = models.create("cnn", num_classes=10)
  >>> x = np.zeros((4, 8, 8, 1), np.float32); y = np.arange(4, dtype=np.int32)
  >>> variables = models.init(model, x, seed=0)
  >>> loss_fn = models.make_loss_fn(model, variables, weight_decay=1e-4)
  >>> float(loss_fn(variables["params"], x, y)) > 0
  True
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gifjax import _checks


class MLP(nn.Module):
    """Multi-layer perceptron on flattened inputs: (Dense → ReLU)* → Dense."""

    num_classes: int
    hidden: Sequence[int] = (128,)

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train  # no BatchNorm / dropout
        x = x.reshape((x.shape[0], -1))
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


class CNN(nn.Module):
    """Small CNN: 3×3 conv → ReLU → 3×3 stride-2 conv → ReLU → spatial mean → Dense.

    The global mean makes the parameter count independent of the input size
    (~20k for 1 input channel, 10 classes), so one model serves 8×8 digits and
    28×28 MNIST.
    """

    num_classes: int
    features: Sequence[int] = (32, 64)

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        x = nn.relu(nn.Conv(self.features[0], (3, 3))(x))
        x = nn.relu(nn.Conv(self.features[1], (3, 3), strides=(2, 2))(x))
        return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))


class TinyNet(nn.Module):
    """The paper's TinyNet: four 3×3 stride-2 convs (32, 64, 128, 256) + ReLU → Dense.

    28×28 inputs shrink to 2×2×256 (1,024 features before the linear layer).
    """

    num_classes: int
    features: Sequence[int] = (32, 64, 128, 256)

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        for f in self.features:
            x = nn.relu(nn.Conv(f, (3, 3), strides=(2, 2))(x))
        return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


def _batch_norm(train: bool):
    # PyTorch's defaults (momentum 0.1 ⇔ flax momentum 0.9, eps 1e-5), as in
    # the paper's reference models.
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)


class VGG11(nn.Module):
    """CIFAR-style VGG-11: [64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M] → Dense.

    Each number is a 3×3 conv + BatchNorm + ReLU with that many channels
    (scaled by ``width / 64``); ``M`` is 2×2 max-pooling (``SAME`` padding,
    so inputs smaller than 32×32 still work). The remaining spatial map
    (1×1 for 32×32 inputs) is averaged, then one Dense layer. ~9.2M
    parameters at ``width=64``.
    """

    num_classes: int
    width: int = 64

    @nn.compact
    def __call__(self, x, train: bool = False):
        w = self.width
        cfg = [w, "M", 2 * w, "M", 4 * w, 4 * w, "M", 8 * w, 8 * w, "M", 8 * w, 8 * w, "M"]
        for c in cfg:
            if c == "M":
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
            else:
                x = nn.relu(_batch_norm(train)(nn.Conv(c, (3, 3))(x)))
        return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))


class _BasicBlock(nn.Module):
    features: int
    strides: int

    @nn.compact
    def __call__(self, x, train: bool):
        s = (self.strides, self.strides)
        h = nn.relu(_batch_norm(train)(nn.Conv(self.features, (3, 3), s, use_bias=False)(x)))
        h = _batch_norm(train)(nn.Conv(self.features, (3, 3), use_bias=False)(h))
        if x.shape != h.shape:  # projection shortcut when shape changes
            x = _batch_norm(train)(nn.Conv(self.features, (1, 1), s, use_bias=False)(x))
        return nn.relu(h + x)


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18: 3×3 stem (no pooling), 4 stages × 2 BasicBlocks → mean → Dense.

    Stage widths ``width·(1, 2, 4, 8)`` with strides (1, 2, 2, 2); convs
    without bias (BatchNorm follows each). ~11.2M parameters at ``width=64``.
    """

    num_classes: int
    width: int = 64

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(_batch_norm(train)(nn.Conv(self.width, (3, 3), use_bias=False)(x)))
        for i, mult in enumerate((1, 2, 4, 8)):
            for j in range(2):
                strides = 2 if (i > 0 and j == 0) else 1
                x = _BasicBlock(self.width * mult, strides)(x, train)
        return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))


MODELS = {"mlp": MLP, "cnn": CNN, "tinynet": TinyNet, "vgg11": VGG11, "resnet18": ResNet18}


def create(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build a reference model by name.

    Args:
      name: one of ``"mlp"``, ``"cnn"``, ``"tinynet"``, ``"vgg11"``,
        ``"resnet18"``.
      num_classes: number of output logits (≥ 2).
      **kwargs: the model's own fields: ``hidden`` (mlp), ``features`` (cnn,
        tinynet), ``width`` (vgg11, resnet18; base channel count, 64 by
        default — smaller values make quick CPU runs).

    Returns:
      An unbound ``flax.linen.Module``; call :func:`init` for its variables.

    Example:
      >>> from gifjax.experiments import models
      >>> model = models.create("mlp", 10, hidden=(64, 64))
      >>> model.num_classes, model.hidden
      (10, (64, 64))
    """
    _checks.check_choice("experiments.models.create", "name", name, MODELS)
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise _checks.error("experiments.models.create", "num_classes", repr(num_classes),
                            "an int >= 2", "pass the number of classes, e.g. 10.")
    return MODELS[name](num_classes=int(num_classes), **kwargs)


def init(model: nn.Module, x, *, seed: int = 0) -> dict:
    """Initialise ``model``'s variables for inputs shaped like ``x``.

    Args:
      model: a module from :func:`create` (or any linen module taking
        ``(x, train=...)``).
      x: an example batch, NHWC; only ``x[:1]`` (shape and dtype) is used.
      seed: initialisation seed.

    Returns:
      The variables dict: ``{"params": ...}`` plus ``{"batch_stats": ...}``
      for models with BatchNorm.

    Example:
      >>> import numpy as np
      >>> from gifjax.experiments import models
      >>> v = models.init(models.create("vgg11", 10, width=8), np.zeros((1, 8, 8, 3)), seed=0)
      >>> sorted(v)
      ['batch_stats', 'params']
    """
    if np.ndim(x) < 2:
        raise _checks.error("experiments.models.init", "x", f"shape {np.shape(x)}",
                            "a batch with a leading axis, e.g. (N, H, W, C)",
                            "pass the training inputs (or one batch of them), not one example.")
    return dict(model.init(jax.random.key(seed), jnp.asarray(x[:1]), train=False))


def cross_entropy_loss(logits, labels):
    """Mean softmax cross-entropy of integer ``labels`` under ``logits``.

    Args:
      logits: [N, C] float array.
      labels: [N] int array with values in [0, C).

    Returns:
      A scalar: (1/N) Σ_i −log softmax(logits_i)[labels_i].

    Example:
      >>> import jax.numpy as jnp
      >>> from gifjax.experiments.models import cross_entropy_loss
      >>> round(float(cross_entropy_loss(jnp.zeros((2, 4)), jnp.array([0, 3]))), 4)
      1.3863
    """
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def l2_penalty(params, weight_decay):
    """½·wd·‖θ‖² over every leaf of ``params`` (the L2 term of the training loss)."""
    sq = sum(jnp.sum(jnp.square(p)) for p in jax.tree_util.tree_leaves(params))
    return 0.5 * weight_decay * sq


def split_variables(variables) -> tuple:
    """Split Flax ``variables`` into ``(params, rest)``, ``rest`` the other collections.

    ``rest`` holds e.g. ``batch_stats``; it is what :func:`make_loss_fn`
    closes over as constants.
    """
    if not isinstance(variables, dict) or "params" not in variables:
        raise _checks.error("experiments.models.split_variables", "variables", type(variables).__name__,
                            "a Flax variables dict with a 'params' entry",
                            "pass what models.init / train.fit returned, not variables['params'].")
    rest = {k: v for k, v in variables.items() if k != "params"}
    return variables["params"], rest


def make_loss_fn(model: nn.Module, variables, *, weight_decay: float = 0.0) -> Callable:
    """The training objective as a pure ``loss_fn(params, x, y) -> scalar``.

        loss_fn(θ, x, y) = (1/N) Σ_i CE(f(x_i; θ), y_i) + ½·wd·‖θ‖²

    evaluated in eval mode (``train=False``): BatchNorm uses the running
    averages in ``variables["batch_stats"]``, closed over as constants, so only
    ``params`` is differentiated. This is the ``loss_fn`` the core takes
    (``gifjax.hvp``, ``gifjax.influence``…).

    Args:
      model: the linen module.
      variables: its variables (from :func:`init` or :func:`gifjax.experiments.train.fit`);
        everything except ``"params"`` is frozen into the closure.
      weight_decay: wd ≥ 0; use the value training used so θ̂ is stationary.

    Returns:
      ``loss_fn(params, x, y)``, with ``x`` [N, ...] and ``y`` [N] int.

    Example:
      >>> import numpy as np, gifjax
      >>> from gifjax.experiments import models
      >>> m = models.create("mlp", 3, hidden=(4,))
      >>> x = np.ones((2, 5), np.float32); y = np.array([0, 2])
      >>> v = models.init(m, x)
      >>> f = models.make_loss_fn(m, v, weight_decay=1e-3)
      >>> hv = gifjax.hvp(f, v["params"], v["params"], x, y)
    """
    _checks.check_nonnegative("experiments.models.make_loss_fn", "weight_decay", weight_decay)
    data_loss = _data_loss(model, variables)

    def loss_fn(params, x, y):
        return data_loss(params, x, y) + l2_penalty(params, weight_decay)

    return loss_fn


def make_example_loss_fn(model: nn.Module, variables) -> Callable:
    """Per-example loss ``example_loss_fn(params, (x, y)) -> scalar``, no batch axis.

    The cross-entropy of one example in eval mode (no weight-decay term: the
    penalty belongs to the objective, not to any one example). This is the
    ``example_loss_fn`` of :func:`gifjax.influence_scores`, which vmaps it.

    Args:
      model, variables: as in :func:`make_loss_fn`.

    Returns:
      ``example_loss_fn(params, example)`` with ``example = (x_i, y_i)``,
      ``x_i`` one input (e.g. [H, W, C]) and ``y_i`` an int scalar.

    Example:
      >>> import numpy as np
      >>> from gifjax.experiments import models
      >>> m = models.create("mlp", 3, hidden=(4,)); v = models.init(m, np.ones((1, 5)))
      >>> ex = models.make_example_loss_fn(m, v)
      >>> ex(v["params"], (np.ones(5, np.float32), 1)).shape
      ()
    """
    data_loss = _data_loss(model, variables)

    def example_loss_fn(params, example):
        x, y = example
        return data_loss(params, jnp.asarray(x)[None], jnp.asarray(y)[None])

    return example_loss_fn


def _data_loss(model, variables):
    _, rest = split_variables(variables)

    def data_loss(params, x, y):
        logits = model.apply({"params": params, **rest}, x, train=False)
        return cross_entropy_loss(logits, y)

    return data_loss
