"""IF / PIF / FIF / GIF estimators and influence scores against dense oracles."""

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gifjax
from gifjax import masks, solvers
from conftest import RTOL, dense_estimate, make_problem, rel_err


def dense_delta(problem, g_flat, method, idx):
    """Δ from the definitions, on the dense damped Hessian (float64 oracle)."""
    H = np.asarray(problem.hessian, np.float64) + problem.damping * np.eye(problem.hessian.shape[0])
    return dense_estimate(H, g_flat, method, idx)


def removal_grad(problem):
    return jax.grad(problem.loss)(problem.params, problem.x[:3], problem.y[:3])


def tight_solver(name, dtype):
    rtol = 1e-13 if dtype == jnp.float64 else 1e-6
    return {"dense": solvers.Dense(), "cg": solvers.CG(rtol=rtol, max_steps=500),
            "lstsq": solvers.LSTSQ(rtol=rtol, max_steps=1000)}[name]


@pytest.mark.parametrize("solver", ["dense", "cg", "lstsq"])
@pytest.mark.parametrize("method", gifjax.METHODS)
def test_estimators_match_dense_definitions(problem, dtype, method, solver):
    g = removal_grad(problem)

    @jax.jit  # masks are traced: one compile serves every density
    def run(mask):
        return gifjax.influence(problem.loss, problem.params, g, problem.x, problem.y, mask=mask,
                                method=method, solver=tight_solver(solver, dtype),
                                damping=problem.damping)

    for density in (0.1, 0.5, 1.0):
        mask = masks.random_mask(jax.random.key(7), problem.params, fraction=density)
        out = run(mask)
        expected = dense_delta(problem, problem.flat(g), method, masks.flat_indices(mask))
        delta = np.asarray(problem.flat(out.delta))
        tol = RTOL[dtype] * (10 if method == "gif" else 1)  # GIF's normal equations square κ
        assert rel_err(delta, expected) < tol, density
        assert bool(out.converged), (density, out.solution.failure_names())
        chex.assert_trees_all_equal_shapes_and_dtypes(out.delta, problem.params)
        if method != "if":  # exactly zero off the mask
            off = np.asarray(problem.flat(jax.tree_util.tree_map(lambda m: ~m, mask)), bool)
            assert np.all(delta[off] == 0)


@pytest.mark.parametrize("method", gifjax.METHODS)
def test_slow_solvers_match_dense(method, x64):
    problem = make_problem("mlp", x64)
    mask = masks.random_mask(jax.random.key(1), problem.params, fraction=0.3)
    g = removal_grad(problem)
    expected = dense_delta(problem, problem.flat(g), method, masks.flat_indices(mask))
    lissa = solvers.LiSSA(num_steps=20000 if method == "gif" else 4000, rtol=1e-9)
    lam = float(jnp.linalg.eigvalsh(problem.hessian)[-1]) + problem.damping
    rich = solvers.Richardson(normalizer=lam**2, rtol=1e-11, max_steps=100000)
    for solver in (lissa, rich):
        out = gifjax.influence(problem.loss, problem.params, g, problem.x, problem.y, mask=mask,
                               method=method, solver=solver, damping=problem.damping)
        assert rel_err(problem.flat(out.delta), expected) < 1e-7, type(solver).__name__
        assert bool(out.converged)


def test_all_true_mask_makes_the_four_estimators_coincide(problem, dtype):
    g = removal_grad(problem)
    full = masks.full_mask(problem.params)
    deltas = [problem.flat(gifjax.influence(problem.loss, problem.params, g, problem.x, problem.y,
                                            mask=full, method=m, solver="dense",
                                            damping=problem.damping).delta)
              for m in gifjax.METHODS]
    for d in deltas[1:]:
        assert rel_err(d, deltas[0]) < RTOL[dtype]


