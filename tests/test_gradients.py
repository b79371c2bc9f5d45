"""Differentiable influence: implicit derivatives through every solver, against dense references.

The reference differentiates the *dense* answer (``jax.hessian`` of the loss,
``jnp.linalg.solve`` of the estimator's definition) in float64; gifjax's
derivatives go through ``lax.custom_linear_solve`` (one more solve, no
unrolled loop). Directional derivatives (``jax.jvp``) are compared with the
reference and with central finite differences; reverse mode (``jax.grad``)
must agree with forward mode along the same direction.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gifjax
from gifjax import lowrank, solvers
from conftest import make_problem, rel_err

# fif covers the symmetric path (with a mask: if/pif are its special cases), gif the normal one
METHODS = ("fif", "gif")


def _setup():
    p = make_problem("mlp", jnp.float64)
    flat0, unravel = jax.flatten_util.ravel_pytree(p.params)
    n = flat0.shape[0]
    idx = np.arange(0, n, 3)                                  # a third of the parameters
    mask = unravel(jnp.zeros(n, bool).at[idx].set(True))
    g = jax.grad(p.loss)(p.params, p.x[:3], p.y[:3])
    w = unravel(jnp.asarray(np.random.default_rng(0).normal(size=n)))  # the functional ⟨w, Δ⟩
    u = unravel(jnp.asarray(np.random.default_rng(1).normal(size=n)))  # the direction in θ
    return p, unravel, idx, mask, g, w, u


def _dense_delta(p, unravel, idx, method, params, g, lam):
    """Δ from the estimator's definition, differentiable (float64 oracle)."""
    flat, _ = jax.flatten_util.ravel_pytree(params)
    M = jax.hessian(lambda f: p.loss(unravel(f), p.x, p.y))(flat) + lam * jnp.eye(flat.shape[0])
    gf = jax.flatten_util.ravel_pytree(g)[0]
    if method == "if":
        return jnp.linalg.solve(M, gf)
    if method == "pif":
        return jnp.zeros_like(gf).at[idx].set(jnp.linalg.solve(M, gf)[idx])
    if method == "fif":
        return jnp.zeros_like(gf).at[idx].set(jnp.linalg.solve(M[jnp.ix_(idx, idx)], gf[idx]))
    A = M[:, idx]  # gif: the normal equations of min ‖A x − g‖
    return jnp.zeros_like(gf).at[idx].set(jnp.linalg.solve(A.T @ A, A.T @ gf))


def _solvers_for(count):
    return {"dense": "dense",
            "cg": solvers.CG(rtol=1e-13, max_steps=400),
            "lstsq": solvers.LSTSQ(rtol=1e-13, max_steps=400),
            "richardson": solvers.Richardson(rtol=1e-12, max_steps=6000),
            "lissa": solvers.LiSSA(num_steps=1500, rtol=1e-6),
            "lowrank": lowrank.LowRank(rank=count)}


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_jvp_and_grad_through_every_solver_match_the_dense_derivative(x64, method):
    _check_derivatives(method, _solvers_for(len(_setup()[2])))


@pytest.mark.parametrize("method,solver", [("fif", "cg"), ("gif", "lstsq")])
def test_jvp_and_grad_match_the_dense_derivative(x64, method, solver):
    """The default suite's share of the grid above (which CI runs as a slow test)."""
    _check_derivatives(method, {solver: _solvers_for(len(_setup()[2]))[solver]})


def _check_derivatives(method, table):
    p, unravel, idx, mask, g, w, u = _setup()
    lam = p.damping + 1.0  # well conditioned: LiSSA and Richardson reach 1e-10 in their budgets
    wf = jax.flatten_util.ravel_pytree(w)[0]

    def value(params, solver):
        delta = gifjax.influence(p.loss, params, g, p.x, p.y, method=method, mask=mask,
                                 solver=solver, damping=lam).delta
        return jnp.vdot(wf, jax.flatten_util.ravel_pytree(delta)[0])

    ref = lambda params: jnp.vdot(wf, _dense_delta(p, unravel, idx, method, params, g, lam))

    @jax.jit
    def all_derivatives(params):
        fwd = {k: jax.jvp(lambda th: value(th, s), (params,), (u,))[1] for k, s in table.items()}
        rev = {k: jax.tree_util.tree_map(jnp.vdot, jax.grad(lambda th: value(th, s))(params), u)
               for k, s in table.items()}
        return fwd, rev, jax.jvp(ref, (params,), (u,))[1]

    fwd, rev, want = all_derivatives(p.params)
    eps = 1e-6
    shift = lambda t: jax.tree_util.tree_map(lambda a, b: a + t * b, p.params, u)
    fd = jax.jit(lambda: (ref(shift(eps)) - ref(shift(-eps))) / (2 * eps))()
    assert rel_err(fd, want) < 1e-6  # the reference itself
    for name in table:
        got_rev = sum(jax.tree_util.tree_leaves(rev[name]))
        assert rel_err(fwd[name], want) < 1e-7, (name, float(fwd[name]), float(want))
        assert rel_err(got_rev, want) < 1e-7, (name, float(got_rev), float(want))


