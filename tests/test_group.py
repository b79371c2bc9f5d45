"""Second-order group influence (Basu et al. 2020) against its definition and against retraining."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gifjax
from gifjax import solvers

N, D, REG = 80, 4, 1e-2


def logistic_loss(w, X, y):
    z = X @ w[:-1] + w[-1]
    return jnp.mean(jnp.logaddexp(0.0, z) - y * z) + 0.5 * REG * w @ w


def newton(loss, w, *data, free=None, steps=60):
    """Retrain to the optimum (optionally over the coordinates ``free`` only)."""
    idx = np.arange(w.shape[0]) if free is None else free

    @jax.jit  # one compile per retrain, not an eager trace of grad and hessian per step
    def step(w, *data):
        g = jax.grad(loss)(w, *data)[idx]
        H = jax.hessian(loss)(w, *data)[np.ix_(idx, idx)]
        return w.at[idx].add(-jnp.linalg.solve(H, g))

    for _ in range(steps):
        w = step(w, *data)
    return w


@functools.lru_cache(maxsize=None)
def logistic():
    with jax.enable_x64(True):
        kx, ky = jax.random.split(jax.random.key(0))
        X = jax.random.normal(kx, (N, D), jnp.float64)
        y = (jax.random.uniform(ky, (N,)) < jax.nn.sigmoid(X @ jnp.array([2.0, -1.0, 0.5, 0.0]))) * 1.0
        w = newton(logistic_loss, jnp.zeros(D + 1), X, y)
        U = np.argsort(-np.asarray(X[:, 0] * (2 * y - 1)))[:16]  # a coherent, influential group (p = 0.2)
        keep = np.setdiff1d(np.arange(N), U)
        return X, y, w, U, keep


def test_matches_the_dense_second_order_expansion(x64):
    X, y, w, U, _ = logistic()
    out = gifjax.group_influence(logistic_loss, w, (X[U], y[U]), X, y, solver="dense")
    p = len(U) / N
    H = jax.hessian(logistic_loss)(w, X, y)
    H_U = jax.hessian(logistic_loss)(w, X[U], y[U])
    T = jax.jacfwd(jax.hessian(logistic_loss))(w, X, y)  # ∇³L, [i, j, k]
    d1 = p * jnp.linalg.solve(H, jax.grad(logistic_loss)(w, X[U], y[U]))
    d = d1 + jnp.linalg.solve(H, p * H_U @ d1 - 0.5 * jnp.einsum("ijk,j,k->i", T, d1, d1))
    np.testing.assert_allclose(out.first_order, d1, rtol=1e-10)
    np.testing.assert_allclose(out.delta, d, rtol=1e-10)
    np.testing.assert_allclose(out.correction, d - d1, rtol=1e-9)
    assert float(out.fraction) == p and all(bool(s.converged) for s in out.solutions)
    # … which are the Taylor coefficients of the removal path θ(ε) = argmin L_ε, where
    # L_ε = [Σ_S ℓ/n − ε Σ_U ℓ/n] / (1 − εp) + R: θ' = Δ₁ and ½θ'' = Δ − Δ₁ (finite differences)
    in_U = np.zeros(N)
    in_U[U] = 1.0

    def path(eps):
        def L(v):
            z = X @ v[:-1] + v[-1]
            ell = jnp.logaddexp(0.0, z) - y * z
            return (jnp.sum(ell) - eps * jnp.sum(ell * in_U)) / N / (1 - eps * p) + 0.5 * REG * v @ v
        return newton(L, w, steps=12)

    h = 1e-3
    up, mid, down = path(h), path(0.0), path(-h)
    np.testing.assert_allclose((up - down) / (2 * h), out.first_order, atol=1e-7)
    np.testing.assert_allclose((up - 2 * mid + down) / (2 * h * h), out.correction, atol=1e-6)


def test_second_order_beats_first_order_against_retraining(x64):
    X, y, w, U, keep = logistic()
    retrained = newton(logistic_loss, w, X[keep], y[keep])
    out = gifjax.group_influence(logistic_loss, w, (X[U], y[U]), X, y,
                                 solver=solvers.CG(rtol=1e-12))
    err1 = float(jnp.linalg.norm(w + out.first_order - retrained))
    err2 = float(jnp.linalg.norm(w + out.delta - retrained))
    assert err2 < 0.5 * err1, (err1, err2)  # measured: ≈ 0.36
    hess_only = gifjax.group_influence(logistic_loss, w, (X[U], y[U]), X, y, solver="dense",
                                       third_order=False)
    assert float(jnp.linalg.norm(w + hess_only.delta - retrained)) < err1
    # and the predicted change of a test loss follows
    test = lambda v: logistic_loss(v, X[:5] + 0.3, y[:5])
    true_change = float(test(retrained) - test(w))
    assert abs(float(test(w + out.delta) - test(w)) - true_change) < abs(
        float(test(w + out.first_order) - test(w)) - true_change)


def test_frozen_parameters_variant_against_restricted_retraining(x64):
    X, y, w, U, keep = logistic()
    free = np.array([0, 1, 4])  # two weights and the bias move; the rest are frozen
    mask = jnp.zeros(D + 1, bool).at[free].set(True)
    retrained = newton(logistic_loss, w, X[keep], y[keep], free=free)
    out = gifjax.group_influence(logistic_loss, w, (X[U], y[U]), X, y, method="fif", mask=mask,
                                 solver="dense")
    assert np.all(np.asarray(out.delta)[~np.asarray(mask)] == 0)
    err1 = float(jnp.linalg.norm(w + out.first_order - retrained))
    err2 = float(jnp.linalg.norm(w + out.delta - retrained))
    assert err2 < 0.5 * err1, (err1, err2)  # measured: ≈ 0.36


def test_quadratic_objective_is_the_two_term_neumann_series(x64):
    kx, kw = jax.random.split(jax.random.key(1))
    X = jax.random.normal(kx, (30, 3), jnp.float64)
    y = X @ jax.random.normal(kw, (3,), jnp.float64) + 0.1 * jnp.cos(jnp.arange(30.0))
    loss = lambda w, X, y: 0.5 * jnp.mean((X @ w - y) ** 2) + 0.05 * w @ w
    w = jnp.linalg.solve(jax.hessian(loss)(jnp.zeros(3), X, y), -jax.grad(loss)(jnp.zeros(3), X, y))
    U = jnp.arange(6)
    out = gifjax.group_influence(loss, w, (X[U], y[U]), X, y, solver="dense")
    p = 6 / 30
    H, H_U = jax.hessian(loss)(w, X, y), jax.hessian(loss)(w, X[U], y[U])
    step = jnp.linalg.solve(H, p * jax.grad(loss)(w, X[U], y[U]))
    np.testing.assert_allclose(out.delta, step + jnp.linalg.solve(H, p * H_U @ step), rtol=1e-10)
    # H⁻¹ once per term, p once: not the H⁻² / double-scaled variant
    wrong = step + p * p * jnp.linalg.solve(H @ H, H_U @ step)
    assert not np.allclose(out.delta, wrong, rtol=1e-3)
    # exact retraining is (H − p H_U)⁻¹ p g_U; second order is within O(p³)
    exact = jnp.linalg.solve(H - p * H_U, p * jax.grad(loss)(w, X[U], y[U]))
    assert float(jnp.linalg.norm(out.delta - exact)) < float(jnp.linalg.norm(out.first_order - exact))


def test_jit(x64):
    X, y, w, U, _ = logistic()
    f = jax.jit(lambda w: gifjax.group_influence(logistic_loss, w, (X[U], y[U]), X, y,
                                                 solver="dense").delta)
    np.testing.assert_allclose(f(w), gifjax.group_influence(logistic_loss, w, (X[U], y[U]), X, y,
                                                            solver="dense").delta, rtol=1e-12)


def test_input_errors(x64):
    X, y, w, U, _ = logistic()
    with pytest.raises(TypeError, match=r"gifjax\.group_influence: bad `removed`: got ArrayImpl; expected a non-empty tuple"):
        gifjax.group_influence(logistic_loss, w, X[U], X, y)
    with pytest.raises(ValueError, match=r"gifjax\.group_influence: bad `method`: got 'gif'; expected one of \['fif', 'if'\]"):
        gifjax.group_influence(logistic_loss, w, (X[U], y[U]), X, y, method="gif")
    with pytest.raises(ValueError, match=r"gifjax\.group_influence: bad `removed`: got 80 examples; expected fewer than the 80"):
        gifjax.group_influence(logistic_loss, w, (X, y), X, y)
