"""check_scores: the tight recomputation and the per-query statistics, against hand computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gifjax
from gifjax import solvers
from gifjax.diagnostics import reference_solver


def ill_conditioned(x64):
    keys = jax.random.split(jax.random.key(0), 3)
    X = jax.random.normal(keys[0], (60, 8), x64) * jnp.logspace(0, 2, 8, dtype=x64)
    y = X @ jax.random.normal(keys[1], (8,), x64) + jax.random.normal(keys[2], (60,), x64)
    loss = lambda w, X, y: 0.5 * jnp.mean((X @ w - y) ** 2) + 1e-3 * w @ w
    ex = lambda w, xy: 0.5 * (xy[0] @ w - xy[1]) ** 2
    return loss, ex, jnp.zeros(8, x64), (X, y), (X[:12], y[:12])


def ranks(a):
    return np.argsort(np.argsort(a)).astype(float)


def test_converged_scores_agree_with_the_reference_and_statistics_match_hand_computation(x64):
    loss, ex, w, train, test = ill_conditioned(x64)
    I = gifjax.influence_scores(loss, w, ex, train, test, *train, return_info=True)
    check = gifjax.check_scores(I, loss, w, ex, train, test, *train, num_queries=5, top_k=7)
    assert check.num_queries == 5 and len(set(check.queries.tolist())) == 5
    assert check.converged.all() and check.reference_converged.all() and check.trustworthy()
    np.testing.assert_array_less(check.relative_error, 1e-6)
    # the reference is independent of the solver at hand: the dense answer agrees with it
    dense = gifjax.influence_scores(loss, w, ex, train, test, *train, solver="dense")
    noisy = np.asarray(dense) + 0.5 * np.std(np.asarray(dense)) * np.asarray(
        jax.random.normal(jax.random.key(1), dense.shape))
    bad = gifjax.check_scores(noisy, loss, w, ex, train, test, *train, num_queries=5, top_k=7)
    assert bad.converged is None and not bad.trustworthy()
    R = np.asarray(dense)[:, bad.queries]
    A = noisy[:, bad.queries]
    for j in range(5):
        ra, rb = ranks(A[:, j]), ranks(R[:, j])
        assert bad.spearman[j] == pytest.approx(np.corrcoef(ra, rb)[0, 1], rel=1e-9)
        top = lambda v: set(np.argsort(-np.abs(v))[:7])
        assert bad.top_k_overlap[j] == len(top(A[:, j]) & top(R[:, j])) / 7
        assert bad.relative_error[j] == pytest.approx(np.linalg.norm(A[:, j] - R[:, j]) / np.linalg.norm(R[:, j]),
                                                      rel=1e-6)
    assert "rankings differ" in bad.summary()


def test_a_starved_solver_is_caught(x64):
    loss, ex, w, train, test = ill_conditioned(x64)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        I = gifjax.influence_scores(loss, w, ex, train, test, *train, solver=solvers.MINRES(max_steps=2),
                                    return_info=True)
    check = gifjax.check_scores(I, loss, w, ex, train, test, *train, num_queries=4)
    assert not check.converged.any() and check.reference_converged.all() and not check.trustworthy()
    assert check.reference.rtol == pytest.approx(1e-12)  # float64 default 1e-10, 100x tighter
    assert np.all(check.relative_error > 1e-3)
    assert "NO" in check.summary()
    # a reference that cannot converge within its budget is reported as such, never as ground truth
    starved = gifjax.check_scores(I, loss, w, ex, train, test, *train, num_queries=4,
                                  solver=solvers.MINRES(max_steps=2))
    assert starved.reference.max_steps == 8 and not starved.reference_converged.any()
    assert set(starved.reference_failure) == {"max_steps"} and "not ground truth" in starved.summary()


def test_reference_solver_by_structure():
    assert isinstance(reference_solver("dense"), solvers.Dense)
    gif = reference_solver(solvers.LSMR(max_steps=50), method="gif", dtype=jnp.float32)
    assert isinstance(gif, solvers.LSTSQ) and gif.max_steps == 200
    assert gif.rtol == pytest.approx(solvers.default_rtol(jnp.float32, normal=True) / 100)
    assert isinstance(reference_solver("lissa", method="pif"), solvers.MINRES)


def test_bad_input_names_the_argument(x64):
    loss, ex, w, train, test = ill_conditioned(x64)
    with pytest.raises(ValueError, match=r"check_scores.*scores.*\(60, 12\)"):
        gifjax.check_scores(np.zeros((60, 3)), loss, w, ex, train, test, *train)
    with pytest.raises(ValueError, match=r"check_scores.*num_queries"):
        gifjax.check_scores(np.zeros((60, 12)), loss, w, ex, train, test, *train, num_queries=0)
