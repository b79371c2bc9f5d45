"""Progress bars of the long calls: shown outside transformations, silent on request and inside jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gifjax
from gifjax.parallel import make_mesh

X = jax.random.normal(jax.random.key(0), (40, 3))
Y = X @ jnp.array([1.0, -2.0, 0.5]) + 0.3 * jnp.sin(3 * X[:, 0])  # w = 1 is not the fit: gradients ≠ 0


def loss(w, X, Y):
    return 0.5 * jnp.mean((X @ w - Y) ** 2) + 0.01 * w @ w


def example_loss(w, xy):
    return 0.5 * (xy[0] @ w - xy[1]) ** 2


def scores(**kw):
    return gifjax.influence_scores(loss, jnp.ones(3), example_loss, (X, Y), (X[:20], Y[:20]), X, Y,
                                   test_chunk_size=8, **kw)


def test_bar_counts_chunks_and_converged_queries_without_padding(capsys):
    quiet = scores(progress=False)
    assert capsys.readouterr().err == ""
    shown = scores()
    err = capsys.readouterr().err
    assert "influence_scores" in err and "3/3" in err          # 20 queries → 3 chunks of 8
    assert "converged 20/20" in err                           # the padded 4 rows are not counted
    np.testing.assert_array_equal(np.asarray(shown), np.asarray(quiet))
    gifjax.self_influence(loss, jnp.ones(3), example_loss, (X, Y), X, Y, example_chunk_size=16)
    assert "converged 40/40" in capsys.readouterr().err


def test_block_default_puts_many_queries_in_one_chunk_and_still_shows_a_bar(capsys):
    """test_chunk_size=None: the default block solver takes all 20 queries in one chunk (of 24), with a bar."""
    assert gifjax.estimators.query_chunk_size(20, jnp.ones(3), gifjax.solvers.auto()) == 24
    assert gifjax.estimators.query_chunk_size(20, jnp.ones(3), gifjax.solvers.MINRES()) == 16
    one = gifjax.influence_scores(loss, jnp.ones(3), example_loss, (X, Y), (X[:20], Y[:20]), X, Y)
    err = capsys.readouterr().err
    assert "1/1" in err and "converged 20/20" in err
    chunked = np.asarray(scores(progress=False))  # converged float32 solves: the same scores to rounding
    assert np.linalg.norm(np.asarray(one) - chunked) <= 1e-4 * np.linalg.norm(chunked)


def test_silent_under_jit_with_one_chunk_and_with_the_environment_switch(capsys, monkeypatch):
    jax.jit(lambda w: gifjax.influence_scores(loss, w, example_loss, (X, Y), (X[:20], Y[:20]), X, Y,
                                              test_chunk_size=8))(jnp.ones(3))
    gifjax.influence_scores(loss, jnp.ones(3), example_loss, (X, Y), (X[:4], Y[:4]), X, Y)  # one chunk
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("GIFJAX_PROGRESS", "0")
    scores()
    assert capsys.readouterr().err == ""


def test_not_converged_queries_are_counted_as_such(capsys):
    with pytest.warns(RuntimeWarning, match="did not converge"):
        scores(solver=gifjax.solvers.CG(max_steps=1))
    err = capsys.readouterr().err
    assert "converged 0/20" in err


def test_parallel_bar_on_a_one_device_mesh(capsys):
    mesh = make_mesh(1, 1)
    out = gifjax.parallel.influence_scores(loss, jnp.ones(3), example_loss, (X, Y), (X[:20], Y[:20]), X, Y,
                                           mesh=mesh, test_chunk_size=8)
    assert "parallel.influence_scores" in capsys.readouterr().err
    np.testing.assert_allclose(np.asarray(out), np.asarray(scores(progress=False)), rtol=1e-5)


def test_progress_must_be_a_bool_or_none():
    with pytest.raises(TypeError, match=r"influence_scores.*progress"):
        scores(progress="yes")


def test_factorize_counts_its_curvature_products(capsys):
    gifjax.lowrank.factorize(loss, jnp.ones(3), X, Y, rank=2, num_steps=3)
    err = capsys.readouterr().err
    assert "lowrank.factorize" in err and "3/3" in err
    gifjax.lowrank.factorize(loss, jnp.ones(3), X, Y, rank=2, num_steps=2, method="gif",
                             mask=jnp.array([True, True, False]))
    assert "5/5" in capsys.readouterr().err                   # Golub–Kahan: 2m + 1 products
    gifjax.lowrank.factorize(loss, jnp.ones(3), X, Y, rank=2, progress=False)
    assert capsys.readouterr().err == ""


def test_bar_counts_curvature_products_and_solves_are_unchanged(capsys):
    info = scores(progress=True, return_info=True)
    err = capsys.readouterr().err
    assert "HVPs" in err and "converged 20/20" in err
    # the products a vmapped chunk really computes: every lane (padding included) until its slowest
    # query stops, one Hessian product per MINRES step and residual
    m = np.asarray(info.solution.num_matvecs)
    assert f"HVPs {8 * sum(int(m[i:i + 8].max()) for i in (0, 8, 16)):,}" in err
    np.testing.assert_array_equal(np.asarray(info.scores), np.asarray(scores(progress=False)))


def test_a_long_worst_case_is_projected_once_from_the_measured_rate(monkeypatch):
    """A stray product, then bursts of 4 lanes (one vmapped step) every 2 s: 2 products/s, 72,000 at most → 10 h."""
    from gifjax import _progress

    clock = iter([0.0, 0.5, 0.501, 0.502, 0.503, 2.5, 2.501, 2.502, 2.503, 4.5, 4.501, 4.502, 4.503,
                  6.5, 6.501, 6.502, 6.503, 8.5])
    monkeypatch.setattr(_progress.time, "perf_counter", lambda: next(clock))
    notes = []
    monkeypatch.setattr("tqdm.auto.tqdm.write", lambda *a, **_: notes.append(a[-1]))
    with _progress.bar("influence_scores", 2, True, budget=72_000):
        for _ in range(18):
            _progress._product(None)
    assert len(notes) == 1                                   # once, at the first burst after 5 s (6.5 s)
    assert "influence_scores" in notes[0] and "2 curvature products" in notes[0]
    assert "≈ 10.0 h" in notes[0] and "72,000 products" in notes[0] and "max_steps" in notes[0]
    assert _progress.projection("f", 1000, 2.0) is None      # 500 s: under PROJECTION_NOTICE_S, no notice
    assert "≈ 17 min" in _progress.projection("f", 2000, 2.0)
