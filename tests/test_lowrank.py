"""Shared low-rank Krylov path: Lanczos / Golub–Kahan factors against dense eigen/SVD oracles."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gifjax
from gifjax import lowrank, masks, solvers
from gifjax.lowrank import LowRank
from conftest import make_problem, rel_err

K = 5  # truncation rank in the rank-k tests


@functools.lru_cache(maxsize=None)
def setup(dtype=jnp.float64):
    with jax.enable_x64(dtype == jnp.float64):
        problem = make_problem("mlp", dtype)
        mask = masks.random_mask(jax.random.key(7), problem.params, fraction=0.4)
    return problem, mask


def dims(method, problem, mask):
    return problem.hessian.shape[0] if method in ("if", "pif") else int(masks.count(mask))


@functools.lru_cache(maxsize=None)
def factors(method, rank=None, num_steps=None, start=None):
    """Factors of ``method``'s operator (pif shares if's H_λ), full Krylov space unless num_steps."""
    problem, mask = setup()
    method = "if" if method == "pif" else method
    full = dims(method, problem, mask)
    g = None if start is None else removal_grad(problem)
    return lowrank.factorize(problem.loss, problem.params, problem.x, problem.y, method=method, mask=mask,
                             rank=rank or num_steps or full, num_steps=num_steps or full,
                             damping=problem.damping, start=g)


def removal_grad(problem):
    return jax.grad(problem.loss)(problem.params, problem.x[:3], problem.y[:3])


def operator_matrix(method, problem, mask):
    """Dense matrix of the factorised operator: H_λ, P H_λ P or H_λ P."""
    H = np.asarray(problem.hessian, np.float64) + problem.damping * np.eye(problem.hessian.shape[0])
    P = np.diag(np.asarray(problem.flat(mask), np.float64))
    return {"if": H, "pif": H, "fif": P @ H @ P, "gif": H @ P}[method], P


def truncated_pinv(M, k, symmetric):
    if symmetric:
        w, V = np.linalg.eigh(M)
        top = np.argsort(-np.abs(w))[:k]
        return V[:, top] @ np.diag(1 / w[top]) @ V[:, top].T
    U, s, Vt = np.linalg.svd(M)
    return Vt[:k].T @ np.diag(1 / s[:k]) @ U[:, :k].T


def dense_delta(method, problem, mask, g, k):
    M, P = operator_matrix(method, problem, mask)
    Mk = truncated_pinv(M, k, symmetric=method != "gif")
    rhs = P @ g if method == "fif" else g
    out = Mk @ rhs
    return out if method == "if" else P @ out


def run(method, solver, g, **kw):
    problem, mask = setup()
    return gifjax.influence(problem.loss, problem.params, g, problem.x, problem.y, mask=mask,
                            method=method, solver=solver, **kw)


def scores(method, solver, **kw):
    problem, mask = setup()
    return gifjax.influence_scores(problem.loss, problem.params, problem.example_loss,
                                   (problem.x[:6], problem.y[:6]), (problem.x[6:10], problem.y[6:10]),
                                   problem.x, problem.y, mask=mask, method=method, solver=solver,
                                   test_chunk_size=4, **kw)


@pytest.mark.parametrize("rank", ["full", K])
@pytest.mark.parametrize("method", gifjax.METHODS)
def test_updates_and_scores_match_the_dense_truncation(method, rank, x64):
    """Full rank ⇒ the exact answer; rank k ⇒ the dense rank-k truncated pseudo-inverse."""
    problem, mask = setup()
    k = dims(method, problem, mask) if rank == "full" else K
    f = factors(method, rank=None if rank == "full" else K)
    assert f.values.shape == (k,) and int(f.rank) == k
    g = removal_grad(problem)
    fast = run(method, LowRank(f), g)
    expected = dense_delta(method, problem, mask, np.asarray(problem.flat(g)), k)
    assert rel_err(problem.flat(fast.delta), expected) < 1e-9
    assert float(fast.damping) == pytest.approx(problem.damping)  # reported from the factors
    if rank == "full":
        exact = run(method, "dense", g, damping=problem.damping).delta
        assert rel_err(problem.flat(fast.delta), problem.flat(exact)) < 1e-9
        assert float(jnp.max(f.residuals)) < 1e-8 * float(jnp.max(jnp.abs(f.values)))
    # scores (the adjoint problem; transposed factors for gif) with the same truncated Δ_k:
    # I[i, j] = −∇ℓ(test_j)ᵀ Δ_k(∇ℓ(train_i))
    grads = lambda ex: jax.vmap(problem.flat)(jax.vmap(jax.grad(problem.example_loss), (None, 0))(
        problem.params, ex))
    G_train = np.asarray(grads((problem.x[:6], problem.y[:6])))
    G_test = np.asarray(grads((problem.x[6:10], problem.y[6:10])))
    deltas = np.stack([dense_delta(method, problem, mask, gi, k) for gi in G_train])
    assert rel_err(scores(method, LowRank(f)), -deltas @ G_test.T) < 1e-9


def test_float32_rank_k_matches_dense_truncation():
    A = jax.random.normal(jax.random.key(1), (30, 30), jnp.float32)
    S = A @ A.T / 30 + 0.1 * jnp.eye(30)
    b = jnp.ones(30, jnp.float32)
    f = lowrank.lanczos(lambda v: S @ v, b, num_steps=30, rank=K)
    x = LowRank(f)(lambda v: S @ v, b).value
    assert x.dtype == jnp.float32 and f.values.dtype == jnp.float32
    assert rel_err(x, truncated_pinv(np.asarray(S, np.float64), K, True) @ np.ones(30)) < 1e-4
    g = lowrank.bidiagonalize(lambda v: A @ v, lambda u: A.T @ u, b, num_steps=29, rank=K)
    y = LowRank(g)(lambda v: A @ v, b, rmatvec=lambda u: A.T @ u, form="least_squares").value
    assert rel_err(y, truncated_pinv(np.asarray(A, np.float64), K, False) @ np.ones(30)) < 1e-4


@pytest.mark.parametrize("method, reference", [("if", solvers.CG(rtol=0.0, max_steps=8)),
                                               ("gif", solvers.LSTSQ(rtol=0.0, max_steps=8))])
def test_start_at_rhs_is_the_krylov_solver_of_that_rhs(method, reference, x64):
    """start = g, all m pairs kept: the answer for g is m steps of CG (SPD) / CGLS (gif)."""
    problem, _ = setup()
    f = factors(method, num_steps=8, start=True)
    g = removal_grad(problem)
    fast = run(method, LowRank(f), g)
    krylov = run(method, reference, g, damping=problem.damping)
    assert int(krylov.num_steps) == 8
    assert rel_err(problem.flat(fast.delta), problem.flat(krylov.delta)) < 1e-7


def test_rank_by_tolerance_on_the_captured_spectrum(x64):
    S = jnp.diag(jnp.array([5.0, -2.0, 1.0, 0.3, 0.01, 1e-4]))
    f = lowrank.lanczos(lambda v: S @ v, jnp.ones(6), num_steps=6, rtol=0.1)
    assert int(f.rank) == 3 and f.values.shape == (6,)
    b = jnp.arange(1.0, 7.0)
    x = LowRank(f)(lambda v: S @ v, b).value
    np.testing.assert_allclose(x, jnp.array([1 / 5, -2 / 2, 3.0, 0, 0, 0]), atol=1e-12)
    # rtol is traced: a new tolerance does not recompile, it only changes the used count
    g = jax.jit(lambda r: lowrank.lanczos(lambda v: S @ v, jnp.ones(6), num_steps=6, rtol=r).rank)
    assert int(g(0.1)) == 3 and int(g(1e-3)) == 5


def test_complement_maps_the_uncaptured_part_by_one_over_lambda(x64):
    problem, mask = setup()
    f = factors("if", rank=K)
    g = np.asarray(problem.flat(removal_grad(problem)))
    M, _ = operator_matrix("if", problem, mask)
    w, V = np.linalg.eigh(M)
    Vk = V[:, np.argsort(-np.abs(w))[:K]]
    lam = problem.damping
    expected = truncated_pinv(M, K, True) @ g + (g - Vk @ (Vk.T @ g)) / lam
    out = run("if", LowRank(f, complement=1 / lam), problem.unravel(g))
    assert rel_err(problem.flat(out.delta), expected) < 1e-8


def test_solution_diagnostics_spend_no_hvp(x64):
    problem, mask = setup()
    f = factors("fif", rank=K)
    out = run("fif", LowRank(f), removal_grad(problem))
    assert int(out.num_hvps) == 0 and int(out.num_steps) == 0
    # a rank-K truncation whose rhs leaves the factors' subspace is an approximation, not converged
    assert not bool(out.converged) and out.solution.failure_names() == "approximate"
    # residual_norm: the part of the (masked) rhs outside the used subspace
    b = np.asarray(problem.flat(masks.apply(mask, removal_grad(problem))))
    Y = np.asarray(jax.vmap(problem.flat)(f.left))
    assert float(out.residual_norm) == pytest.approx(np.linalg.norm(b - Y.T @ (Y @ b)), rel=1e-8)
    full = dims("fif", problem, mask)
    assert int(f.num_matvecs) == full and int(factors("gif").num_matvecs) == 2 * full + 1


def test_jit_vmap_and_no_retrace_on_new_factors(x64):
    problem, mask = setup()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def delta(f, g):
        return gifjax.influence(problem.loss, problem.params, g, problem.x, problem.y, mask=mask,
                                method="gif", solver=LowRank(f)).delta

    g = removal_grad(problem)
    f1 = factors("gif", rank=K)
    f2 = lowrank.factorize(problem.loss, problem.params, problem.x, problem.y, method="gif", mask=mask,
                           rank=K, num_steps=12, damping=problem.damping, key=jax.random.key(3))
    chex.assert_trees_all_close(delta(f1, g), run("gif", LowRank(f1), g).delta, rtol=1e-12, atol=1e-14)
    chex.assert_trees_all_close(delta(f2, g), run("gif", LowRank(f2), g).delta, rtol=1e-12, atol=1e-14)
    chex.clear_trace_counter()
    G = jax.vmap(jax.grad(problem.example_loss), (None, 0))(problem.params, (problem.x[:3], problem.y[:3]))
    batched = jax.vmap(lambda gi: run("gif", LowRank(f1), gi).delta)(G)
    for i in range(3):
        single = run("gif", LowRank(f1), jax.tree_util.tree_map(lambda a: a[i], G)).delta
        chex.assert_trees_all_close(jax.tree_util.tree_map(lambda a: a[i], batched), single, rtol=1e-12)
    jitted = jax.jit(lambda p: lowrank.factorize(problem.loss, p, problem.x, problem.y, method="gif",
                                                 mask=mask, rank=K, num_steps=12, damping=problem.damping,
                                                 key=jax.random.key(3)))(problem.params)
    chex.assert_trees_all_close(jitted.values, f2.values, rtol=1e-10)


def test_save_and_load_roundtrip(tmp_path, x64):
    problem, _ = setup()
    for method in ("fif", "gif"):
        f = factors(method, rank=K)
        lowrank.save(tmp_path / f"{method}.npz", f)
        back = lowrank.load(tmp_path / f"{method}.npz", like=problem.params)
        assert back.method == method and back.symmetric == (method == "fif")
        chex.assert_trees_all_equal(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(f))
        chex.assert_trees_all_equal(back.left, f.left)


def test_approximation_error_helper(x64):
    problem, mask = setup()
    g = removal_grad(problem)
    exact = run("gif", "dense", g, damping=problem.damping).delta
    for rank, tol in ((None, 1e-8), (K, None)):
        f = factors("gif", rank=rank)
        res = lowrank.approximation_error(problem.loss, problem.params, f, g, problem.x, problem.y,
                                          mask=mask)
        assert bool(res.exact_solution.converged)
        expected = rel_err(problem.flat(run("gif", LowRank(f), g).delta), problem.flat(exact))
        assert float(res.relative_error) == pytest.approx(expected, rel=1e-6, abs=1e-9)
        if tol:
            assert float(res.relative_error) < tol
    adj = lowrank.approximation_error(problem.loss, problem.params, factors("gif"), g, problem.x,
                                      problem.y, mask=mask, adjoint=True)
    assert float(adj.relative_error) < 1e-8


def test_generic_lanczos_and_bidiagonalization_on_a_matrix(x64):
    A = jax.random.normal(jax.random.key(0), (12, 12), jnp.float64)
    S = A + A.T
    f = lowrank.lanczos(lambda v: S @ v, jnp.ones(12), num_steps=12, rank=4)
    w = np.linalg.eigvalsh(np.asarray(S))
    np.testing.assert_allclose(np.sort(np.abs(f.values)), np.sort(np.abs(w))[-4:], rtol=1e-10)
    b = lowrank.bidiagonalize(lambda v: A @ v, lambda u: A.T @ u, jnp.ones(12), num_steps=12, rank=3)
    np.testing.assert_allclose(b.values, np.linalg.svd(np.asarray(A))[1][:3], rtol=1e-10)
    x = LowRank(b)(lambda v: A @ v, jnp.ones(12), rmatvec=lambda u: A.T @ u, form="least_squares").value
    np.testing.assert_allclose(x, truncated_pinv(np.asarray(A), 3, False) @ np.ones(12), rtol=1e-9)


def test_input_errors(x64):
    problem, mask = setup()
    args = (problem.loss, problem.params, problem.x, problem.y)
    with pytest.raises(ValueError, match=r"gifjax\.lowrank\.factorize: bad `rank`: got 9; expected at most num_steps = 5"):
        lowrank.factorize(*args, rank=9, num_steps=5)
    with pytest.raises(ValueError, match=r"gifjax\.lowrank\.factorize: bad `num_steps`: got 60; expected at most the dimension 51"):
        lowrank.factorize(*args, rank=5, num_steps=60)
    with pytest.raises(ValueError, match=r"gifjax\.lowrank\.factorize: bad `num_steps`: got 21; expected at most the dimension 20"):
        lowrank.factorize(*args, rank=5, num_steps=21, method="gif", mask=mask)
    with pytest.raises(ValueError, match=r"gifjax\.lowrank\.factorize: bad `method`: got 'newton'"):
        lowrank.factorize(*args, rank=5, method="newton")
    with pytest.raises(ValueError, match=r"gifjax\.lowrank\.factorize: bad `start`: got shape"):
        lowrank.factorize(*args, rank=5, start=jax.tree_util.tree_map(lambda a: a[None], problem.params))
    g = removal_grad(problem)
    with pytest.raises(ValueError, match=r"gifjax\.influence: bad `method`: got 'gif'; expected a method served by the 'fif' factors"):
        run("gif", LowRank(factors("fif", rank=K)), g)
    with pytest.raises(ValueError, match=r"gifjax\.influence: bad `damping`: got 0\.3; expected 0 \(default\) or the factors' damping"):
        run("fif", LowRank(factors("fif", rank=K)), g, damping=0.3)
    with pytest.raises(ValueError, match=r"gifjax\.influence_scores: bad `damping`: got AutoDamping"):
        scores("fif", LowRank(factors("fif", rank=K)), damping=gifjax.AutoDamping(0.1))
    with pytest.raises(ValueError, match=r"gifjax\.lowrank\.LowRank: bad `complement`: got 0\.5; expected 0 for Golub–Kahan"):
        run("gif", LowRank(factors("gif", rank=K), complement=0.5), g)
    generic = lowrank.lanczos(lambda v: v, problem.params, num_steps=3)
    with pytest.raises(ValueError, match=r"gifjax\.influence: bad `solver`: got LowRank factors without a method"):
        run("if", LowRank(generic), g)


def test_converged_only_when_the_rhs_lies_in_the_factors_subspace(x64):
    """Full-Krylov-space factors answer exactly (converged); a rank-1 truncation, or factors built
    for another mask, leave most of the rhs outside: failure "approximate", never converged."""
    problem, mask = setup()
    g = removal_grad(problem)
    full = run("fif", LowRank(factors("fif")), g)
    assert bool(full.converged), full.solution.failure_names()
    rank1 = run("fif", LowRank(factors("fif", rank=1)), g)
    assert not bool(rank1.converged) and rank1.solution.failure_names() == "approximate"
    other = masks.random_mask(jax.random.key(99), problem.params, fraction=0.4)
    wrong = gifjax.influence(problem.loss, problem.params, g, problem.x, problem.y, mask=other, method="fif",
                             solver=LowRank(factors("fif")))
    assert not bool(wrong.converged) and wrong.solution.failure_names() == "approximate"


def test_factors_and_the_call_must_name_the_same_curvature(x64):
    """GGN factors answer from the GGN; derivatives go through the operator, so it must be the GGN too."""
    from conftest import _l2, _xent, mlp_apply

    problem, mask = setup()
    ggn = gifjax.GGN(lambda p, x, y: mlp_apply(p, x), lambda z, x, y: jnp.mean(_xent(z, y)), _l2)
    full = dims("if", problem, mask)  # the whole Krylov space: the factors are exact
    f = lowrank.factorize(problem.loss, problem.params, problem.x, problem.y, method="if", curvature=ggn,
                          damping=0.1, rank=full, num_steps=full)
    g = removal_grad(problem)
    with pytest.raises(ValueError, match=r"gifjax\.influence: bad `curvature`: got 'hessian' \(the default\); "
                                         r"expected the factors' curvature 'ggn'.*curvature=gifjax\.GGN"):
        run("if", LowRank(f), g)
    with pytest.raises(ValueError, match=r"bad `curvature`: got a GGN spec; expected the factors' curvature 'hessian'"):
        run("if", LowRank(factors("if")), g, curvature=ggn)
    # with the same curvature: the full-rank factors give the dense GGN solve
    out = run("if", LowRank(f), g, curvature=ggn)
    dense = run("if", "dense", g, curvature=ggn, damping=0.1)
    assert rel_err(problem.flat(out.delta), problem.flat(dense.delta)) < 1e-8
