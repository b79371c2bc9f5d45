"""Solvers on explicit matrices: dense oracles, diagnostics, vmap/jit behaviour."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gifjax import solvers
from conftest import RTOL, rel_err

N = 12


def spd(dtype, cond=50.0, seed=0, n=N):
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(seed), (n, n), dtype))
    return (q * jnp.geomspace(1.0, cond, n).astype(dtype)) @ q.T


def rhs(dtype, seed=1, n=N):
    return jax.random.normal(jax.random.key(seed), (n,), dtype)


def masked_columns(A, k, seed=2):
    """A with all but k columns zeroed (GIF's H P) and the kept indices."""
    keep = np.sort(np.asarray(jax.random.permutation(jax.random.key(seed), A.shape[0])[:k]))
    P = jnp.zeros(A.shape[0], A.dtype).at[keep].set(1.0)
    return A * P[None, :], keep


def tight(dtype):
    return 1e-12 if dtype == jnp.float64 else 1e-6


def iterative(dtype):
    t = tight(dtype)
    return {
        "cg": solvers.CG(rtol=t, max_steps=200),
        "lstsq": solvers.LSTSQ(rtol=t, max_steps=400),
        "lissa": solvers.LiSSA(num_steps=2000 if dtype == jnp.float64 else 800),
        # float32 normal equations bottom out near eps·κ² (≈ 3e-4 relative at κ = 50)
        "richardson": solvers.Richardson(normalizer=1500.0, rtol=t if dtype == jnp.float64 else 1e-4,
                                         max_steps=60000),
    }


ALL = ["dense", "cg", "lstsq", "lissa", "richardson"]


def _make(name, dtype):
    return solvers.Dense() if name == "dense" else iterative(dtype)[name]


@pytest.mark.parametrize("name", ALL)
def test_symmetric_matches_solve(name, dtype):
    A, b = spd(dtype), rhs(dtype)
    sol = _make(name, dtype)(lambda x: A @ x, b)
    # Richardson iterates on A² (κ² = 2500): its float32 accuracy is O(eps·κ²).
    tol = max(RTOL[dtype], 30 * jnp.finfo(dtype).eps * 50.0**2) if name == "richardson" else RTOL[dtype]
    assert rel_err(sol.value, jnp.linalg.solve(A, b)) < tol
    assert bool(sol.converged) and sol.failure_names() == "none"
    assert int(sol.num_matvecs) >= 1 and sol.value.dtype == dtype


@pytest.mark.parametrize("name", ALL)
def test_least_squares_matches_lstsq(name, dtype):
    A, keep = masked_columns(spd(dtype, cond=8.0), k=5)
    b = rhs(dtype)
    sol = _make(name, dtype)(lambda x: A @ x, b, rmatvec=lambda y: A.T @ y, form="least_squares")
    expected = jnp.zeros(N, dtype).at[keep].set(jnp.linalg.lstsq(A[:, keep], b)[0])
    assert rel_err(sol.value, expected) < RTOL[dtype]
    # reported residual is the normal-equation residual of the returned value
    normal = jnp.linalg.norm(A.T @ (b - A @ sol.value))
    assert float(sol.residual_norm) == pytest.approx(float(normal), rel=0.05, abs=1e-5)


@pytest.mark.parametrize("form", ["least_squares", "min_norm"])
def test_lstsq_stops_at_the_precision_floor_instead_of_diverging(form, dtype):
    """With rtol=0 and a budget far past convergence, CGLS / Craig on a singular masked system
    used to lose orthogonality and blow up (float32: |x| ~ 1e10); they now stop at the precision
    floor and say that rtol=0 was unreachable (failure "precision", never "converged")."""
    A, keep = masked_columns(spd(dtype, cond=8.0), k=5)
    At = A.T
    b = rhs(dtype) if form == "least_squares" else jnp.zeros(N, dtype).at[keep].set(rhs(dtype)[keep])
    op, rop = (A, At) if form == "least_squares" else (At, A)
    sol = solvers.LSTSQ(rtol=0.0, max_steps=50 * N)(lambda x: op @ x, b, rmatvec=lambda y: rop @ y,
                                                    form=form)
    expected = (jnp.zeros(N, dtype).at[keep].set(jnp.linalg.lstsq(A[:, keep], b)[0])
                if form == "least_squares" else jnp.linalg.pinv(At) @ b)
    assert not bool(sol.converged) and sol.failure_names() == "precision"
    assert int(sol.num_steps) < 50 * N
    assert rel_err(sol.value, expected) < RTOL[dtype]


@pytest.mark.parametrize("name", ALL)
def test_min_norm_matches_pinv(name, dtype):
    A, keep = masked_columns(spd(dtype, cond=8.0), k=5)
    At = A.T  # wide system P A: 5 equations after masking rows
    b = jnp.zeros(N, dtype).at[keep].set(rhs(dtype)[keep])
    sol = _make(name, dtype)(lambda x: At @ x, b, rmatvec=lambda y: A @ y, form="min_norm")
    assert rel_err(sol.value, jnp.linalg.pinv(At) @ b) < RTOL[dtype]


def test_pytree_right_hand_sides(x64):
    A, b = spd(x64), rhs(x64)
    to_tree = lambda v: {"a": v[:5], "b": (v[5:7], v[7:].reshape(5, 1))}
    from_tree = lambda t: jnp.concatenate([t["a"], t["b"][0], t["b"][1].ravel()])
    for name in ALL:
        sol = _make(name, x64)(lambda t: to_tree(A @ from_tree(t)), to_tree(b))
        chex.assert_trees_all_equal_shapes_and_dtypes(sol.value, to_tree(b))
        assert rel_err(from_tree(sol.value), jnp.linalg.solve(A, b)) < 1e-8, name


@pytest.mark.parametrize("name", ["cg", "lstsq", "richardson"])
def test_vmap_equals_loop_and_stops_per_rhs(name, x64):
    A = spd(x64)
    evec = jnp.linalg.eigh(A)[1][:, 0]
    B = jnp.stack([evec, rhs(x64, 1), rhs(x64, 2)])  # an eigenvector converges in one step
    solver = _make(name, x64)
    if name == "richardson":  # 1e-12 is at the float64 floor of A² (eps·κ² ≈ 6e-13)
        solver = solvers.Richardson(normalizer=1500.0, rtol=1e-10, max_steps=60000)
    batched = jax.vmap(lambda b: solver(lambda x: A @ x, b))(B)
    for i in range(3):
        single = solver(lambda x: A @ x, B[i])
        np.testing.assert_allclose(batched.value[i], single.value, rtol=1e-8, atol=1e-10)
        # batched matmuls round differently, so the stopping step may shift by one
        assert abs(int(batched.num_steps[i]) - int(single.num_steps)) <= 1
    assert bool(jnp.all(batched.converged))
    if name != "richardson":
        # the eigenvector lane stops after a few steps (a refinement from the true residual
        # may add one), the others run on: each lane stops on its own test
        assert int(batched.num_steps[0]) <= 4 < int(batched.num_steps[1])


def test_non_converging_reports_max_steps(dtype):
    A, b = spd(dtype, cond=1e3), rhs(dtype)
    for solver in [solvers.CG(max_steps=2), solvers.LSTSQ(max_steps=2),
                   solvers.Richardson(normalizer=1e3, max_steps=3), solvers.LiSSA(num_steps=3)]:
        sol = solver(lambda x: A @ x, b)
        assert not bool(sol.converged)
        assert sol.failure_names() == "max_steps"
        assert bool(jnp.all(jnp.isfinite(sol.value)))


def test_cg_reports_indefinite_system(dtype):
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(0), (N, N), dtype))
    A = (q * jnp.linspace(-2.0, 5.0, N).astype(dtype)) @ q.T
    sol = solvers.CG(rtol=1e-10)(lambda x: A @ x, rhs(dtype))
    assert sol.failure_names() == "indefinite" and not bool(sol.converged)
    assert bool(jnp.all(jnp.isfinite(sol.value)))
    # LSTSQ handles the same symmetric indefinite (invertible) system
    ls = solvers.LSTSQ(rtol=tight(dtype), max_steps=500)(lambda x: A @ x, rhs(dtype))
    assert rel_err(ls.value, jnp.linalg.solve(A, rhs(dtype))) < 50 * RTOL[dtype]


