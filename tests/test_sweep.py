"""Streaming, resumable influence sweeps (gifjax.sweep) against the dense score matrix."""

import os
import signal
import subprocess
import sys
import textwrap
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gifjax
from gifjax import sweep

N_TEST = 6
CHUNK = 5  # 24 training examples → 5 chunks, the last one of 4 (padded)


class Problem(NamedTuple):
    loss: callable
    example_loss: callable
    params: dict
    x: jax.Array
    y: jax.Array
    damping: float


def _apply(params, x):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]


def _xent(logits, y):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None], axis=-1)[..., 0]


def make(dtype=jnp.float32):
    """A tiny MLP (4 → 5 → 3, 40 parameters) on 24 examples; the oracle is influence_scores."""
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (24, 4), dtype)
    y = jax.random.randint(k[1], (24,), 0, 3)
    params = {"w1": 0.8 * jax.random.normal(k[2], (4, 5), dtype), "b1": jnp.zeros(5, dtype),
              "w2": 0.8 * jax.random.normal(k[3], (5, 3), dtype)}
    l2 = lambda p: 0.005 * sum(jnp.sum(a ** 2) for a in jax.tree_util.tree_leaves(p))
    loss = lambda p, x, y: jnp.mean(_xent(_apply(p, x), y)) + l2(p)
    example_loss = lambda p, ex: _xent(_apply(p, ex[0][None]), ex[1][None])[0]
    return Problem(loss, example_loss, params, x, y, 0.1)


@pytest.fixture(scope="module")
def prob():
    return make()


def run(prob, train=None, **kw):
    p = prob
    train = (p.x, p.y) if train is None else train
    kw.setdefault("train_chunk_size", CHUNK)
    kw.setdefault("progress", False)
    kw.setdefault("damping", p.damping)
    kw.setdefault("solver", "dense")  # exact and quick to compile on this 45-parameter model
    return sweep.score_stream(p.loss, p.params, p.example_loss, train,
                              (p.x[:N_TEST], p.y[:N_TEST]), p.x, p.y, **kw)


def dense(prob, method="if"):
    p = prob
    return np.asarray(gifjax.influence_scores(  # the oracle: dense solves, whole matrix
        p.loss, p.params, p.example_loss, (p.x, p.y), (p.x[:N_TEST], p.y[:N_TEST]), p.x, p.y,
        method=method, damping=p.damping, solver="dense"))


@pytest.mark.parametrize("method", ["if", "gif"])
def test_stream_equals_dense_matrix(prob, method):
    out = run(prob, method=method, keep_full=True, top_k=3)
    expected = dense(prob, method)
    assert out.scores.shape == expected.shape == (24, N_TEST)
    assert out.num_train == 24
    # GIF's dense solve goes through the SVD of F = H P in float32: either path is within 7e-5 of the
    # largest score from float64 (measured), so two compiled programs agree only to that
    atol = (1e-6 if method == "if" else 2e-4) * np.abs(expected).max()
    np.testing.assert_allclose(out.scores, expected, rtol=1e-5, atol=atol)
    assert np.all(np.asarray(out.solution.converged))


def test_stream_equals_dense_matrix_float64(x64):
    p = make(jnp.float64)
    out = run(p, keep_full=True, train=(p.x[:13], p.y[:13]))  # 13 = 2·5 + 3
    assert out.scores.dtype == np.float64
    expected = dense(p)[:13]
    np.testing.assert_allclose(out.scores, expected, rtol=1e-9, atol=1e-12)


def test_topk_equals_argsort_of_full_matrix(prob):
    k = 7  # larger than a chunk: the merge must carry candidates across chunks
    out = run(prob, keep_full=True, top_k=k)
    full = out.scores
    for j in range(N_TEST):
        top = np.argsort(-full[:, j], kind="stable")[:k]
        bottom = np.argsort(full[:, j], kind="stable")[:k]
        np.testing.assert_array_equal(out.top_indices[j], top)
        np.testing.assert_array_equal(out.bottom_indices[j], bottom)
        np.testing.assert_array_equal(out.top_scores[j], full[top, j])
        np.testing.assert_array_equal(out.bottom_scores[j], full[bottom, j])
    # without keep_full the same top-k, and no matrix
    lean = run(prob, top_k=k)
    assert lean.scores is None
    np.testing.assert_array_equal(lean.top_indices, out.top_indices)
    np.testing.assert_array_equal(lean.bottom_scores, out.bottom_scores)


