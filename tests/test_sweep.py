"""Streaming, resumable influence sweeps (gifjax.sweep) against the dense score matrix."""

import os
import signal
import subprocess
import sys
import textwrap
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
    np.testing.assert_allclose(out.scores, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
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

    def counted(params, example):
        traces.append(1)
        return p.example_loss(params, example)

    def count(n):
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