def test_lissa_too_small_scale_reports_divergence(dtype):
    A, b = spd(dtype), rhs(dtype)
    sol = solvers.LiSSA(scale=10.0, num_steps=500)(lambda x: A @ x, b)  # λ_max/scale = 5 > 2
    assert sol.failure_names() == "diverged" and not bool(sol.converged)
    assert bool(jnp.all(jnp.isfinite(sol.value)))


def test_lissa_auto_scale_uses_power_iteration(x64):
    A, b = spd(x64, cond=20.0), rhs(x64)
    sol = solvers.LiSSA(num_steps=1500, num_power_steps=30)(lambda x: A @ x, b)
    assert bool(sol.converged) and rel_err(sol.value, jnp.linalg.solve(A, b)) < 1e-8
    assert int(sol.num_matvecs) == 1500 + 30 + 1
    lam = solvers.power_iteration(lambda x: A @ x, b, key=jax.random.key(0), num_steps=200)
    assert float(lam) == pytest.approx(20.0, rel=1e-3)


def test_lissa_damping_solves_damped_system(x64):
    A, b = spd(x64, cond=5.0), rhs(x64)
    sol = solvers.LiSSA(damping=0.5, num_steps=400, rtol=1e-9)(lambda x: A @ x, b)
    assert rel_err(sol.value, jnp.linalg.solve(A + 0.5 * jnp.eye(N), b)) < 1e-8


