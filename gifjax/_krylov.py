"""Lanczos and Golub–Kahan on flat vectors, with full reorthogonalisation (private).

The one Krylov-factorisation core, shared by :mod:`gifjax.lowrank`
(factorisations for many queries) and :mod:`gifjax.spectrum` (eigenvalues).
Breakdown (an invariant Krylov space) restarts from a random vector of the
operator's domain, orthogonalised against the basis, so m may go up to that
domain's dimension.
"""

from __future__ import annotations

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST


def orth(w, basis):
    # classical Gram–Schmidt twice ("twice is enough"): orthogonal to working precision
    # (c @ basis, not basis.T @ c: a transposed [m, p] operand is copied on every call)
    for _ in range(2):
        w = w - jnp.matmul(jnp.matmul(basis, w, precision=HIGHEST), basis, precision=HIGHEST)
    return w


def _breakdown_tol(dtype, m):
    return 100.0 * np.sqrt(m) * float(jnp.finfo(dtype).eps)


def _extend(w, basis, restart, tol):
    """Orthogonalise ``w`` against ``basis`` and normalise; restart on breakdown.

    Breakdown (‖w‖ lost to cancellation: the Krylov space is invariant) gives
    coefficient 0 and a fresh direction ``restart()`` (a random vector of the
    operator's domain), orthogonalised too.
    """
    before = jnp.linalg.norm(w)
    w = orth(w, basis)
    norm = jnp.linalg.norm(w)
    broke = norm <= tol * before

    def fresh(_):
        r = orth(restart(), basis)
        nr = jnp.linalg.norm(r)
        return jnp.where(nr > 0, r / jnp.where(nr > 0, nr, 1), 0)

    q = jax.lax.cond(broke, fresh, lambda _: w / jnp.where(broke, 1, norm), None)
    return q, jnp.where(broke, 0, norm), broke


def _restarts(key, support):
    """Restart direction j: a random normal vector on ``support`` (1 = the operator's domain).

    One vector is drawn from ``key``; direction j is its cyclic shift by j + 1
    (generic, and much cheaper to compile inside the loop than a new draw).
    """
    r = jax.random.normal(key, support.shape, support.dtype)
    return lambda j: (lambda: jnp.roll(r, j + 1) * support)


def lanczos(A, q0, num_steps, key, support):
    """m-step Lanczos with full reorthogonalisation on flat vectors."""
    p, m, dt = q0.shape[0], num_steps, q0.dtype
    tol = _breakdown_tol(dt, m)
    Q = jnp.zeros((m, p), dt)
    restart = _restarts(key, support)
    q, _, _ = _extend(q0, Q, restart(m), tol)

    def body(carry, j):
        Q, q = carry
        Q = Q.at[j].set(q)
        w = A(q)
        alpha = jnp.vdot(q, w, precision=HIGHEST)
        q_next, beta, _ = _extend(w, Q, restart(j), tol)
        return (Q, q_next), (alpha, beta)

    (Q, _), (alpha, beta) = jax.lax.scan(body, (Q, q), jnp.arange(m))
    T = jnp.diag(alpha) + jnp.diag(beta[:-1], 1) + jnp.diag(beta[:-1], -1)
    theta, S = jnp.linalg.eigh(T)
    vectors = jnp.matmul(S.T, Q, precision=HIGHEST)
    residuals = jnp.abs(beta[-1] * S[-1, :])
    return theta, vectors, None, residuals, m


def bidiagonalize(A, At, u0, num_steps, key, support_u, support_v):
    """m-step Golub–Kahan lower bidiagonalisation with full reorthogonalisation."""
    p, m, dt = u0.shape[0], num_steps, u0.dtype
    tol = _breakdown_tol(dt, m)
    key_u, key_v = jax.random.split(key)
    restart_u, restart_v = _restarts(key_u, support_u), _restarts(key_v, support_v)
    U = jnp.zeros((m + 1, p), dt)
    V = jnp.zeros((m, p), dt)
    u, _, _ = _extend(u0, U, restart_u(m), tol)
    U = U.at[0].set(u)
    v, a, _ = _extend(At(u), V, restart_v(m), tol)

    def body(carry, j):
        U, V, u, v, a = carry
        V = V.at[j].set(v)
        u_next, b, _ = _extend(A(v) - a * u, U, restart_u(j), tol)
        U = U.at[j + 1].set(u_next)
        v_next, a_next, _ = _extend(At(u_next) - b * v, V, restart_v(j), tol)
        return (U, V, u_next, v_next, a_next), (a, b)

    (U, V, _, _, a_last), (alpha, beta) = jax.lax.scan(body, (U, V, u, v, a), jnp.arange(m))
    B = jnp.zeros((m + 1, m), dt).at[jnp.arange(m), jnp.arange(m)].set(alpha)
    B = B.at[jnp.arange(1, m + 1), jnp.arange(m)].set(beta)
    P, sigma, Qt = jnp.linalg.svd(B, full_matrices=False)
    left = jnp.matmul(P.T, U, precision=HIGHEST)
    right = jnp.matmul(Qt, V, precision=HIGHEST)
    residuals = jnp.abs(a_last * P[-1, :])
    return sigma, left, right, residuals, 1 + 2 * m


def flat_op(op, unravel):
    return lambda x: jax.flatten_util.ravel_pytree(op(unravel(x)))[0]