def test_top_k_larger_than_n_is_clipped(prob):
    out = run(prob, top_k=100, train=(prob.x[:8], prob.y[:8]))
    assert out.top_indices.shape == (N_TEST, 8)
    assert sorted(out.top_indices[0]) == list(range(8))


def test_iterator_input_equals_array_input(prob):
    p = prob
    arr = run(prob, keep_full=True)
    chunks = [(p.x[s:s + CHUNK], p.y[s:s + CHUNK]) for s in range(0, 24, CHUNK)]
    it = run(prob, train=iter(chunks), keep_full=True)  # chunk size from the first chunk

    def gen():  # unknown length; numpy chunks
        yield from ((np.asarray(a), np.asarray(b)) for a, b in chunks)

    g = run(prob, train=gen(), keep_full=True)
    for other in (it, g):
        np.testing.assert_array_equal(other.scores, arr.scores)
        np.testing.assert_array_equal(other.top_indices, arr.top_indices)
        np.testing.assert_array_equal(other.bottom_indices, arr.bottom_indices)
        assert other.num_train == 24


def test_one_compile_whatever_the_number_of_chunks(prob):
    p = prob
    traces = []

    def count(n):
        def counted(params, example):  # a new function per sweep: no compile cache to hit
            traces.append(1)
            return p.example_loss(params, example)

        traces.clear()
        sweep.score_stream(p.loss, p.params, counted, (p.x[:n], p.y[:n]), (p.x[:N_TEST], p.y[:N_TEST]),
                           p.x, p.y, damping=p.damping, train_chunk_size=CHUNK, progress=False,
                           solver="dense")
        return len(traces)

    assert count(7) == count(24)  # 2 chunks vs 5 chunks: same number of traces


def test_resume_after_interruption_is_bit_identical(prob, tmp_path):
    reference = run(prob, keep_full=True, top_k=4)

    def interrupt(i, n):
        assert n == 5
        if i == 2:
            raise KeyboardInterrupt("simulated interruption")

    d = tmp_path / "sweep"
    with pytest.raises(KeyboardInterrupt):
        run(prob, keep_full=True, top_k=4, out_dir=d, callback=interrupt)
    done = sorted(f for f in os.listdir(d) if f.startswith("chunk_"))
    assert done == [f"chunk_{i:06d}.npz" for i in range(3)]
    assert not [f for f in os.listdir(d) if f.startswith(".tmp_")]  # no temp files left
    mtimes = {f: os.stat(d / f).st_mtime_ns for f in done}

    seen = []
    resumed = run(prob, keep_full=True, top_k=4, out_dir=d, callback=lambda i, n: seen.append(i))
    assert resumed.computed_chunks == (3, 4)  # finished chunks were loaded, not recomputed
    assert seen == [0, 1, 2, 3, 4]
    assert {f: os.stat(d / f).st_mtime_ns for f in done} == mtimes
    for field in ("scores", "top_indices", "top_scores", "bottom_indices", "bottom_scores"):
        assert np.array_equal(getattr(resumed, field), getattr(reference, field)), field

    again = run(prob, keep_full=True, top_k=4, out_dir=d)  # all done: nothing to compute
    assert again.computed_chunks == ()
    assert np.array_equal(again.scores, reference.scores)


_KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, sys.argv[2])
    import test_sweep as t

    def die(i, n):  # chunk i is final (written, merged): die now, no cleanup, no finally
        if i == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    t.run(t.make(), keep_full=True, top_k=4, out_dir=sys.argv[1], callback=die)
    sys.exit("not killed")