def test_richardson_grows_normalizer_until_it_converges(x64):
    A, b = spd(x64, cond=4.0), rhs(x64)  # needs c > λ_max(A²)/2 = 8
    sol = solvers.Richardson(normalizer=1.0, normalizer_step=2.0, rtol=1e-9, max_steps=5000)(
        lambda x: A @ x, b)
    assert bool(sol.converged) and rel_err(sol.value, jnp.linalg.solve(A, b)) < 1e-8


def test_nonfinite_operator_is_flagged(dtype):
    A, b = spd(dtype), rhs(dtype)
    bad = lambda x: jnp.where(jnp.abs(x) > 1e-3, A @ x * jnp.nan, A @ x)
    for solver in [solvers.CG(), solvers.LSTSQ(), solvers.Richardson(normalizer=100.0),
                   solvers.LiSSA(scale=60.0, num_steps=5), solvers.Dense()]:
        sol = solver(bad, b)
        assert not bool(sol.converged), type(solver).__name__
        assert sol.failure_names() in ("nonfinite", "diverged", "breakdown", "indefinite")
        assert bool(jnp.all(jnp.isfinite(sol.value))), type(solver).__name__


def test_traced_tolerances_do_not_retrace(x64):
    A, b = spd(x64), rhs(x64)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(solver, b):
        return solver(lambda x: A @ x, b)

    loose = run(solvers.CG(rtol=1e-2, max_steps=50), b)
    strict = run(solvers.CG(rtol=1e-12, max_steps=50), 2 * b)
    assert int(loose.num_steps) < int(strict.num_steps)
    chex.clear_trace_counter()


def test_jit_equals_eager(x64):
    A, b = spd(x64), rhs(x64)
    for name in ALL:
        solver = _make(name, x64)
        f = lambda b: solver(lambda x: A @ x, b).value
        np.testing.assert_allclose(jax.jit(f)(b), f(b), rtol=1e-9, atol=1e-12)


def test_bad_form_and_missing_transpose():
    A, b = spd(jnp.float32), rhs(jnp.float32)
    with pytest.raises(ValueError, match=r"gifjax\.solvers\.CG: bad `form`: got 'lsq'"):
        solvers.CG()(lambda x: A @ x, b, form="lsq")
    with pytest.raises(ValueError, match=r"solvers\.LSTSQ: bad `rmatvec`: got None"):
        solvers.LSTSQ()(lambda x: A @ x, b, form="least_squares")
    with pytest.raises(ValueError, match=r"bad `solver`: got 'gmres'; expected one of"):
        solvers.get_solver("gmres")
    with pytest.raises(ValueError, match=r"solvers\.LiSSA: bad `damping`: got -1"):
        solvers.LiSSA(damping=-1.0)(lambda x: A @ x, b)


# ----------------------------------------------------------------------------- Richardson, official mode


