"""The retrain engine (private): vmapped, chunked retrains of a weighted objective."""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from .. import _checks, _repr
from .._chunks import map_in_chunks
from ._optimize import Newton, check_optimizer, default_gtol, minimize

# ----------------------------------------------------------------------------- retraining


@_repr.compact_repr()
class Retrained(NamedTuple):
    """What :func:`retrain` returns (leading axis k: one entry per weight vector).

    Attributes:
      params: retrained parameters, a pytree like ``init`` with a leading k
        axis (``None`` inside :class:`LOO` / :class:`LDS`, which keep only
        test losses).
      objective: [k] final value of the weighted objective.
      grad_norm: [k] final ‖∇_θ weighted objective‖₂ — the convergence
        evidence; compare with ``gtol``.
      num_steps: [k] optimiser steps taken.
      num_hvps: [k] Hessian-vector products used (:class:`Newton`; 0 for
        :class:`LBFGS`).
      converged: [k] bool, ``grad_norm <= gtol``.
      gtol: the tolerance used (resolved from the optimiser's ``None``).
      optimizer: the optimiser configuration.
    """

    params: Any
    objective: jax.Array
    grad_norm: jax.Array
    num_steps: jax.Array
    num_hvps: jax.Array
    converged: jax.Array
    gtol: Any
    optimizer: Any


@functools.lru_cache(maxsize=16)
def _retrain_program(weighted_loss_fn, example_loss_fn, chunk_size):
    """One jitted program per (objective, test loss, chunk size); jit then caches per shapes.

    Cached (16 entries) so repeated checks with the same functions compile
    once; the cache keeps those functions (and what they close over) alive.

    With ``example_loss_fn`` each retrain returns its test losses, not its
    parameters (memory stays O(k · n_test)).
    """
    def one(w, p0, init, data, optimizer, gtol, test):
        p0 = init if p0 is None else p0
        p, fv, gnorm, k, hvps = minimize(lambda q: weighted_loss_fn(q, w, *data), p0, optimizer,
                                         gtol)
        out = p if example_loss_fn is None else jax.vmap(example_loss_fn, (None, 0))(p, test)
        return out, fv, gnorm, k, hvps

    @jax.jit  # data and init are arguments, not constants baked into the program
    def run(weights, inits, init, data, optimizer, gtol, test):
        batched = jax.vmap(lambda c: one(*c, init, data, optimizer, gtol, test))
        return map_in_chunks(batched, (weights, inits), chunk_size, caller="evaluation.retrain",
                             arg="weights")

    return run


def retrain_map(fn, weighted_loss_fn, init, weights, data, optimizer, chunk_size,
                example_loss_fn=None, test_examples=None, inits=None):
    """Retrain once per row of ``weights`` (from ``init``, or per-row ``inits``), in chunks."""
    check_optimizer(fn, optimizer)
    gtol = default_gtol(optimizer.gtol, init)
    run = _retrain_program(weighted_loss_fn, example_loss_fn, chunk_size)
    out, fv, gnorm, k, hvps = run(weights, inits, init, data, optimizer, gtol, test_examples)
    return Retrained(out, fv, gnorm, k, hvps, gnorm <= gtol, gtol, optimizer)


def _check_weights(fn, weights, arg="weights"):
    w = jnp.asarray(weights)
    if w.ndim == 1:
        w = w[None]
    if w.ndim != 2 or w.shape[1] < 1 or not (jnp.issubdtype(w.dtype, jnp.floating) or w.dtype == bool):
        raise _checks.error(fn, arg, f"shape {w.shape}, dtype {w.dtype}",
                            "float or bool weights [n] or [k, n]",
                            "pass one weight per training example (1 keep, 0 remove), one row per "
                            "retrain.")
    return w


def check_chunk(fn, chunk_size):
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise _checks.error(fn, "chunk_size", repr(chunk_size), "a positive int",
                            "pass e.g. chunk_size=32 (retrains vmapped at once; lower it to save "
                            "memory).")


def retrain(weighted_loss_fn: Callable, init, weights, *data, optimizer=Newton(),
            chunk_size: int = 32) -> Retrained:
    r"""Minimise ``weighted_loss_fn(θ, w, *data)`` from ``init`` for every weight vector w.

        θ_w = argmin_θ weighted_loss_fn(θ, w, \*data)

    by a deterministic full-batch optimiser (:class:`Newton` or
    :class:`LBFGS`), ``jax.vmap``-ed over the rows of ``weights`` and run in
    chunks of ``chunk_size`` rows under ``lax.map``: one compile for all.

    Args:
      weighted_loss_fn: ``(params, weights [n], *data) -> scalar``; see the
        module docstring (:func:`weighted_objective` builds one).
      init: start parameters (a pytree; e.g. the trained θ̂ for a warm start).
      weights: [n] or [k, n] float or bool weights (0 removes an example).
      *data: passed to ``weighted_loss_fn`` unchanged.
      optimizer: :class:`Newton` (default) or :class:`LBFGS`.
      chunk_size: retrains per vmapped chunk (static).

    Returns:
      :class:`Retrained` with leading axis k (k = 1 for 1-D ``weights``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from gifjax import evaluation
      >>> x = jnp.array([1.0, 2.0, 4.0])
      >>> f = lambda w, wt, x: 0.5 * jnp.sum(wt * (w - x) ** 2) / jnp.sum(wt)
      >>> out = evaluation.retrain(f, jnp.zeros(()), jnp.array([[1.0, 1, 1], [1, 1, 0]]), x)
      >>> [round(v, 4) for v in out.params.tolist()], out.converged.tolist()
      ([2.3333, 1.5], [True, True])
    """
    fn = "evaluation.retrain"
    check_chunk(fn, chunk_size)
    w = _check_weights(fn, weights)
    return retrain_map(fn, weighted_loss_fn, init, w.astype(params_dtype(init)), data, optimizer,
                       chunk_size)


def weighted_objective(example_loss_fn: Callable, regularizer: Callable | None = None):
    r"""The weighted training objective Σ_i w_i ℓ(θ, z_i) / Σ_i w_i + R(θ).

    Returns ``f(params, weights, examples)`` with ``examples`` a pytree with
    leading axis n (as ``train_examples`` of :func:`gifjax.influence_scores`).
    With all weights 1 it is the mean loss + R, the objective whose Hessian
    influence uses: ``loss_fn = lambda p, ex: f(p, jnp.ones(n), ex)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from gifjax import evaluation
      >>> f = evaluation.weighted_objective(lambda w, z: (w - z) ** 2, lambda w: 0.0 * w)
      >>> float(f(jnp.zeros(()), jnp.array([1.0, 0.0]), jnp.array([2.0, 10.0])))
      4.0
    """
    def objective(params, weights, examples):
        losses = jax.vmap(example_loss_fn, (None, 0))(params, examples)
        out = jnp.sum(weights * losses) / jnp.sum(weights)
        return out if regularizer is None else out + regularizer(params)

    return objective


def params_dtype(params):
    return jnp.result_type(*jax.tree_util.tree_leaves(params))
