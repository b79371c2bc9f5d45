"""MINRES / LSMR / preconditioned CG and the preconditioners, against dense float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gifjax
from gifjax import lowrank, masks, preconditioners as pre, solvers
from conftest import dense_estimate, make_problem, rel_err


def matrix(kind, n=40, seed=0):
    """A symmetric matrix with spread eigenvalues: SPD (κ = 1e3), indefinite, or singular PSD."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    ev = {"spd": np.logspace(0, 3, n),
          "indefinite": np.concatenate([-np.logspace(0, 2, 8), np.logspace(0, 3, n - 8)]),
          "singular": np.concatenate([np.zeros(5), np.logspace(0, 3, n - 5)])}[kind]
    return Q @ np.diag(ev) @ Q.T, rng.normal(size=n)


def outliers(n, num_large, bulk_low, seed=1):
    """A PSD matrix with ``num_large`` eigenvalues in [1e2, 1e4] over a bulk in [bulk_low, 10]."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    ev = np.concatenate([np.logspace(2, 4, num_large), np.linspace(bulk_low, 10, n - num_large)])
    return jnp.asarray(Q @ np.diag(ev) @ Q.T), rng


PRECONDITIONERS = {"none": None, "jacobi": pre.Jacobi(num_probes=16), "nystrom": pre.Nystrom(rank=8),
                   "deflation": pre.Deflation(rank=8)}


@pytest.mark.parametrize("kind", ["spd", "indefinite"])
def test_minres_and_pcg_match_the_dense_solve_with_every_preconditioner(kind, x64):
    A, b = matrix(kind)
    expected = np.linalg.solve(A, b)
    A, b = jnp.asarray(A), jnp.asarray(b)
    op = solvers.LinearOperator(lambda v: A @ v, symmetric=True, psd=kind == "spd", like=b)
    for name, M in PRECONDITIONERS.items():
        for solver in [solvers.MINRES(preconditioner=M, max_steps=400)] + (
                [solvers.CG(preconditioner=M, max_steps=400)] if kind == "spd" else []):
            sol = solver.compute(solver.init(op), b)
            assert bool(sol.converged), (name, type(solver).__name__, sol.failure_names())
            assert rel_err(sol.value, expected) < 1e-8, (name, type(solver).__name__)
            true = float(jnp.linalg.norm(b - A @ sol.value))
            assert true <= 1e-10 * float(jnp.linalg.norm(b)) * (1 + 1e-6)  # converged ⇒ true residual met


def test_cg_reports_indefinite_and_minres_does_not_stop_there(x64):
    A, b = map(jnp.asarray, matrix("indefinite"))
    cg = solvers.CG(max_steps=400)(lambda v: A @ v, b)
    assert cg.failure_names() == "indefinite" and not bool(cg.converged)
    assert bool(solvers.MINRES(max_steps=400)(lambda v: A @ v, b).converged)


def test_minres_gives_the_minimum_norm_solution_of_a_consistent_singular_system(x64):
    A, b = matrix("singular")
    b = A @ b  # consistent
    sol = solvers.MINRES(max_steps=400)(lambda v: jnp.asarray(A) @ v, jnp.asarray(b))
    assert bool(sol.converged)
    assert rel_err(sol.value, np.linalg.pinv(A) @ b) < 1e-8


def test_minres_stops_on_an_inconsistent_system_with_a_least_squares_answer(x64):
    # Paige–Saunders test 2: b has a part in A's null space, so no x solves A x = b; MINRES stops when
    # ‖A r‖ ≤ rtol·‖A‖·‖r‖ (checked on the true residual) instead of running to its step cap, and says so
    for kind in ("singular", "indefinite"):
        A, b = matrix("singular")
        if kind == "indefinite":  # a singular indefinite A: flip the sign of part of the spectrum
            w, V = np.linalg.eigh(A)
            A = V @ np.diag(np.where(np.arange(w.size) % 3 == 0, -w, w)) @ V.T
        A, b = jnp.asarray(A), jnp.asarray(b)
        sol = solvers.MINRES(max_steps=400)(lambda v: A @ v, b)
        assert sol.failure_names() == "inconsistent" and not bool(sol.converged), kind
        assert int(sol.num_steps) < 100, int(sol.num_steps)  # not the step cap
        r = b - A @ sol.value
        norm = float(jnp.linalg.norm(A, 2))
        assert float(jnp.linalg.norm(A @ r)) <= 1.5e-8 * norm * float(jnp.linalg.norm(r))
        # a least-squares solution: A x is b's projection onto A's range (to κ·√eps, the best
        # MINRES certifies before its iterate drifts along the null space; see _least_squares_rtol)
        assert rel_err(A @ sol.value, A @ (jnp.linalg.pinv(A) @ b)) < 1e-6
        assert float(sol.residual_norm) == pytest.approx(float(jnp.linalg.norm(r)), rel=1e-6)
        assert float(sol.backward_error) <= np.sqrt(np.finfo(np.float64).eps)  # ‖A r‖ / (‖A‖ ‖r‖), see Solution
    # the default's fallback ends there too, and the warning says what it means
    op = solvers.LinearOperator(lambda v: A @ v, symmetric=True, like=b)
    auto = solvers.auto()
    many = auto.compute_many(auto.init(op), jnp.stack([b, 2 * b] * 4))
    assert set(many.failure_names()) == {"inconsistent"}
    with pytest.warns(RuntimeWarning, match="inconsistent: 8.*least-squares solutions"):
        solvers.warn_failures("influence_scores", many)


def test_minres_refinement_rounds_reach_a_tolerance_the_first_round_missed(x64):
    # κ = 1e5–1e6: the first round's recurrence residual meets tol while the true one may end a little
    # above, so a refinement round starts from a residual near tol. Its test 2 must ask for the whole
    # solve's rtol: with the round's own relative reduction (≈ 1) it fired at once and the solve ended
    # as "precision". float64 leaves κ·eps far below tol, so every case must converge.
    for seed, top in [(0, 5), (0, 6), (1, 6), (2, 6)]:
        rng = np.random.default_rng(seed)
        Q, _ = np.linalg.qr(rng.normal(size=(100, 100)))
        A, b = jnp.asarray(Q @ np.diag(np.logspace(0, top, 100)) @ Q.T), jnp.asarray(rng.normal(size=100))
        sol = solvers.MINRES(rtol=1e-8, max_steps=3000)(lambda v: A @ v, b)
        assert bool(sol.converged), (seed, top, sol.failure_names(), int(sol.num_steps))
        assert float(jnp.linalg.norm(b - A @ sol.value)) <= 1e-8 * float(jnp.linalg.norm(b))


def test_every_solver_reports_a_backward_error_that_is_never_optimistic(x64):
    # η = ‖r‖ / (‖A‖ ‖x‖ + ‖b‖) with the solver's estimate of ‖A‖ from below (MINRES: ‖T_k‖_F ≤ ‖A‖_F):
    # between the values with the Frobenius norm and with ‖A x‖ / ‖x‖, exact for Dense, ≤ rtol when
    # converged (‖r‖ ≤ rtol ‖b‖), and close to the 2-norm value where the estimate is good
    A, b = map(jnp.asarray, matrix("spd"))
    B = jnp.stack([b, jnp.roll(b, 3), b[::-1]])
    op = solvers.LinearOperator(lambda v: A @ v, symmetric=True, psd=True, like=b)
    two, frobenius = float(jnp.linalg.norm(A, 2)), float(jnp.linalg.norm(A))
    for solver in [solvers.CG(), solvers.MINRES(), solvers.LSMR(), solvers.LSTSQ(), solvers.BlockCG(),
                   solvers.Dense(), solvers.LiSSA(num_steps=50, rtol=1.0), solvers.Richardson(max_steps=50)]:
        sols = solver.compute_many(solver.init(op), B)
        name = type(solver).__name__
        for x, rhs, eta, ok in zip(sols.value, B, sols.backward_error, sols.converged):
            if name in ("LSMR", "LSTSQ", "Richardson"):  # the normal system A² x = A b
                M, rhs = A @ A, A @ rhs
            else:
                M = A
            r, xn, bn = float(jnp.linalg.norm(rhs - M @ x)), float(jnp.linalg.norm(x)), float(jnp.linalg.norm(rhs))
            m2, mf = (two, frobenius) if M is A else (two**2, float(jnp.linalg.norm(M)))
            low, high = r / (mf * xn + bn), r / (float(jnp.linalg.norm(M @ x)) * 1 + bn)
            assert low * (1 - 1e-6) <= float(eta) <= high * (1 + 1e-6), (name, low, float(eta), high)
            if name == "Dense":
                assert float(eta) == pytest.approx(r / (m2 * xn + bn), rel=1e-6)
            if name in ("CG", "BlockCG", "MINRES"):  # Krylov estimates of ‖A‖ within a few times
                assert float(eta) <= 4 * r / (m2 * xn + bn), (name, float(eta), r / (m2 * xn + bn))
            if bool(ok) and name not in ("LiSSA", "Richardson"):  # default rtol: ‖r‖ ≤ rtol ‖b‖
                assert float(eta) <= solvers.default_rtol(jnp.float64) * (1 + 1e-6), (name, float(eta))


def test_lsmr_solves_least_squares_and_min_norm(x64):
    rng = np.random.default_rng(3)
    A = rng.normal(size=(30, 12)) @ np.diag(np.logspace(0, 1.5, 12))
    b = rng.normal(size=30)
    Aj = jnp.asarray(A)
    ls = solvers.LSMR(max_steps=300)(lambda v: Aj @ v, jnp.asarray(b), rmatvec=lambda u: Aj.T @ u,
                                     form="least_squares")
    assert bool(ls.converged) and rel_err(ls.value, np.linalg.lstsq(A, b, rcond=None)[0]) < 1e-8
    c = rng.normal(size=12)
    mn = solvers.LSMR(max_steps=300)(lambda v: Aj.T @ v, jnp.asarray(c), rmatvec=lambda u: Aj @ u,
                                     form="min_norm")
    assert bool(mn.converged) and rel_err(mn.value, np.linalg.pinv(A.T) @ c) < 1e-8
    # symmetric indefinite, inconsistent: the least-squares (pseudo-inverse) answer
    S, s = matrix("singular")
    sol = solvers.LSMR(max_steps=400)(lambda v: jnp.asarray(S) @ v, jnp.asarray(s))
    assert rel_err(sol.value, np.linalg.pinv(S) @ s) < 1e-7


def test_preconditioners_cut_steps_on_a_spectrum_with_outliers(x64):
    """Ten large outliers over a flat bulk: deflating them leaves κ ≈ 10 instead of 1e4."""
    A, rng = outliers(200, 10, 1.0)
    b = jnp.asarray(rng.normal(size=200))
    op = solvers.LinearOperator(lambda v: A @ v, symmetric=True, psd=True, like=b)
    steps = {}
    for name, M in [("none", None), ("nystrom", pre.Nystrom(rank=12)), ("deflation", pre.Deflation(rank=10))]:
        s = solvers.MINRES(preconditioner=M, max_steps=1000)
        sol = s.compute(s.init(op), b)
        assert bool(sol.converged), name
        steps[name] = int(sol.num_steps)
    assert steps["nystrom"] < steps["none"] / 2 and steps["deflation"] < steps["none"] / 2, steps


def test_unreachable_tolerance_is_reported_as_precision_not_converged():
    A, b = matrix("spd")
    A, b = jnp.asarray(A, jnp.float32), jnp.asarray(b, jnp.float32)
    for solver in [solvers.MINRES(rtol=1e-9), solvers.CG(rtol=1e-9)]:
        sol = solver(lambda v: A @ v, b)
        assert not bool(sol.converged)
        assert sol.failure_names() == "precision", type(solver).__name__
        assert bool(jnp.all(jnp.isfinite(sol.value)))


def test_default_tolerance_depends_on_the_dtype():
    assert solvers.default_rtol(jnp.float32) == 1e-4
    assert solvers.default_rtol(jnp.float32, normal=True) == 1e-5
    assert solvers.default_rtol(jnp.float64) == 1e-10
    assert solvers.default_rtol(jnp.bfloat16) == 1e-2


# ----------------------------------------------------------------------------- estimators


def _problem_and_g(dtype, damping):
    problem = make_problem("mlp", dtype)
    g = jax.grad(problem.loss)(problem.params, problem.x[:3], problem.y[:3])
    H = np.asarray(problem.hessian, np.float64) + damping * np.eye(problem.hessian.shape[0])
    return problem, g, H


@pytest.mark.parametrize("case", ["damped", "indefinite"])
def test_auto_meets_its_accuracy_target_for_a_batch_of_gif_queries(case, dtype):
    """GIF's default for 8+ queries (block CG on the normal system, LSTSQ fallback) vs dense adjoints."""
    damping = make_problem("mlp", dtype).damping if case == "damped" else 0.0
    problem = make_problem("mlp", dtype)
    test = (problem.x[:10], problem.y[:10])
    target = 1e-8 if dtype == jnp.float64 else 1e-4
    for density in (0.3, 1.0):
        mask = masks.random_mask(jax.random.key(2), problem.params, fraction=density)
        solve = lambda solver: gifjax.estimators.adjoint_solves(  # noqa: E731
            problem.loss, problem.params, problem.example_loss, test, problem.x, problem.y, mask=mask,
            method="gif", damping=damping, solver=solver)
        with jax.enable_x64(True):
            p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), problem.params)
            exact = gifjax.estimators.adjoint_solves(
                problem.loss, p64, problem.example_loss, (jnp.asarray(test[0], jnp.float64), test[1]),
                jnp.asarray(problem.x, jnp.float64), problem.y, mask=mask, method="gif", damping=damping,
                solver="dense")
            exact = np.asarray(jax.vmap(problem.flat)(exact.solution.value))
        auto, lstsq = solve("auto"), solve(solvers.LSTSQ())
        if not bool(jnp.all(lstsq.solution.converged)):
            # float32, all parameters, λ = 0: the min-norm normal system (κ² of an indefinite H) is
            # beyond float32 for CGLS too; the default must say so, not claim convergence
            assert (dtype, case, density) == (jnp.float32, "indefinite", 1.0), lstsq.solution
            assert not bool(jnp.any(auto.solution.converged))
            continue
        assert bool(jnp.all(auto.solution.converged)), (density, auto.solution)
        err = rel_err(jax.vmap(problem.flat)(auto.solution.value), exact)
        assert err < target, (density, err)
        # the block shares one Krylov space: fewer products per query than CGLS
        assert float(jnp.mean(auto.solution.num_matvecs)) < float(jnp.mean(lstsq.solution.num_matvecs))


