"""Gauss–Newton curvature and automatic damping against dense oracles (float64)."""

import functools

import chex
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import gifjax
from gifjax import masks, solvers
from conftest import _l2, _xent, cnn_apply, dense_estimate, make_problem, mlp_apply, rel_err

APPLY = {"mlp": mlp_apply, "cnn": cnn_apply}


def spec(kind):
    return gifjax.GGN(lambda p, x, y: APPLY[kind](p, x), lambda z, x, y: jnp.mean(_xent(z, y)),
                      regularizer=_l2)


@functools.lru_cache(maxsize=None)
def dense_ggn(kind):
    """Jᵀ H_out J + ∇²R from jax.jacfwd / jax.hessian on flattened parameters and outputs."""
    with jax.enable_x64(True):
        problem = make_problem(kind, jnp.float64)
        flat, unravel = jax.flatten_util.ravel_pytree(problem.params)
        outputs = lambda f: APPLY[kind](unravel(f), problem.x).ravel()
        J = jax.jacfwd(outputs)(flat)
        n_out = outputs(flat).shape[0]
        out_loss = lambda z: jnp.mean(_xent(z.reshape(problem.x.shape[0], -1), problem.y))
        H_out = jax.hessian(out_loss)(outputs(flat))
        H_reg = jax.hessian(lambda f: _l2(unravel(f)))(flat)
        assert H_out.shape == (n_out, n_out)
        return problem, np.asarray(J.T @ H_out @ J + H_reg)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_ggn_product_equals_dense_and_is_psd(kind, x64):
    problem, G = dense_ggn(kind)
    v = problem.unravel(jax.random.normal(jax.random.key(1), (G.shape[0],), jnp.float64))
    got = problem.flat(gifjax.ggn_product(spec(kind), problem.params, v, problem.x, problem.y, damping=0.3))
    np.testing.assert_allclose(got, G @ problem.flat(v) + 0.3 * problem.flat(v), rtol=1e-10, atol=1e-13)
    op = gifjax.linearize_ggn(spec(kind), problem.params, problem.x, problem.y)
    np.testing.assert_allclose(problem.flat(op(v)), G @ problem.flat(v), rtol=1e-10, atol=1e-13)
    w = np.linalg.eigvalsh(G)
    assert w.min() > 0  # PSD by construction (+ wd·I from the L2 term): positive definite here
    assert np.linalg.eigvalsh(np.asarray(problem.hessian)).min() < 0  # while H is indefinite
    np.testing.assert_allclose(G, G.T, atol=1e-12)


@pytest.mark.parametrize("method", gifjax.METHODS)
def test_estimators_and_scores_with_ggn_curvature_match_dense(method, x64):
    problem, G = dense_ggn("mlp")
    mask = masks.random_mask(jax.random.key(5), problem.params, fraction=0.4)
    idx = masks.flat_indices(mask)
    g = jax.grad(problem.loss)(problem.params, problem.x[:3], problem.y[:3])
    gf = np.asarray(problem.flat(g))

    def dense(gf):
        return dense_estimate(G, gf, method, idx)

    # CG works without damping: the GGN is positive definite where the Hessian is not
    solver = solvers.LSTSQ(rtol=1e-13) if method == "gif" else solvers.CG(rtol=1e-13)
    out = gifjax.influence(problem.loss, problem.params, g, problem.x, problem.y, mask=mask,
                           method=method, solver=solver, curvature=spec("mlp"))
    assert bool(out.converged)
    assert rel_err(problem.flat(out.delta), dense(gf)) < 1e-9
    train, test = (problem.x[:5], problem.y[:5]), (problem.x[5:8], problem.y[5:8])
    scores = gifjax.influence_scores(problem.loss, problem.params, problem.example_loss, train, test,
                                     problem.x, problem.y, mask=mask, method=method, solver=solver,
                                     curvature=spec("mlp"))
    grads = lambda ex: np.asarray(jax.vmap(problem.flat)(
        jax.vmap(jax.grad(problem.example_loss), (None, 0))(problem.params, ex)))
    expected = -np.stack([dense(gi) for gi in grads(train)]) @ grads(test).T
    assert rel_err(scores, expected) < 1e-9


def test_ggn_minibatch_operator_for_stochastic_lissa(x64):
    problem, _ = dense_ggn("mlp")
    op = gifjax.curvature_operator(problem.loss, problem.params, problem.x, problem.y,
                                   curvature=spec("mlp"), sample_size=8, damping=0.1)
    v = jax.tree_util.tree_map(jnp.ones_like, problem.params)
    key = jax.random.key(2)
    idx = jax.random.choice(key, 24, (8,), replace=False)
    expected = gifjax.ggn_product(spec("mlp"), problem.params, v, problem.x[idx], problem.y[idx], damping=0.1)
    chex.assert_trees_all_close(op(v, key=key), expected, rtol=1e-12)
    out = gifjax.influence(problem.loss, problem.params, v, problem.x, problem.y, method="if",
                           curvature=spec("mlp"), damping=0.5,
                           solver=solvers.LiSSA(num_steps=200, batch_size=12, key=key))
    assert bool(jnp.all(jnp.isfinite(problem.flat(out.delta))))