def test_derivatives_wrt_g_data_and_damping(x64):
    p, unravel, idx, mask, g, w, u = _setup()
    wf = jax.flatten_util.ravel_pytree(w)[0]
    lam0 = p.damping

    def value(g, x, lam, solver="lstsq"):
        d = gifjax.influence(p.loss, p.params, g, x, p.y, method="gif", mask=mask, solver=solver,
                             damping=lam).delta
        return jnp.vdot(wf, jax.flatten_util.ravel_pytree(d)[0])

    def ref(g, x, lam):
        flat = jax.flatten_util.ravel_pytree(p.params)[0]
        M = jax.hessian(lambda f: p.loss(unravel(f), x, p.y))(flat) + lam * jnp.eye(flat.shape[0])
        A, gf = M[:, idx], jax.flatten_util.ravel_pytree(g)[0]
        return jnp.vdot(wf[idx], jnp.linalg.solve(A.T @ A, A.T @ gf))

    solver = solvers.LSTSQ(rtol=1e-13, max_steps=400)
    got = jax.jit(jax.grad(lambda *a: value(*a, solver=solver), argnums=(0, 1, 2)))(g, p.x, lam0)
    want = jax.jit(jax.grad(ref, argnums=(0, 1, 2)))(g, p.x, lam0)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert rel_err(a, b) < 1e-7
    assert float(got[2]) != 0.0


def _dense_scores(p, unravel, params, lam, method, idx, train, test):
    flat = jax.flatten_util.ravel_pytree(params)[0]
    M = jax.hessian(lambda f: p.loss(unravel(f), p.x, p.y))(flat) + lam * jnp.eye(flat.shape[0])
    grads = lambda ex: jax.vmap(lambda e: jax.flatten_util.ravel_pytree(
        jax.grad(p.example_loss)(params, e))[0])(ex)
    G, T = grads(train), grads(test)
    if method == "if":
        D = jnp.linalg.solve(M, G.T)
    else:  # gif
        A = M[:, idx]
        D = jnp.zeros_like(G.T).at[idx].set(jnp.linalg.solve(A.T @ A, A.T @ G.T))
    return -(T @ D).T


@pytest.mark.parametrize("method,solver,with_self", [
    pytest.param("if", "cg", True, marks=pytest.mark.slow),
    pytest.param("gif", "lstsq", True, marks=pytest.mark.slow),
    ("gif", "lstsq", False)])
def test_influence_scores_and_self_influence_are_differentiable(x64, method, solver, with_self):
    p, unravel, idx, mask, g, w, u = _setup()
    lam = p.damping
    train, test = (p.x[:6], p.y[:6]), (p.x[6:9], p.y[6:9])
    solver = {"cg": solvers.CG(rtol=1e-13, max_steps=400),
              "lstsq": solvers.LSTSQ(rtol=1e-13, max_steps=400)}[solver]
    W = jnp.asarray(np.random.default_rng(2).normal(size=(6, 3)))

    def scores(params):
        S = gifjax.influence_scores(p.loss, params, p.example_loss, train, test, p.x, p.y,
                                    method=method, mask=mask, solver=solver, damping=lam,
                                    test_chunk_size=2, train_chunk_size=4)
        return jnp.sum(W * S)

    def selfs(params):
        return jnp.sum(gifjax.self_influence(p.loss, params, p.example_loss, train, p.x, p.y,
                                             method=method, mask=mask, solver=solver, damping=lam,
                                             example_chunk_size=4) * jnp.arange(6.0))

    ref_scores = lambda th: jnp.sum(W * _dense_scores(p, unravel, th, lam, method, idx, train, test))
    ref_selfs = lambda th: jnp.sum(jnp.diag(_dense_scores(p, unravel, th, lam, method, idx, train, train))
                                   * jnp.arange(6.0))
    @jax.jit
    def values_and_grads(params):
        return [(fn(params), ref(params), jax.grad(fn)(params), jax.grad(ref)(params))
                for fn, ref in ((scores, ref_scores), (selfs, ref_selfs))[:2 if with_self else 1]]

    for value, want_value, grad, want_grad in values_and_grads(p.params):
        assert rel_err(value, want_value) < 1e-8
        flat = lambda t: jax.flatten_util.ravel_pytree(t)[0]
        assert rel_err(flat(grad), flat(want_grad)) < 1e-7


def test_throw_raises_on_failure_and_not_on_success():
    loss = lambda w, x: 0.5 * jnp.mean((x @ w) ** 2)
    x, w = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)), jnp.float32), jnp.ones(3)
    g = jnp.array([1.0, -1.0, 0.5])
    with pytest.raises(RuntimeError, match=r"gifjax\.influence: the solve did not converge \(max_steps"):
        gifjax.influence(loss, w, g, x, method="if", damping=1e-3, solver=solvers.CG(max_steps=1),
                         throw=True)
    assert bool(gifjax.influence(loss, w, g, x, method="if", damping=1e-3, throw=True).converged)
    with pytest.raises(ValueError, match=r"bad `throw`: got True; expected throw=False inside jit"):
        jax.jit(lambda w: gifjax.influence(loss, w, g, x, method="if", throw=True).delta)(w)