@pytest.mark.parametrize("case", ["damped", "indefinite"])
def test_auto_meets_its_accuracy_target_for_every_estimator(case, dtype):
    """solver="auto" vs a float64 dense solve: ≤ 1e-8 (float64), ≤ 1e-4 (float32), converged honest."""
    damping = make_problem("mlp", dtype).damping if case == "damped" else 0.0
    problem, g, H = _problem_and_g(dtype, damping)
    if case == "indefinite":
        assert np.linalg.eigvalsh(H)[0] < 0  # the undamped Hessian really is indefinite here
    target = 1e-8 if dtype == jnp.float64 else 1e-4
    for density in (0.3, 1.0):
        mask = masks.random_mask(jax.random.key(2), problem.params, fraction=density)
        idx = masks.flat_indices(mask)
        for method in gifjax.METHODS:
            out = gifjax.influence(problem.loss, problem.params, g, problem.x, problem.y, mask=mask,
                                   method=method, damping=damping)
            expected = dense_estimate(H, problem.flat(g), method, idx)
            err = rel_err(problem.flat(out.delta), expected)
            assert bool(out.converged), (method, density, out.solution.failure_names())
            assert err < target, (method, density, err)


@pytest.mark.parametrize("method", ["fif", "gif"])
def test_preconditioned_masked_estimators_stay_on_the_mask_and_exact(method, x64):
    problem, g, H = _problem_and_g(x64, make_problem("mlp", x64).damping)
    mask = masks.random_mask(jax.random.key(5), problem.params, fraction=0.4)
    idx = masks.flat_indices(mask)
    expected = dense_estimate(H, problem.flat(g), method, idx)
    factors = lowrank.factorize(problem.loss, problem.params, problem.x, problem.y, rank=6, method="if",
                                damping=problem.damping)
    for M in [pre.Jacobi(num_probes=8), pre.Nystrom(rank=6), pre.Deflation(rank=6), pre.Deflation(factors)]:
        out = gifjax.influence(problem.loss, problem.params, g, problem.x, problem.y, mask=mask, method=method,
                               solver=solvers.MINRES(preconditioner=M), damping=problem.damping)
        delta = np.asarray(problem.flat(out.delta))
        assert bool(out.converged), type(M).__name__
        assert rel_err(delta, expected) < 1e-8, type(M).__name__
        off = np.setdiff1d(np.arange(delta.size), idx)
        assert np.all(delta[off] == 0), type(M).__name__