def hutchinson_by_hand(H, key, num_samples, idx=None):
    z = np.asarray(jax.random.rademacher(key, (num_samples, H.shape[0]), jnp.float64))
    if idx is not None:
        keep = np.zeros(H.shape[0], bool)
        keep[idx] = True
        z = z * keep
    return np.mean(np.einsum("si,ij,sj->s", z, H, z))


def test_auto_damping_is_deterministic_given_a_key_and_reported(x64):
    problem, _ = dense_ggn("mlp")
    H = np.asarray(problem.hessian)
    mask = masks.random_mask(jax.random.key(5), problem.params, fraction=0.4)
    idx = masks.flat_indices(mask)
    auto = gifjax.AutoDamping(0.5, num_samples=32, key=jax.random.key(3))
    resolve = lambda damping, method="if": float(gifjax.resolve_damping(
        problem.loss, problem.params, problem.x, problem.y, damping=damping, method=method, mask=mask))
    lam = resolve(auto)
    # exactly the Hutchinson estimate with these probes: fraction × (zᵀHz averaged) / p
    assert lam == pytest.approx(0.5 * hutchinson_by_hand(H, jax.random.key(3), 32) / H.shape[0], rel=1e-10)
    assert resolve(auto) == lam
    assert resolve(gifjax.AutoDamping(0.5, num_samples=32, key=jax.random.key(4))) != lam
    # many probes → the true mean eigenvalue; masked methods use the target block H_tt
    many = gifjax.AutoDamping(1.0, num_samples=4000, key=jax.random.key(0))
    assert resolve(many) == pytest.approx(np.trace(H) / H.shape[0], rel=0.1)
    assert resolve(many, "gif") == pytest.approx(np.trace(H[np.ix_(idx, idx)]) / len(idx), rel=0.1)
    # reported in the results, and the same as passing the number
    g = jax.grad(problem.loss)(problem.params, problem.x[:3], problem.y[:3])
    kw = dict(mask=mask, method="fif", solver="dense")
    out = gifjax.influence(problem.loss, problem.params, g, problem.x, problem.y, damping=auto, **kw)
    lam_fif = resolve(auto, "fif")
    assert float(out.damping) == pytest.approx(lam_fif, rel=1e-12)
    by_number = gifjax.influence(problem.loss, problem.params, g, problem.x, problem.y, damping=lam_fif, **kw)
    chex.assert_trees_all_close(out.delta, by_number.delta, rtol=1e-10)
    info = gifjax.influence_scores(problem.loss, problem.params, problem.example_loss,
                                   (problem.x[:4], problem.y[:4]), (problem.x[:2], problem.y[:2]),
                                   problem.x, problem.y, damping=auto, return_info=True, **kw)
    assert float(info.damping) == pytest.approx(lam_fif, rel=1e-12)


def test_auto_damping_under_jit_takes_a_traced_key(x64):
    problem, _ = dense_ggn("mlp")

    @jax.jit
    @chex.assert_max_traces(n=1)
    def lam(key, fraction):
        return gifjax.resolve_damping(problem.loss, problem.params, problem.x, problem.y,
                                      damping=gifjax.AutoDamping(fraction, num_samples=8, key=key))

    a, b = lam(jax.random.key(0), 0.1), lam(jax.random.key(1), 0.2)
    assert float(a) != float(b)
    eager = gifjax.resolve_damping(problem.loss, problem.params, problem.x, problem.y,
                                   damping=gifjax.AutoDamping(0.1, num_samples=8, key=jax.random.key(0)))
    assert float(a) == pytest.approx(float(eager), rel=1e-12)
    chex.clear_trace_counter()


def test_input_errors(x64):
    problem, _ = dense_ggn("mlp")
    g = jax.tree_util.tree_map(jnp.ones_like, problem.params)
    call = lambda **kw: gifjax.influence(problem.loss, problem.params, g, problem.x, problem.y,
                                         method="if", solver="dense", **kw)
    with pytest.raises(ValueError, match=r"gifjax\.influence: bad `curvature`: got 'fisher'; expected \"hessian\" or gifjax\.GGN"):
        call(curvature="fisher")
    with pytest.raises(ValueError, match=r"gifjax\.influence: bad `curvature\.output_loss`: got 3; expected a callable"):
        call(curvature=gifjax.GGN(mlp_apply, 3))
    with pytest.raises(ValueError, match=r"gifjax\.influence: bad `chunk_size`: got 4; expected None with a GGN curvature"):
        call(curvature=spec("mlp"), chunk_size=4)
    with pytest.raises(ValueError, match=r"gifjax\.influence: bad `damping\.fraction`: got -0\.1; expected a finite number >= 0"):
        call(damping=gifjax.AutoDamping(-0.1))
    with pytest.raises(ValueError, match=r"gifjax\.influence: bad `damping`: got 'auto'; expected a number >= 0 or gifjax\.AutoDamping"):
        call(damping="auto")
    with pytest.raises(ValueError, match=r"gifjax\.hutchinson_trace: bad `num_samples`: got 0; expected a positive int"):
        gifjax.hutchinson_trace(lambda v: v, jnp.zeros(3), key=jax.random.key(0), num_samples=0)