def test_gif_beats_fif_on_full_stationarity_and_fif_solves_target_rows(x64):
    problem = make_problem("mlp", x64)
    mask = masks.random_mask(jax.random.key(3), problem.params, fraction=0.2)
    idx = masks.flat_indices(mask)
    g = problem.flat(removal_grad(problem))
    H = problem.hessian + problem.damping * jnp.eye(g.shape[0])
    res = {}
    for m in ("fif", "gif"):
        d = problem.flat(gifjax.influence(problem.loss, problem.params, problem.unravel(g), problem.x,
                                          problem.y, mask=mask, method=m, solver="dense",
                                          damping=problem.damping).delta)
        res[m] = H @ d - g
    assert float(jnp.linalg.norm(res["gif"])) < float(jnp.linalg.norm(res["fif"]))
    assert float(jnp.linalg.norm(res["fif"][idx])) < 1e-10 * float(jnp.linalg.norm(g))


def test_ridge_regression_removal_is_exact(x64):
    """Quadratic objective: the Newton step is the retrained solution, exactly."""
    kx, kw = jax.random.split(jax.random.key(0))
    X = jax.random.normal(kx, (30, 4), jnp.float64)
    y = X @ jax.random.normal(kw, (4,), jnp.float64) + 0.1 * jnp.sin(jnp.arange(30.0))
    reg = 0.3

    def loss(w, X, y):
        return 0.5 * jnp.mean((X @ w - y) ** 2) + 0.5 * reg * w @ w

    def fit(X, y):
        n = X.shape[0]
        return jnp.linalg.solve(X.T @ X / n + reg * jnp.eye(4), X.T @ y / n)

    w = fit(X, y)
    removed = jnp.array([2, 5, 11])
    keep = jnp.setdiff1d(jnp.arange(30), removed)
    n, m = 30, 3
    # g = m/(n−m) · ∇(mean_U ℓ + R): the group-removal gradient, exact with H of the remaining data
    g = gifjax.removal_gradient(loss, w, X[removed], y[removed], num_train=n)
    np.testing.assert_allclose(g, m / (n - m) * jax.grad(loss)(w, X[removed], y[removed]), rtol=1e-14)
    for solver in ("dense", "cg", "lstsq"):
        out = gifjax.influence(loss, w, g, X[keep], y[keep], method="if",
                               solver=tight_solver(solver, jnp.float64))
        np.testing.assert_allclose(w + out.delta, fit(X[keep], y[keep]), rtol=1e-10, atol=1e-12)


def dense_scores(problem, method, idx, train, test):
    G_train = jax.vmap(jax.grad(problem.example_loss), (None, 0))(problem.params, train)
    G_test = jax.vmap(jax.grad(problem.example_loss), (None, 0))(problem.params, test)
    flat = jax.vmap(problem.flat)
    deltas = np.stack([dense_delta(problem, gi, method, idx) for gi in flat(G_train)])
    return -deltas @ np.asarray(flat(G_test), np.float64).T


@pytest.mark.parametrize("method", gifjax.METHODS)
def test_influence_scores_match_dense(problem, dtype, method):
    mask = masks.random_mask(jax.random.key(5), problem.params, fraction=0.4)
    train = (problem.x[:10], problem.y[:10])
    test = (problem.x[10:15], problem.y[10:15])
    expected = dense_scores(problem, method, masks.flat_indices(mask), train, test)
    rtol = 1e-13 if dtype == jnp.float64 else 1e-5  # float32: above LSTSQ's floor of 16 eps ≈ 1.9e-6
    for solver in ("dense", solvers.LSTSQ(rtol=rtol, max_steps=1000)):
        out = gifjax.influence_scores(problem.loss, problem.params, problem.example_loss, train, test,
                                      problem.x, problem.y, mask=mask, method=method, solver=solver,
                                      damping=problem.damping, test_chunk_size=2, train_chunk_size=3,
                                      return_info=True)
        assert out.scores.shape == (10, 5)
        assert rel_err(out.scores, expected) < RTOL[dtype] * (10 if method == "gif" else 1)
        assert bool(jnp.all(out.solution.converged))