def test_preconditioned_scores_are_differentiable(x64):
    problem, g, _ = _problem_and_g(x64, 0.0)
    solver = solvers.MINRES(preconditioner=pre.Nystrom(rank=6))

    def f(lam):
        return gifjax.influence(problem.loss, problem.params, g, problem.x, problem.y, method="if",
                                solver=solver, damping=lam).delta["dense2"]["bias"][0]

    lam, h = problem.damping, 1e-5
    fd = (f(lam + h) - f(lam - h)) / (2 * h)
    assert abs(float(jax.grad(f)(lam)) - float(fd)) < 1e-6 * max(1.0, abs(float(fd)))


# ----------------------------------------------------------------------------- block CG


def test_block_cg_matches_the_dense_solve_with_repeated_and_zero_columns(x64):
    A, _ = matrix("spd")
    rng = np.random.default_rng(7)
    B = rng.normal(size=(6, 40))
    B[3] = B[1]          # a repeated query: its directions are dependent and get deflated
    B[4] = 0.0           # a zero query: answer 0, converged at once
    A, B = jnp.asarray(A), jnp.asarray(B)
    op = solvers.LinearOperator(lambda v: A @ v, symmetric=True, psd=True, like=B[0])
    for name, M in PRECONDITIONERS.items():
        s = solvers.BlockCG(preconditioner=M, max_steps=400)
        sol = jax.jit(lambda B: s.compute_many(s.init(op), B))(B)  # one program, not op by op
        assert bool(jnp.all(sol.converged)), (name, sol.failure_names())
        assert rel_err(sol.value, jnp.linalg.solve(A, B.T).T) < 1e-8, name
        true = jnp.linalg.norm(B - sol.value @ A, axis=1)
        assert bool(jnp.all(true <= 1e-10 * jnp.linalg.norm(B, axis=1) * (1 + 1e-6))), name
        assert bool(jnp.all(sol.value[4] == 0)) and int(sol.num_steps[4]) == 0
    single = solvers.BlockCG().compute(solvers.BlockCG().init(op), B[0])
    assert single.value.shape == (40,) and rel_err(single.value, jnp.linalg.solve(A, B[0])) < 1e-8