def _official_gif(H, g, index_list, *, tol, step, max_iter, normalizer=1.0, fif=False):
    """NumPy transcription of the official code's GIF (or FIF) solve on an explicit Hessian.

    The official ``generalized_influence`` divides both losses by c, so a
    Hessian product is (H / c) v and the gradient g / c; ``iphvp`` runs
    x ← v + x − P (H/c)(H/c) x from x = v = P (H/c)(g/c), abandons the attempt
    when, at an even count, the step norm exceeds the previous even count's
    (1e10 at first), and the outer loop then adds ``step`` to c and starts over.
    Returns (value on the target coordinates, total steps, final c).
    """
    p = H.shape[0]
    zero_mask = np.ones(p, bool)
    zero_mask[index_list] = False
    total = 0
    c = normalizer
    while True:
        grad = g / c
        if fif:
            grad = grad.copy()
            grad[zero_mask] = 0
        v = (H / c) @ grad
        v[zero_mask] = 0
        t = tol * len(index_list) ** 0.5
        diff, diff_old, current, count, out = t + 0.1, 1e10, v, 0, None
        while diff > t and count < max_iter:
            previous = current
            first = (H / c) @ previous
            if fif:
                first[zero_mask] = 0
            second = (H / c) @ first
            second[zero_mask] = 0
            current = v + previous - second
            diff = np.linalg.norm(current - previous)
            total += 1
            if count % 2 == 0:
                if diff > diff_old:
                    current = None
                    break
                diff_old = diff
            count += 1
        if current is not None:
            return current[index_list], total, c
        c += step


def _indefinite(seed=3, n=6):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
    return (q * np.array([-2.5, -0.7, 0.4, 1.0, 1.8, 3.0])) @ q.T, np.random.default_rng(seed + 1).normal(size=n)


@pytest.mark.parametrize("fif", [False, True])
@pytest.mark.parametrize("tol, max_iter", [(1e-30, 40), (1e-3, 500)])
def test_richardson_official_mode_matches_a_transcription_of_the_official_loop(x64, fif, tol, max_iter):
    H, g = _indefinite()
    keep = np.array([0, 2, 3, 5])
    ref, total, c = _official_gif(H, g, keep, tol=tol, step=0.5, max_iter=max_iter, fif=fif)
    assert c > 1.0 and total > max_iter if tol < 1e-20 else c > 1.0  # restarts happened
    P = np.zeros(6)
    P[keep] = 1.0
    Hj, gj, Pj = jnp.asarray(H), jnp.asarray(g), jnp.asarray(P)
    solver = solvers.Richardson(mode="official", normalizer=1.0, normalizer_step=0.5,
                                atol=tol * len(keep) ** 0.5, max_steps=max_iter, rtol=1e-13)
    if fif:  # FIF: the symmetric form on P H P
        sol = solver(lambda x: Pj * (Hj @ (Pj * x)), Pj * gj)
    else:    # GIF: least squares min ‖H P x − g‖
        sol = solver(lambda x: Hj @ (Pj * x), gj, rmatvec=lambda y: Pj * (Hj @ y), form="least_squares")
    np.testing.assert_allclose(np.asarray(sol.value)[keep], ref, rtol=1e-12, atol=1e-14)
    assert np.all(np.asarray(sol.value)[P == 0] == 0)
    assert int(sol.num_steps) == total
    assert int(sol.num_matvecs) == 2 * total + 3  # + final residual (2) + A b or Aᵀ b (1)
    if tol < 1e-20:  # a fixed K: not enough to converge here, and flagged so
        assert sol.failure_names() == "max_steps" and not bool(sol.converged)


def test_richardson_official_mode_fixed_budget_reaches_the_least_squares_answer(x64):
    H, g = _indefinite()
    keep = np.array([0, 2, 3, 5])
    P = jnp.zeros(6).at[keep].set(1.0)
    A = jnp.asarray(H) * P[None, :]
    sol = solvers.Richardson(mode="official", normalizer_step=0.5, max_steps=3000, rtol=1e-10)(
        lambda x: A @ x, jnp.asarray(g), rmatvec=lambda y: A.T @ y, form="least_squares")
    assert bool(sol.converged) and sol.failure_names() == "none"
    assert rel_err(sol.value, jnp.linalg.lstsq(A, jnp.asarray(g))[0]) < 1e-8


def test_richardson_official_mode_restart_limit_and_errors():
    A = jnp.diag(jnp.array([3.0, 1.0]))
    sol = solvers.Richardson(mode="official", normalizer_step=1e-3, max_restarts=2, max_steps=50)(
        lambda x: A @ x, jnp.ones(2))
    assert sol.failure_names() == "diverged" and not bool(sol.converged)
    assert bool(jnp.all(jnp.isfinite(sol.value)))
    with pytest.raises(ValueError, match=r"gifjax\.solvers\.Richardson: bad `mode`: got 'paper'"):
        solvers.Richardson(mode="paper")(lambda x: A @ x, jnp.ones(2))
    with pytest.raises(ValueError, match=r"gifjax\.solvers\.Richardson: bad `max_restarts`"):
        solvers.Richardson(mode="official", max_restarts=-1)(lambda x: A @ x, jnp.ones(2))