def test_self_influence_is_diagonal_of_scores(x64):
    problem = make_problem("cnn", x64)
    mask = masks.random_mask(jax.random.key(5), problem.params, fraction=0.5)
    ex = (problem.x[:6], problem.y[:6])
    for method in gifjax.METHODS:
        kw = dict(mask=mask, method=method, solver="dense", damping=problem.damping)
        full = gifjax.influence_scores(problem.loss, problem.params, problem.example_loss, ex, ex,
                                       problem.x, problem.y, **kw)
        diag = gifjax.self_influence(problem.loss, problem.params, problem.example_loss, ex,
                                     problem.x, problem.y, example_chunk_size=4, **kw)
        np.testing.assert_allclose(diag, jnp.diag(full), rtol=1e-9)
        if method == "if":
            assert bool(jnp.all(diag < 0))  # upweighting a point lowers its own loss


def test_vmap_over_test_points_equals_python_loop(x64):
    problem = make_problem("mlp", x64)
    mask = masks.random_mask(jax.random.key(2), problem.params, fraction=0.3)
    G = jax.vmap(jax.grad(problem.example_loss), (None, 0))(problem.params, (problem.x[:4], problem.y[:4]))

    def solve(g):
        return gifjax.influence(problem.loss, problem.params, g, problem.x, problem.y, mask=mask,
                                method="gif", solver=solvers.LSTSQ(rtol=1e-12), damping=0.1)

    batched = jax.vmap(solve)(G)
    for i in range(4):
        single = solve(jax.tree_util.tree_map(lambda a: a[i], G))
        chex.assert_trees_all_close(jax.tree_util.tree_map(lambda a: a[i], batched.delta),
                                    single.delta, rtol=1e-8, atol=1e-12)


def test_jit_equals_eager_and_no_retrace(x64):
    problem = make_problem("mlp", x64)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(params, g, mask, damping):
        return gifjax.influence(problem.loss, params, g, problem.x, problem.y, mask=mask,
                                method="gif", solver="lstsq", damping=damping)

    g = removal_grad(problem)
    m1 = masks.random_mask(jax.random.key(0), problem.params, fraction=0.2)
    m2 = masks.random_mask(jax.random.key(1), problem.params, fraction=0.5)
    a = run(problem.params, g, m1, 0.5)
    b = run(problem.params, g, m2, 0.7)  # new values, same shapes: no retrace
    eager = gifjax.influence(problem.loss, problem.params, g, problem.x, problem.y, mask=m2,
                             method="gif", solver="lstsq", damping=0.7)
    chex.assert_trees_all_close(b.delta, eager.delta, rtol=1e-9, atol=1e-12)
    assert not np.allclose(problem.flat(a.delta), problem.flat(b.delta))
    chex.clear_trace_counter()


class Linear(NamedTuple):
    w: jax.Array
    b: jax.Array


@pytest.mark.parametrize("container", ["tuple", "list", "namedtuple"])
def test_influence_preserves_pytree_containers(container, x64):
    w, b = jnp.array([[0.5, -0.2], [0.1, 0.3]]), jnp.array([0.1, -0.1])
    params = {"tuple": (w, b), "list": [w, b], "namedtuple": Linear(w, b)}[container]
    X = jax.random.normal(jax.random.key(0), (8, 2), jnp.float64)
    Y = jnp.sin(X)

    def loss(p, X, Y):
        w, b = p[0], p[1]
        return jnp.mean((jnp.tanh(X @ w + b) - Y) ** 2) + 0.1 * (jnp.sum(w**2) + jnp.sum(b**2))

    g = jax.grad(loss)(params, X[:2], Y[:2])
    for method in gifjax.METHODS:
        out = gifjax.influence(loss, params, g, X, Y, method=method, solver="lstsq")
        assert jax.tree_util.tree_structure(out.delta) == jax.tree_util.tree_structure(params)
        chex.assert_trees_all_equal_shapes_and_dtypes(out.delta, params)