""")


@pytest.mark.slow  # a fresh process (~15 s); the in-process interruption test covers resume by default
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_resume_after_sigkill_is_bit_identical(prob, tmp_path):
    d = tmp_path / "sweep"
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-c", _KILLED_RUN, str(d), here], env=dict(os.environ),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    # exactly the finished chunks and the manifest: no temporary file survives a kill between
    # chunks, and nothing else could be taken for a chunk
    assert sorted(os.listdir(d)) == [f"chunk_{i:06d}.npz" for i in range(3)] + [sweep.MANIFEST]
    # a writer killed mid-write leaves only a ".tmp_*.part" file; a rerun must ignore it
    (d / ".tmp_killed_mid_write.part").write_bytes(b"PK\x03\x04 truncated")

    resumed = run(prob, keep_full=True, top_k=4, out_dir=d)  # a new process, as after a real kill
    assert resumed.computed_chunks == (3, 4)  # only the missing chunks
    reference = run(prob, keep_full=True, top_k=4)  # uninterrupted, no out_dir
    for field in ("scores", "top_indices", "top_scores", "bottom_indices", "bottom_scores"):
        assert np.array_equal(getattr(resumed, field), getattr(reference, field)), field
    assert sorted(f for f in os.listdir(d) if f.startswith("chunk_")) == [
        f"chunk_{i:06d}.npz" for i in range(5)]


def test_changed_configuration_is_refused(prob, tmp_path):
    run(prob, top_k=4, out_dir=tmp_path)
    for change, pattern in [(dict(method="pif"), "differs in: method"),
                            (dict(top_k=5), "differs in: top_k"),
                            (dict(config_id="data-v2"), "differs in: config_id"),
                            (dict(train_chunk_size=6), "train_chunk_size")]:
        kw = dict(top_k=4)
        kw.update(change)
        with pytest.raises(ValueError, match=r"gifjax\.sweep\.score_stream: bad `out_dir`.*" + pattern):
            run(prob, out_dir=tmp_path, **kw)
    assert run(prob, top_k=4, out_dir=tmp_path).computed_chunks == ()  # the original still resumes


def test_changed_params_are_refused(prob, tmp_path):
    run(prob, out_dir=tmp_path)
    p = prob
    shifted = jax.tree_util.tree_map(lambda a: a + 0.01, p.params)
    with pytest.raises(ValueError, match="params_sha256"):
        sweep.score_stream(p.loss, shifted, p.example_loss, (p.x, p.y), (p.x[:N_TEST], p.y[:N_TEST]),
                           p.x, p.y, damping=p.damping, train_chunk_size=CHUNK, progress=False,
                           solver="dense", out_dir=tmp_path)


def test_progress_bar_on_stderr_and_silenced(prob, capfd):
    pytest.importorskip("tqdm")
    run(prob, train=(prob.x[:10], prob.y[:10]), progress=True)
    err = capfd.readouterr().err
    assert "score_stream" in err and "2/2" in err
    run(prob, train=(prob.x[:10], prob.y[:10]), progress=False)
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


@pytest.mark.parametrize("kw, pattern", [
    (dict(top_k=0), "bad `top_k`: got 0"),
    (dict(train_chunk_size=0), "bad `train_chunk_size`"),
    (dict(method="nope"), "bad `method`"),
    (dict(callback=3), "bad `callback`"),
])
def test_bad_inputs(prob, kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        run(prob, **kw)


def test_bad_stream_inputs(prob):
    p = prob
    with pytest.raises(ValueError, match="empty iterator"):
        run(prob, train=iter([]))
    big = iter([(p.x[:3], p.y[:3]), (p.x[:8], p.y[:8])])
    with pytest.raises(ValueError, match="a chunk of 8 examples"):
        run(prob, train=big, train_chunk_size=None)


# ----------------------------------------------------------------------------- integrity

RESULT_FIELDS = ("scores", "top_indices", "top_scores", "bottom_indices", "bottom_scores")


@pytest.fixture(scope="module")
def clean(prob):
    """An uninterrupted sweep without out_dir: what every repaired directory must reproduce."""
    return run(prob, keep_full=True, top_k=4)


def assert_same(a, b):
    for field in RESULT_FIELDS:
        assert np.array_equal(getattr(a, field), getattr(b, field), equal_nan=True), field


def _rewrite(path, **changes):
    """Rewrite a chunk file's fields (its stored checksum kept: an edit the file cannot vouch for)."""
    with np.load(path) as z:
        fields = {k: z[k] for k in z.files}
    fields.update(changes)
    np.savez(path, **fields)


