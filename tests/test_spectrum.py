"""Spectrum tools: Lanczos / power eigenvalues and the negative-eigenvalue rate vs dense eigvalsh."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gifjax
from gifjax import masks, spectrum
from conftest import make_problem


@functools.lru_cache(maxsize=None)
def setup():
    with jax.enable_x64(True):
        problem = make_problem("mlp", jnp.float64)
        mask = masks.random_mask(jax.random.key(4), problem.params, fraction=0.5)
    H = np.asarray(problem.hessian, np.float64)
    idx = masks.flat_indices(mask)
    return problem, mask, np.linalg.eigvalsh(H), np.linalg.eigvalsh(H[np.ix_(idx, idx)])


def expected(w, which, k):
    key = {"largest": -w, "smallest": w, "magnitude": -np.abs(w)}[which]
    return w[np.argsort(key)[:k]]


def eig(eigensolver="lanczos", **kw):
    problem, *_ = setup()
    return spectrum.eigenvalues(problem.loss, problem.params, problem.x, problem.y, eigensolver=eigensolver, **kw)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("which", spectrum.WHICH)
def test_full_lanczos_matches_eigvalsh(which, masked, x64):
    problem, mask, w, w_tt = setup()
    ref = w_tt if masked else w
    out = eig(k=4, which=which, mask=mask if masked else None, num_steps=len(ref))
    np.testing.assert_allclose(out.values, expected(ref, which, 4), rtol=1e-9, atol=1e-11)
    assert out.values.shape == (4,) and int(out.num_matvecs) == len(ref)


def test_partial_lanczos_resolves_the_ends_with_honest_residual_bounds(x64):
    problem, _, w, _ = setup()
    out = eig(k=3, which="largest", num_steps=30, return_vectors=True)
    err = np.abs(np.asarray(out.values) - expected(w, "largest", 3))
    assert np.all(err < 1e-8 * np.abs(w).max())
    # |θ − λ| ≤ ‖A y − θ y‖ for the nearest λ; and the returned vectors satisfy it
    nearest = np.min(np.abs(np.asarray(out.values)[:, None] - w[None]), axis=1)
    assert np.all(nearest <= np.asarray(out.residuals) + 1e-12)
    Y = np.asarray(jax.vmap(problem.flat)(out.vectors))
    H = np.asarray(problem.hessian)
    np.testing.assert_allclose(np.linalg.norm(Y @ H - out.values[:, None] * Y, axis=1), out.residuals,
                               rtol=1e-3, atol=1e-10)


@pytest.mark.parametrize("which, masked", [("largest", False), ("smallest", False), ("magnitude", True)])
def test_power_iteration_matches_eigvalsh(which, masked, x64):
    _, mask, w, w_tt = setup()
    ref = w_tt if masked else w
    out = eig(eigensolver="power", k=2, which=which, mask=mask if masked else None, num_steps=400)
    np.testing.assert_allclose(out.values, expected(ref, which, 2), rtol=1e-6, atol=1e-8)
    assert np.all(np.asarray(out.residuals) < 1e-4)


def test_negative_rate_among_top_k_by_magnitude(x64):
    problem, mask, w, _ = setup()
    k = 20
    out = spectrum.negative_rate(problem.loss, problem.params, problem.x, problem.y, k=k,
                                 num_steps=len(w))
    top = expected(w, "magnitude", k)
    assert float(out.rate) == pytest.approx(np.mean(top < 0))
    assert 0 < float(out.rate) < 1  # this tiny cross-entropy MLP is non-convex
    # weight decay lifts the spectrum: the rate falls (to 0 once wd exceeds |λ_min|)
    wd = 2 * abs(w.min())
    heavy = lambda p, x, y: problem.loss(p, x, y) + 0.5 * wd * sum(
        jnp.sum(a**2) for a in jax.tree_util.tree_leaves(p))
    out_wd = spectrum.negative_rate(heavy, problem.params, problem.x, problem.y, k=k, num_steps=len(w))
    assert float(out_wd.rate) == 0.0
    # the Gauss–Newton matrix is PSD: no negative curvature at all
    from conftest import _l2, _xent, mlp_apply
    ggn = gifjax.GGN(lambda p, x, y: mlp_apply(p, x), lambda z, x, y: jnp.mean(_xent(z, y)), _l2)
    out_ggn = spectrum.negative_rate(problem.loss, problem.params, problem.x, problem.y, k=k,
                                     curvature=ggn, num_steps=len(w))
    assert float(out_ggn.rate) == 0.0


def test_jit_and_key_determinism(x64):
    problem, *_ = setup()
    f = jax.jit(lambda p, key: spectrum.eigenvalues(problem.loss, p, problem.x, problem.y, k=2,
                                                    num_steps=12, key=key).values)
    a = f(problem.params, jax.random.key(0))
    b = eig(k=2, num_steps=12, key=jax.random.key(0)).values
    np.testing.assert_allclose(a, b, rtol=1e-12)
    np.testing.assert_array_equal(f(problem.params, jax.random.key(0)), a)


def test_generic_eigsh_on_a_matrix():
    A = jnp.diag(jnp.array([4.0, -3.0, 1.0, 0.5, 0.1]))
    out = spectrum.eigsh(lambda v: A @ v, jnp.zeros(5), k=2, which="magnitude")
    np.testing.assert_allclose(out.values, [4.0, -3.0], rtol=1e-5)


def test_input_errors(x64):
    with pytest.raises(ValueError, match=r"gifjax\.spectrum\.eigsh: bad `which`: got 'top'; expected one of \['largest', 'magnitude', 'smallest'\]"):
        eig(k=2, which="top")
    with pytest.raises(ValueError, match=r"gifjax\.spectrum\.eigsh: bad `eigensolver`: got 'arnoldi'"):
        eig(k=2, eigensolver="arnoldi")
    with pytest.raises(ValueError, match=r"gifjax\.spectrum\.eigsh: bad `k`: got 60; expected an int in \[1, 51\]"):
        eig(k=60)
    _, mask, _, w_tt = setup()
    with pytest.raises(ValueError, match=rf"gifjax\.spectrum\.eigsh: bad `num_steps`: got 40; expected an int in \[2, {len(w_tt)}\]"):
        eig(k=2, mask=mask, num_steps=40)
    with pytest.raises(ValueError, match=r"gifjax\.spectrum\.eigenvalues: bad `curvature`: got 'fisher'"):
        eig(k=2, curvature="fisher")


def test_negative_rate_of_nan_parameters_is_nan_not_zero(x64):
    problem = make_problem("mlp", x64)
    bad = jax.tree_util.tree_map(lambda a: a.at[(0,) * a.ndim].set(jnp.nan), problem.params)
    out = spectrum.negative_rate(problem.loss, bad, problem.x, problem.y, k=3)
    assert np.isnan(float(out.rate))