def test_chunked_curvature_equals_full_batch(x64):
    problem = make_problem("cnn", x64)
    g = removal_grad(problem)
    kw = dict(method="gif", solver="dense", damping=problem.damping,
              mask=masks.random_mask(jax.random.key(0), problem.params, fraction=0.5))
    full = gifjax.influence(problem.loss, problem.params, g, problem.x, problem.y, **kw)
    chunked = gifjax.influence(problem.loss, problem.params, g, problem.x, problem.y, chunk_size=5, **kw)
    chex.assert_trees_all_close(chunked.delta, full.delta, rtol=1e-10)


def test_stochastic_lissa_approximates_if(x64):
    problem = make_problem("mlp", x64, n=64)
    g = removal_grad(problem)
    damping = problem.damping + 1.0
    exact = gifjax.influence(problem.loss, problem.params, g, problem.x, problem.y, method="if",
                             solver="dense", damping=damping).delta
    out = gifjax.influence(problem.loss, problem.params, g, problem.x, problem.y, method="if",
                           solver=solvers.LiSSA(num_steps=600, batch_size=32, key=jax.random.key(3)),
                           damping=damping)
    err = rel_err(problem.flat(out.delta), problem.flat(exact))
    assert err < 0.3, err  # minibatch noise; the full-batch answer is exact (test above)
    again = gifjax.influence(problem.loss, problem.params, g, problem.x, problem.y, method="if",
                             solver=solvers.LiSSA(num_steps=600, batch_size=32, key=jax.random.key(3)),
                             damping=damping)
    chex.assert_trees_all_equal(out.delta, again.delta)  # deterministic given the key


def test_indefinite_hessian_is_reported_by_cg():
    problem = make_problem("mlp", jnp.float32)
    assert float(jnp.linalg.eigvalsh(problem.hessian.astype(jnp.float32))[0]) < 0  # non-convex here
    out = gifjax.influence(problem.loss, problem.params, removal_grad(problem), problem.x, problem.y,
                           method="if", solver=solvers.CG(max_steps=500))
    assert out.solution.failure_names() == "indefinite" and not bool(out.converged)
    # GIF's least-squares system is PSD, so it still solves
    gif = gifjax.influence(problem.loss, problem.params, removal_grad(problem), problem.x, problem.y,
                           method="gif", solver="lstsq",
                           mask=masks.random_mask(jax.random.key(0), problem.params, fraction=0.3))
    assert gif.solution.failure_names() in ("none", "max_steps")
    assert bool(jnp.all(jnp.isfinite(problem.flat(gif.delta))))


@pytest.mark.parametrize("solver", ["minres", "lstsq", "block_cg"])
def test_scores_do_not_depend_on_the_chunk_sizes_when_solves_converge(x64, solver):
    """Chunking only groups the same solves: converged scores agree to rounding for any chunk size."""
    problem = make_problem("mlp", x64)
    train, test = (problem.x[:9], problem.y[:9]), (problem.x[9:16], problem.y[9:16])
    method = "gif" if solver == "lstsq" else "if"
    run = lambda tc, rc: gifjax.influence_scores(  # noqa: E731
        problem.loss, problem.params, problem.example_loss, train, test, problem.x, problem.y,
        method=method, solver=solver, damping=problem.damping, test_chunk_size=tc, train_chunk_size=rc,
        return_info=True)
    reference = run(7, 9)
    assert bool(jnp.all(reference.solution.converged))
    for tc, rc in [(1, 2), (3, 4)]:
        out = run(tc, rc)
        assert bool(jnp.all(out.solution.converged))
        assert rel_err(out.scores, reference.scores) < 1e-9, (tc, rc)