def test_damaged_chunks_are_recomputed_with_a_warning(prob, clean, tmp_path):
    d = tmp_path / "sweep"
    first = run(prob, keep_full=True, top_k=4, out_dir=d)
    assert_same(first, clean)
    assert first.train_sha256 is not None
    names = [d / f"chunk_{i:06d}.npz" for i in range(5)]
    with np.load(names[0]) as z:
        scores0 = z["scores"]
    _rewrite(names[0], scores=scores0[:-1], count=np.int64(4))               # wrong row count
    with np.load(names[1]) as z:
        edited = z["scores"].copy()
    edited[2, 3] += 1.0
    _rewrite(names[1], scores=edited)                                        # edited values
    names[2].write_bytes(names[2].read_bytes()[:100])                        # truncated
    names[3].write_bytes(os.urandom(300))                                    # garbage
    before4 = names[4].read_bytes()

    with pytest.warns(RuntimeWarning) as record:
        again = run(prob, keep_full=True, top_k=4, out_dir=d)
    messages = [str(w.message) for w in record if "is damaged" in str(w.message)]
    assert len(messages) == 4, messages
    for i, msg in enumerate(messages):
        assert f"chunk_{i:06d}.npz" in msg and f"recomputing chunk {i}" in msg
    assert "checksum mismatch" in messages[0] and "checksum mismatch" in messages[1]
    assert again.computed_chunks == (0, 1, 2, 3)                             # chunk 4 was intact
    assert names[4].read_bytes() == before4
    assert_same(again, clean)
    assert again.train_sha256 == first.train_sha256
    # the repaired directory now resumes silently, all chunks loaded
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        final = run(prob, keep_full=True, top_k=4, out_dir=d)
    assert final.computed_chunks == ()
    assert_same(final, clean)


def test_chunk_with_a_valid_checksum_for_other_rows_is_refused(prob, tmp_path):
    """A self-consistent file for another row range belongs to another sweep: refused, untouched."""
    d = tmp_path / "sweep"
    run(prob, top_k=4, out_dir=d)
    path = d / "chunk_000001.npz"
    with np.load(path) as z:
        f = {k: z[k] for k in z.files}
    f["start"] = np.int64(6)
    f["checksum"] = np.str_(sweep._chunk_checksum(str(f["context"]), 6, int(f["count"]),
                                                  str(f["input_sha256"]), f["scores"], f["train_finite"]))
    np.savez(path, **f)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"gifjax\.sweep\.score_stream: bad `train_examples`: got chunk 1 "
                                         r"at training rows \[5, 10\), but .*chunk_000001\.npz holds rows "
                                         r"\[6, 11\).*Fix: pass a fresh out_dir"):
        run(prob, top_k=4, out_dir=d)
    assert path.read_bytes() == before


def test_different_training_data_of_the_same_shapes_is_never_mixed(prob, tmp_path):
    p = prob
    d = tmp_path / "sweep"
    first = run(prob, keep_full=True, top_k=4, out_dir=d)
    x2 = p.x.at[12].multiply(-1.0)  # row 12: chunk 2; same shapes, dtypes, params and test points
    saved = {f: (d / f).read_bytes() for f in os.listdir(d)}
    with pytest.raises(ValueError, match=r"(?s)gifjax\.sweep\.score_stream: bad `train_examples`: got "
                                         r"training rows \[10, 15\) whose contents differ.*chunk_000002\.npz"
                                         r".*different training data of the same shapes.*Fix: pass a fresh "
                                         r"out_dir, or delete"):
        run(prob, train=(x2, p.y), keep_full=True, top_k=4, out_dir=d)
    assert {f: (d / f).read_bytes() for f in os.listdir(d)} == saved  # nothing overwritten or lost
    # the new data in a fresh directory: the same as a clean run on the new data, and a new hash
    fresh = run(prob, train=(x2, p.y), keep_full=True, top_k=4, out_dir=tmp_path / "new")
    assert_same(fresh, run(prob, train=(x2, p.y), keep_full=True, top_k=4))
    assert not np.array_equal(fresh.scores[10:15], first.scores[10:15])
    assert fresh.train_sha256 != first.train_sha256