def test_block_cg_needs_fewer_steps_than_vmapped_cg_and_reports_indefinite(x64):
    A, rng = outliers(300, 20, 0.1)
    B = jnp.asarray(rng.normal(size=(16, 300)))
    op = solvers.LinearOperator(lambda v: A @ v, symmetric=True, psd=True, like=B[0])
    block = solvers.BlockCG().compute_many(solvers.BlockCG().init(op), B)
    looped = solvers.CG().compute_many(solvers.CG().init(op), B)
    assert bool(jnp.all(block.converged)) and bool(jnp.all(looped.converged))
    assert rel_err(block.value, jnp.linalg.solve(A, B.T).T) < 1e-8
    assert int(block.num_matvecs.max()) * 2 < int(looped.num_matvecs.max()), (block.num_matvecs, looped.num_matvecs)
    S, _ = matrix("indefinite")
    S = jnp.asarray(S)
    bad = solvers.BlockCG().compute_many(solvers.BlockCG().init(
        solvers.LinearOperator(lambda v: S @ v, symmetric=True, like=B[0, :40])), B[:3, :40])
    assert not bool(jnp.any(bad.converged)) and set(bad.failure_names()) == {"indefinite"}
    assert bool(jnp.all(jnp.isfinite(bad.value)))


def test_block_cg_follows_one_path_whatever_the_tolerance_and_names_a_spent_budget(x64):
    # a column that met a loose tolerance stays in the block (its products are paid for anyway),
    # so a looser rtol stops earlier on the same path, never later; queries of very different
    # difficulty share one block
    A, rng = outliers(200, 12, 0.05)
    B = jnp.asarray(rng.normal(size=(8, 200)) * np.logspace(-3, 3, 8)[:, None])
    op = solvers.LinearOperator(lambda v: A @ v, symmetric=True, psd=True, like=B[0])
    steps = []
    for rtol in (1e-2, 1e-4, 1e-6, 1e-9):
        # one refinement round: a column's CG residual is not monotone and may end above the
        # tolerance it met (rounding-dependent); the true-residual round certifies it
        s = solvers.BlockCG(rtol=rtol, restarts=1)
        sol = jax.jit(lambda B: s.compute_many(s.init(op), B))(B)
        true = jnp.linalg.norm(B - sol.value @ A, axis=1)
        assert bool(jnp.all(sol.converged)) and bool(jnp.all(true <= rtol * jnp.linalg.norm(B, axis=1)))
        steps.append(int(sol.num_steps.max()))
    assert steps == sorted(steps) and steps[0] < steps[-1], steps
    # stopped by max_steps before its refinement rounds ran out: "max_steps", not "precision"
    s = solvers.BlockCG(max_steps=steps[-1] // 2, restarts=0)
    sol = jax.jit(lambda B: s.compute_many(s.init(op), B))(B)
    assert set(sol.failure_names()) == {"max_steps"}


def test_block_cg_can_go_on_through_negative_curvature_and_certifies_the_answer(x64):
    S, _ = matrix("indefinite")
    S, B = jnp.asarray(S), jnp.asarray(np.random.default_rng(3).normal(size=(5, 40)))
    op = solvers.LinearOperator(lambda v: S @ v, symmetric=True, like=B[0])
    s = solvers.BlockCG(negative_curvature="continue")
    sol = jax.jit(lambda B: s.compute_many(s.init(op), B))(B)
    assert bool(jnp.all(sol.converged)), sol.failure_names()
    assert rel_err(sol.value, jnp.linalg.solve(S, B.T).T) < 1e-8
    true = jnp.linalg.norm(B - sol.value @ S, axis=1)
    assert bool(jnp.all(true <= 1e-10 * jnp.linalg.norm(B, axis=1) * (1 + 1e-6)))
    # a budget too small to converge is reported as such, never as converged
    short = solvers.BlockCG(negative_curvature="continue", max_steps=2)
    sol = jax.jit(lambda B: short.compute_many(short.init(op), B))(B)
    assert not bool(jnp.any(sol.converged)) and set(sol.failure_names()) == {"max_steps"}
    with pytest.raises(ValueError, match=r"solvers.BlockCG.*negative_curvature.*'go'"):
        solvers.BlockCG(negative_curvature="go")


def test_fallback_keeps_block_cg_answers_and_redoes_indefinite_ones_with_minres(x64):
    def many(solver, A, B):  # one compiled program per call (eager loops dispatch op by op)
        op = solvers.LinearOperator(lambda v: A @ v, symmetric=True, like=B[0])
        return jax.jit(lambda B: solver.compute_many(solver.init(op), B))(B)

    A, rng = outliers(60, 6, 0.1)
    B = jnp.asarray(rng.normal(size=(8, 60))).at[2].set(jnp.nan)     # one bad query among good ones
    auto = solvers.get_solver("auto")                                   # 8 queries: block CG first
    sol = many(auto, A, B)
    good = np.delete(np.arange(8), 2)
    assert bool(jnp.all(sol.converged[good])) and sol.failure_names()[2] == "nonfinite"
    assert rel_err(sol.value[good], jnp.linalg.solve(A, B[good].T).T) < 1e-8
    block = many(solvers.BlockCG(), A, B)   # positive definite: block CG's answer, never redone
    assert np.array_equal(np.asarray(sol.num_matvecs[good]), np.asarray(block.num_matvecs[good]))
    # indefinite: block CG stops, every column is redone by MINRES from zero, and the work adds up
    S, _ = matrix("indefinite")
    S = jnp.asarray(S)
    Bs = jnp.asarray(rng.normal(size=(4, 40)))
    chained = solvers.Fallback(solvers.BlockCG(), solvers.MINRES())
    sol, alone, first = (many(s, S, Bs) for s in (chained, solvers.MINRES(), solvers.BlockCG()))
    assert set(first.failure_names()) == {"indefinite"} and bool(jnp.all(sol.converged))
    assert rel_err(sol.value, jnp.linalg.solve(S, Bs.T).T) < 1e-8
    np.testing.assert_array_equal(sol.num_matvecs, alone.num_matvecs + first.num_matvecs)
    # fewer than min_batch queries (4 < 8, or one): straight to MINRES; without it, through CG first
    np.testing.assert_array_equal(many(auto, S, Bs).num_matvecs, alone.num_matvecs)
    single = lambda s: jax.jit(lambda b: s(lambda v: S @ v, b))(Bs[0])  # noqa: E731
    one, minres = single(auto), single(solvers.MINRES())
    two = single(solvers.Fallback(solvers.CG(), solvers.MINRES()))
    assert int(one.num_matvecs) == int(minres.num_matvecs) and bool(one.converged)
    assert bool(two.converged) and int(two.num_matvecs) > int(one.num_matvecs)
    assert rel_err(two.value, jnp.linalg.solve(S, Bs[0])) < 1e-8
    # the default on 8 queries of this strongly indefinite S: block CG goes on through the negative
    # curvature, and MINRES redoes what it did not certify (whether block CG stalls here depends on
    # rounding); a first stage out of steps hands its queries over too
    B8 = jnp.asarray(rng.normal(size=(8, 40)))
    sol, cont = many(auto, S, B8), many(solvers.BlockCG(negative_curvature="continue"), S, B8)
    assert bool(jnp.all(sol.converged)) and rel_err(sol.value, jnp.linalg.solve(S, B8.T).T) < 1e-8
    redone = ~np.asarray(cont.converged)
    np.testing.assert_array_equal(np.asarray(sol.num_matvecs)[~redone], np.asarray(cont.num_matvecs)[~redone])
    np.testing.assert_array_equal(np.asarray(sol.num_matvecs)[redone],
                                  np.asarray(cont.num_matvecs + many(solvers.MINRES(), S, B8).num_matvecs)[redone])
    # a block that stops converging after negative curvature stops as indefinite: b has a component
    # on the null space of this singular, indefinite D, so no residual gets below it
    D = jnp.diag(jnp.concatenate([jnp.array([-1.0, 0.0]), jnp.linspace(1.0, 10.0, 198)]))
    stuck = many(solvers.BlockCG(negative_curvature="continue"), D, jnp.ones((2, 200)))
    assert set(stuck.failure_names()) == {"indefinite"}
    assert int(stuck.num_matvecs.max()) < 3 * solvers.STAGNATION_STEPS
    short = solvers.BlockCG(negative_curvature="continue", max_steps=2)
    sol = many(solvers.Fallback(short, solvers.MINRES(), on=("max_steps",)), S, B8)
    assert bool(jnp.all(sol.converged)) and rel_err(sol.value, jnp.linalg.solve(S, B8.T).T) < 1e-8
    np.testing.assert_array_equal(sol.num_matvecs, many(solvers.MINRES(), S, B8).num_matvecs
                                  + many(short, S, B8).num_matvecs)


def test_fallback_derivatives_are_the_dense_ones(x64):
    """Through the MINRES branch (the block CG one is tested with block scores)."""
    S, _ = matrix("indefinite")
    S, Bs = jnp.asarray(S), jnp.asarray(np.random.default_rng(5).normal(size=(4, 40)))
    chained = solvers.Fallback(solvers.BlockCG(), solvers.MINRES())

    def f(t):
        op = solvers.LinearOperator(lambda v: t * (S @ v), symmetric=True, like=Bs[0])
        return chained.compute_many(chained.init(op), Bs).value.sum()

    dense = jax.grad(lambda t: jnp.linalg.solve(t * S, Bs.T).sum())(2.0)
    assert abs(float(jax.jit(jax.grad(f))(2.0)) - float(dense)) < 1e-8 * max(1.0, abs(float(dense)))


def test_fallback_names_a_bad_argument():
    with pytest.raises(TypeError, match=r"solvers.Fallback.*then.*'minres'.*a solver value"):
        solvers.Fallback(solvers.BlockCG(), "minres")
    with pytest.raises(ValueError, match=r"solvers.Fallback.*on.*'indefinit'.*FAILURES"):
        solvers.Fallback(solvers.BlockCG(), solvers.MINRES(), on=("indefinit",))


@pytest.mark.parametrize("method", ["if", "gif"])
def test_block_scores_match_dense_scores(method, x64):
    problem = make_problem("mlp", x64)
    mask = masks.random_mask(jax.random.key(4), problem.params, fraction=0.5)
    kw = dict(mask=mask, method=method, damping=problem.damping, return_info=True)
    args = (problem.loss, problem.params, problem.example_loss, (problem.x, problem.y),
            (problem.x[:7], problem.y[:7]), problem.x, problem.y)
    block = gifjax.influence_scores(*args, solver="block_cg", test_chunk_size=4, **kw)
    dense = gifjax.influence_scores(*args, solver="dense", **kw)
    assert bool(jnp.all(block.solution.converged)), block.solution.failure_names()
    assert rel_err(block.scores, dense.scores) < 1e-8
    vals = gifjax.self_influence(problem.loss, problem.params, problem.example_loss, (problem.x[:5], problem.y[:5]),
                                 problem.x, problem.y, mask=mask, method=method, damping=problem.damping,
                                 solver="block_cg")
    assert rel_err(vals, jnp.diagonal(dense.scores[:5, :5])) < 1e-8


def test_block_scores_are_differentiable(x64):
    problem = make_problem("mlp", x64)

    def f(lam):
        return gifjax.influence_scores(problem.loss, problem.params, problem.example_loss, (problem.x[:4], problem.y[:4]),
                                       (problem.x[:3], problem.y[:3]), problem.x, problem.y, method="if",
                                       solver="block_cg", damping=lam).sum()

    lam, h = problem.damping, 1e-5
    fd = (f(lam + h) - f(lam - h)) / (2 * h)
    assert abs(float(jax.grad(f)(lam)) - float(fd)) < 1e-6 * max(1.0, abs(float(fd)))


# ----------------------------------------------------------------------------- failures are visible


def _score_args(problem, test_x):
    return (problem.loss, problem.params, problem.example_loss, (problem.x[:6], problem.y[:6]),
            (test_x, problem.y[:4]), problem.x, problem.y)


def test_a_bad_test_example_gives_a_nan_column_and_a_warning_never_zeros(x64):
    problem = make_problem("mlp", x64)
    clean = gifjax.influence_scores(*_score_args(problem, problem.x[:4]), damping=problem.damping)
    bad_x = problem.x[:4].at[2, 0].set(jnp.nan)
    with pytest.warns(RuntimeWarning, match=r"influence_scores: 1 of 4 solves did not converge \(nonfinite: 1\)"):
        out = gifjax.influence_scores(*_score_args(problem, bad_x), damping=problem.damping, return_info=True)
    scores = np.asarray(out.scores)
    assert np.all(np.isnan(scores[:, 2]))
    np.testing.assert_allclose(np.delete(scores, 2, axis=1), np.delete(np.asarray(clean), 2, axis=1), rtol=1e-8)
    assert out.solution.failure_names()[2] == "nonfinite" and not bool(out.solution.converged[2])
    # a bad training example: a NaN row
    train_x = problem.x[:6].at[1, 0].set(jnp.inf)
    args = list(_score_args(problem, problem.x[:4]))
    args[3] = (train_x, problem.y[:6])
    rows = np.asarray(gifjax.influence_scores(*args, damping=problem.damping))
    assert np.all(np.isnan(rows[1])) and np.all(np.isfinite(np.delete(rows, 1, axis=0)))


def test_failed_solves_warn_and_self_influence_returns_diagnostics(x64):
    problem = make_problem("mlp", x64)
    ex = (problem.x[:5], problem.y[:5])
    with pytest.warns(RuntimeWarning, match=r"self_influence: 5 of 5 solves did not converge \(max_steps: 5\)"):
        out = gifjax.self_influence(problem.loss, problem.params, problem.example_loss, ex, problem.x, problem.y,
                                    solver=solvers.CG(max_steps=2), damping=problem.damping, return_info=True)
    assert out.scores.shape == (5,) and out.solution.failure_names() == ["max_steps"] * 5
    with pytest.raises(RuntimeError, match="did not converge"):
        gifjax.self_influence(problem.loss, problem.params, problem.example_loss, ex, problem.x, problem.y,
                              solver=solvers.CG(max_steps=2), damping=problem.damping, throw=True)
    # inside jit: no warning, the diagnostics travel in the result
    jitted = jax.jit(lambda p: gifjax.self_influence(problem.loss, p, problem.example_loss, ex, problem.x,
                                                     problem.y, solver=solvers.CG(max_steps=2),
                                                     damping=problem.damping, return_info=True))
    import warnings as _w
    with _w.catch_warnings():
        _w.simplefilter("error")
        assert not bool(jnp.any(jitted(problem.params).solution.converged))


def test_parallel_functions_warn_and_return_diagnostics(x64):
    problem = make_problem("mlp", x64)
    mesh = gifjax.parallel.make_mesh(queries=1)
    ex = (problem.x[:4], problem.y[:4])
    kw = dict(mesh=mesh, solver=solvers.CG(max_steps=2), damping=problem.damping)
    with pytest.warns(RuntimeWarning, match=r"parallel\.self_influence: 4 of 4 solves did not converge \(max_steps: 4\)"):
        out = gifjax.parallel.self_influence(problem.loss, problem.params, problem.example_loss, ex, problem.x,
                                             problem.y, return_info=True, **kw)
    assert out.scores.shape == (4,) and out.solution.failure_names() == ["max_steps"] * 4
    with pytest.warns(RuntimeWarning, match=r"parallel\.influence_scores: 4 of 4 solves did not converge"):
        scores = gifjax.parallel.influence_scores(problem.loss, problem.params, problem.example_loss, ex, ex,
                                                  problem.x, problem.y, **kw)
    assert scores.shape == (4, 4)


@pytest.mark.parametrize("magnitude", [1e20, 1e-25])
def test_right_hand_sides_whose_squared_norm_overflows_or_underflows_are_solved(magnitude):
    """float32: ‖b‖² of 1e20·b overflows and of 1e-25·b underflows; the solvers work on b/‖b‖."""
    rng = np.random.default_rng(5)
    Q, _ = np.linalg.qr(rng.normal(size=(20, 20)))
    A = jnp.asarray(Q @ np.diag(np.geomspace(1.0, 10.0, 20)) @ Q.T, jnp.float32)  # κ = 10: scale is the test
    b = jnp.asarray(rng.normal(size=20), jnp.float32)
    expected = np.linalg.solve(np.asarray(A, np.float64), np.asarray(b, np.float64))
    for solver in [solvers.CG(), solvers.MINRES(), solvers.LSTSQ(), solvers.LSMR()]:
        sol = solver(lambda v: A @ v, b * magnitude)
        assert bool(sol.converged), (type(solver).__name__, sol.failure_names())
        assert rel_err(np.asarray(sol.value, np.float64) / magnitude, expected) < 1e-4, type(solver).__name__


def test_dense_rejects_a_nan_rcond():
    with pytest.raises(ValueError, match=r"solvers\.Dense: bad `rcond`: got nan"):
        solvers.Dense(rcond=float("nan"))(lambda v: v, jnp.ones(3))


def test_a_summed_loss_with_chunk_size_is_refused_not_silently_off(x64):
    """chunk_size averages chunk products: a loss that sums over its batch would be off by the
    number of chunks (2× here) while the solve says converged."""
    problem = make_problem("mlp", x64)
    summed = lambda p, x, y: problem.loss(p, x, y) * x.shape[0]
    g = jax.tree_util.tree_map(jnp.ones_like, problem.params)
    with pytest.raises(ValueError, match=r"bad `loss_fn`: got a loss that changes from .* when its batch is "
                                         r"repeated; expected the mean loss"):
        gifjax.influence(summed, problem.params, g, problem.x, problem.y, chunk_size=12, damping=1.0)
    out = gifjax.influence(problem.loss, problem.params, g, problem.x, problem.y, chunk_size=12, damping=1.0,
                           method="if")
    assert bool(out.converged)