def test_curvature_subsample_is_the_curvature_of_a_fixed_subset(x64):
    problem = make_problem("mlp", x64)
    g = removal_grad(problem)
    n, k = problem.x.shape[0], 7
    spec = gifjax.Curvature(subsample=k, damping=problem.damping)
    sub_x, sub_y = spec.subsampled((problem.x, problem.y))
    rows = [int(np.flatnonzero((np.asarray(problem.x) == np.asarray(r)).all(1))[0]) for r in sub_x]
    assert len(set(rows)) == k and np.array_equal(np.asarray(problem.y)[rows], np.asarray(sub_y))
    # a fixed subset: the same every call, and the operator is exactly that subset's Hessian
    assert np.array_equal(np.asarray(spec.subsampled((problem.x, problem.y))[0]), np.asarray(sub_x))
    kw = dict(method="gif", solver="dense", mask=masks.random_mask(jax.random.key(1), problem.params, fraction=0.5))
    got = gifjax.influence(problem.loss, problem.params, g, problem.x, problem.y, curvature=spec, **kw)
    want = gifjax.influence(problem.loss, problem.params, g, sub_x, sub_y, damping=problem.damping, **kw)
    chex.assert_trees_all_close(got.delta, want.delta, rtol=1e-10)
    # larger than the data: all of it
    everything = gifjax.influence(problem.loss, problem.params, g, problem.x, problem.y,
                                  curvature=gifjax.Curvature(subsample=n + 5, damping=problem.damping), **kw)
    full = gifjax.influence(problem.loss, problem.params, g, problem.x, problem.y, damping=problem.damping, **kw)
    chex.assert_trees_all_close(everything.delta, full.delta, rtol=1e-12)
    with pytest.raises(ValueError, match="subsample"):
        gifjax.influence(problem.loss, problem.params, g, problem.x, problem.y,
                         curvature=gifjax.Curvature(subsample=0))


def test_auto_stays_within_its_work_budget_and_says_so(x64, monkeypatch):
    """solver='auto' caps its steps so that a call's curvature products stay within AUTO_FLOP_BUDGET."""
    # XLA's estimate of one product: X v and Xᵀ(X v), 4nd floating-point operations, to within 10 %
    n, d = 200, 50
    ridge = lambda w, X, y: 0.5 * jnp.mean((X @ w - y) ** 2)  # noqa: E731
    X, y = jnp.ones((n, d)), jnp.ones(n)
    for spec, rows in ((gifjax.Curvature(), n), (gifjax.Curvature(subsample=50), 50)):
        flops = gifjax.estimators._product_flops(ridge, jnp.ones(d), (X, y), spec, 16)
        assert 1.0 <= flops / (4 * rows * d) < 1.1, (spec, flops)

    problem = make_problem("mlp", x64)
    train, test = (problem.x[:9], problem.y[:9]), (problem.x[9:13], problem.y[9:13])  # 4 queries: MINRES
    run = lambda solver: gifjax.influence_scores(  # noqa: E731
        problem.loss, problem.params, problem.example_loss, train, test, problem.x, problem.y,
        solver=solver, damping=1e-6, return_info=True)
    full = run("auto")  # far within the budget: the default caps, converged
    assert bool(jnp.all(full.solution.converged)) and int(full.solution.num_steps.max()) > 2 * solvers.AUTO_MIN_STEPS
    per_product = gifjax.estimators._product_flops(problem.loss, problem.params, (problem.x, problem.y),
                                                   gifjax.Curvature(), 16)  # the call's chunk
    monkeypatch.setitem(solvers.AUTO_FLOP_BUDGET, jax.default_backend(), 4 * 25.5 * per_product)  # 25 steps
    assert solvers.auto_steps(per_product, queries=4) == 25
    with pytest.warns(RuntimeWarning, match=r"solver='auto' kept this call within its work budget.*"
                                             r"4 queries.*allow 25 steps per query"):
        capped = run("auto")  # MINRES (fewer than 8 queries) with half of it: 12 steps
    assert int(capped.solution.num_steps.max()) == 12 and not bool(jnp.any(capped.solution.converged))
    assert set(capped.solution.failure_names()) == {"max_steps"}
    np.testing.assert_array_equal(run(solvers.auto()).scores, full.scores)