@pytest.mark.parametrize("damage, recover", [
    (lambda b: b[: len(b) // 2], True),             # truncated (the recovery: checked once)
    (lambda b: b"", False),                         # empty
    (lambda b: b"\xff\xfe" + os.urandom(64), False),  # garbage, not even UTF-8
    (lambda b: b"[]", False),                       # valid JSON, not a manifest
], ids=["truncated", "empty", "garbage", "not-a-manifest"])
def test_damaged_manifest_names_the_file_and_recovery(prob, clean, tmp_path, damage, recover):
    d = tmp_path / "sweep"
    run(prob, keep_full=True, top_k=4, out_dir=d)
    manifest = d / sweep.MANIFEST
    manifest.write_bytes(damage(manifest.read_bytes()))
    with pytest.raises(ValueError, match=r"gifjax\.sweep\.score_stream: bad `out_dir`: got .*whose "
                                         r"manifest\.json is damaged or unreadable.*Fix: delete .*manifest\.json "
                                         r"and rerun with the original configuration"):
        run(prob, keep_full=True, top_k=4, out_dir=d)
    if not recover:
        return
    manifest.unlink()
    recovered = run(prob, keep_full=True, top_k=4, out_dir=d)
    assert recovered.computed_chunks == ()  # every chunk verified on its own and kept
    assert_same(recovered, clean)


def test_chunk_of_another_configuration_is_refused_without_manifest(prob, tmp_path):
    """Deleting the manifest cannot smuggle in chunks of another sweep: each carries its fingerprint."""
    d = tmp_path / "sweep"
    run(prob, top_k=4, out_dir=d)
    (d / sweep.MANIFEST).unlink()
    with pytest.raises(ValueError, match=r"bad `train_examples`: got .*chunk_000000\.npz, written by a sweep "
                                         r"with a different configuration"):
        run(prob, top_k=5, out_dir=d)


# ----------------------------------------------------------------------------- bad examples

def test_nonfinite_training_rows_are_kept_out_of_topk_and_reported(prob, clean):
    p = prob
    x = p.x.at[7, 1].set(jnp.nan).at[12, 0].set(jnp.inf)  # only the scored rows; H is clean
    with pytest.warns(RuntimeWarning, match=r"2 training example\(s\) \[7, 12\] have non-finite scores"):
        out = run(prob, train=(x, p.y), keep_full=True, top_k=4)
    np.testing.assert_array_equal(out.nonfinite_train, [7, 12])
    assert out.num_nonfinite_train == 2 and out.num_nonfinite_test == 0
    assert not np.isfinite(out.scores[[7, 12]]).any()
    good = np.setdiff1d(np.arange(24), [7, 12])
    np.testing.assert_array_equal(out.scores[good], clean.scores[good])
    for idx in (out.top_indices, out.bottom_indices):
        assert not np.isin(idx, [7, 12]).any() and (idx >= 0).all()
    assert np.isfinite(out.top_scores).all() and np.isfinite(out.bottom_scores).all()
    for j in range(N_TEST):  # the top-k of the finite rows, as argsort would give it
        col = np.where(np.isfinite(out.scores[:, j]), out.scores[:, j], -np.inf)
        np.testing.assert_array_equal(out.top_indices[j], np.argsort(-col, kind="stable")[:4])


def test_nonfinite_test_example_gives_a_nan_column_not_zeros(prob, clean):
    p = prob
    xt = p.x[:N_TEST].at[1, 2].set(jnp.nan).at[4, 0].set(jnp.inf)
    with pytest.warns(RuntimeWarning, match=r"2 test example\(s\) \[1, 4\] have a non-finite gradient"):
        out = sweep.score_stream(p.loss, p.params, p.example_loss, (p.x, p.y), (xt, p.y[:N_TEST]),
                                 p.x, p.y, damping=p.damping, solver="dense", train_chunk_size=CHUNK,
                                 progress=False, keep_full=True, top_k=4)
    np.testing.assert_array_equal(out.nonfinite_test, [1, 4])
    assert out.nonfinite_train.size == 0  # NaN columns do not make every training row "bad"
    assert np.isnan(out.scores[:, [1, 4]]).all()
    for j in (1, 4):
        assert (out.top_indices[j] == -1).all() and np.isnan(out.top_scores[j]).all()
        assert (out.bottom_indices[j] == -1).all() and np.isnan(out.bottom_scores[j]).all()
    ok = [0, 2, 3, 5]
    np.testing.assert_allclose(out.scores[:, ok], clean.scores[:, ok], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(out.top_indices[ok], clean.top_indices[ok])


def test_merge_never_ranks_nonfinite_scores():
    block = np.array([[1.0, np.nan], [np.inf, 2.0], [-np.inf, 3.0], [0.5, np.nan]])  # [4 train, 2 test]
    empty_s, empty_i = np.empty((2, 0)), np.empty((2, 0), np.int64)
    s, i = sweep._merge(empty_s, empty_i, block, 10, 3, largest=True)
    np.testing.assert_array_equal(i, [[10, 13, -1], [12, 11, -1]])
    np.testing.assert_array_equal(s, [[1.0, 0.5, np.nan], [3.0, 2.0, np.nan]])
    s, i = sweep._merge(s, i, np.array([[0.7, 5.0]]), 14, 3, largest=True)  # padding never wins
    np.testing.assert_array_equal(i, [[10, 14, 13], [14, 12, 11]])
    s, i = sweep._merge(empty_s, empty_i, block, 0, 2, largest=False)
    np.testing.assert_array_equal(i, [[3, 0], [1, 2]])
