r"""Check influence estimates against ground truth: leave-one-out, LDS, mislabel detection.

Three standard checks, all pure functions that take the scores you computed
(e.g. with :func:`gifjax.influence_scores`) and return NamedTuples with the
numbers *and* the settings that produced them:

* :func:`leave_one_out` — retrain without each of k training points and
  correlate the predicted test-loss change with the actual one;
* :func:`linear_datamodeling_score` (LDS, Park et al. 2023) — retrain on M
  random subsets and rank-correlate predicted and actual test losses;
* :func:`mislabel_detection` — AUC and recall@x % of a ranking by
  self-influence (with :func:`flip_labels` to make the benchmark).

**Sign convention** (the README's): I[i, j] = −∇ℓ(test_j)ᵀ Δ(∇ℓ(train_i)),
Koh & Liang's *upweighting* sign, so removing training point i of n changes
test loss j by

    ΔL_j ≈ −I[i, j] / n,

and removing a set U changes it (to first order, additively) by
−Σ_{i∈U} I[i, j] / n.

**Retraining.** Ground truth needs retrained models, and the library cannot
guess how you train. You give a *weighted* training objective

    weighted_loss_fn(params, weights, *data) -> scalar,  weights ∈ [0, 1]^n,

equal to your training objective when all weights are 1 — normally
Σ_i w_i ℓ_i / Σ_i w_i + R(θ) (:func:`weighted_objective` builds exactly that
from a per-example loss). Weight 0 removes an example; every retrain is the
same compiled function of a weight vector, ``jax.vmap``-ed over retrains and
run in fixed-size chunks under ``lax.map`` (one compile for all of them).

The optimiser is deterministic and full-batch (:func:`retrain`):

* :class:`Newton` (default): Newton–CG with a backtracking (Armijo) line
  search — CG on the exact Hessian (``jax.linearize`` of the gradient, one
  linearisation per Newton step) and a fall-back to −∇ if CG's direction is
  not a descent direction. From the warm start θ̂ the leave-one-out optimum is
  O(1/n) away, so Newton converges quadratically in 2–4 steps to a gradient
  norm near rounding. This matters: the effect being measured is O(1/n), and
  a fixed budget of first-order steps leaves an optimisation error of the
  same size or larger (the retrains, not the influence estimate, would
  dominate the comparison).
* :class:`LBFGS`: ``optax.lbfgs`` with its zoom line search, for models
  whose Hessian products are too costly or that are retrained from scratch.

Both stop when ‖∇‖₂ ≤ ``gtol`` or after ``max_steps``; each result reports
the final gradient norm per retrain and ``converged`` — check it.

Statistics (:func:`rankdata`, :func:`pearson`, :func:`spearman`, :func:`auc`)
are plain ``jax.numpy`` (jit/vmap-able, no SciPy at run time); ties get
average ranks, as in ``scipy.stats.spearmanr`` and
``sklearn.metrics.roc_auc_score``.

References: Koh & Liang, *Understanding Black-box Predictions via Influence
Functions*, ICML 2017 (LOO check, Fig. 2); Park et al., *TRAK*, ICML 2023
(LDS); Ilyas et al., *Datamodels*, 2022.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import _checks, _tree
from . import solvers as _solvers
from ._chunks import map_in_chunks as _map_in_chunks

tree_map = jax.tree_util.tree_map

# ----------------------------------------------------------------------------- statistics


@jax.jit
def rankdata(x):
    """Ranks 1..n of a 1-D array, ties given their average rank (scipy's ``"average"``).

    rank(x_i) = (#{x_k < x_i} + #{x_k ≤ x_i} + 1) / 2, by two ``searchsorted``
    on the sorted array: O(n log n), jit- and vmap-able. NaNs are not
    supported (their rank is undefined).

    Example:
      >>> import jax.numpy as jnp
      >>> from gifjax import evaluation
      >>> evaluation.rankdata(jnp.array([3.0, 1.0, 3.0, 2.0])).tolist()
      [3.5, 1.0, 3.5, 2.0]
    """
    x = jnp.asarray(x)
    if x.ndim != 1:
        raise _checks.error("evaluation.rankdata", "x", f"shape {x.shape}", "a 1-D array",
                            "rank each row separately with jax.vmap(rankdata).")
    s = jnp.sort(x)
    lo = jnp.searchsorted(s, x, side="left")
    hi = jnp.searchsorted(s, x, side="right")
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.result_type(float)
    return (lo + hi + 1).astype(dtype) / 2


def _pair(fn, x, y):
    x, y = jnp.asarray(x), jnp.asarray(y)
    if x.shape != y.shape or x.ndim != 1 or x.shape[0] < 2:
        raise _checks.error(f"evaluation.{fn}", "x, y", f"shapes {x.shape} and {y.shape}",
                            "two 1-D arrays of one length n ≥ 2",
                            "pass matching vectors (flatten with .ravel(); per row: jax.vmap).")
    dtype = jnp.result_type(x, y, float)
    return x.astype(dtype), y.astype(dtype)


@jax.jit
def pearson(x, y):
    r"""Pearson correlation of two 1-D arrays.

        r = Σ (x_i − x̄)(y_i − ȳ) / sqrt(Σ (x_i − x̄)² · Σ (y_i − ȳ)²)

    NaN when either input is constant (as SciPy). jit- and vmap-able.

    Example:
      >>> import jax.numpy as jnp
      >>> from gifjax import evaluation
      >>> round(float(evaluation.pearson(jnp.array([1.0, 2, 3]), jnp.array([2.0, 4, 7]))), 4)
      0.9934
    """
    x, y = _pair("pearson", x, y)
    xc, yc = x - jnp.mean(x), y - jnp.mean(y)
    return jnp.sum(xc * yc) / jnp.sqrt(jnp.sum(xc * xc) * jnp.sum(yc * yc))


@jax.jit
def spearman(x, y):
    """Spearman rank correlation: :func:`pearson` of :func:`rankdata` (ties averaged).

    Equals ``scipy.stats.spearmanr(x, y).statistic``. jit- and vmap-able.

    Example:
      >>> import jax.numpy as jnp
      >>> from gifjax import evaluation
      >>> float(evaluation.spearman(jnp.array([1.0, 2, 3, 4]), jnp.array([1.0, 4, 9, 16])))
      1.0
    """
    x, y = _pair("spearman", x, y)
    return pearson(rankdata(x), rankdata(y))


@jax.jit
def auc(scores, labels):
    r"""Area under the ROC curve of ``scores`` for boolean ``labels`` (higher score = positive).

        AUC = (Σ_{i: positive} rank(s_i) − n₊(n₊ + 1)/2) / (n₊ n₋)

    the Mann–Whitney statistic with average ranks: the probability that a
    random positive outscores a random negative, ties counted ½ — equal to
    ``sklearn.metrics.roc_auc_score``. NaN if one class is empty.

    Example:
      >>> import jax.numpy as jnp
      >>> from gifjax import evaluation
      >>> float(evaluation.auc(jnp.array([0.9, 0.1, 0.5, 0.5]), jnp.array([True, False, True, False])))
      0.875
    """
    scores, labels = jnp.asarray(scores), jnp.asarray(labels)
    if scores.ndim != 1 or labels.shape != scores.shape:
        raise _checks.error("evaluation.auc", "labels", f"shape {labels.shape} (scores {scores.shape})",
                            "1-D scores and labels of one shape",
                            "pass one boolean label per score.")
    pos = labels.astype(bool)
    r = rankdata(scores)
    n_pos = jnp.sum(pos).astype(r.dtype)
    n_neg = pos.shape[0] - n_pos
    return (jnp.sum(jnp.where(pos, r, 0)) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


# ----------------------------------------------------------------------------- optimisers


@_tree.pytree_dataclass(static=("max_steps", "cg_max_steps", "max_backtracks"))
class Newton:
    r"""Newton–CG with backtracking, the default retraining optimiser of :func:`retrain`.

    Step k: solve (H + λI) d = −∇f(θ_k) by CG (``cg_rtol``, ``cg_max_steps``;
    H by ``jax.linearize`` of ∇f at θ_k), use −∇f if d is not a descent
    direction, then θ_{k+1} = θ_k + t d with t the first of 1, ½, ¼, … (at
    most ``max_backtracks`` halvings) meeting Armijo's
    f(θ_k + t d) ≤ f(θ_k) + 10⁻⁴ t ∇fᵀd (+ a rounding slack of 10 ε |f|).
    Stops when ‖∇f‖₂ ≤ ``gtol`` or after ``max_steps`` steps.

    Fields: ``max_steps`` (static), ``gtol`` (traced; ``None``: 1e-9 in
    float64, 1e-5 in float32), ``cg_rtol`` (traced), ``cg_max_steps``
    (static; ``None``: the number of parameters), ``damping`` λ (traced;
    it changes the steps, not the optimum they converge to — keep 0 for
    convex objectives, where it only slows convergence), ``max_backtracks``
    (static).

    Warning:
      Each step costs up to ``cg_max_steps`` Hessian-vector products; for
      large models prefer :class:`LBFGS`. On non-convex objectives CG stops
      at negative curvature and the line search keeps descent, but the
      optimum reached is a local one.
    """

    max_steps: int = 20
    gtol: Any = None
    cg_rtol: Any = 1e-6
    cg_max_steps: int | None = None
    damping: Any = 0.0
    max_backtracks: int = 30


@_tree.pytree_dataclass(static=("max_steps", "memory_size", "max_linesearch_steps"))
class LBFGS:
    """``optax.lbfgs`` (zoom line search) as a retraining optimiser of :func:`retrain`.

    Stops when ‖∇f‖₂ ≤ ``gtol`` (traced; ``None``: 1e-9 in float64, 1e-5 in
    float32) or after ``max_steps`` (static). ``memory_size`` and
    ``max_linesearch_steps`` (static) are passed to optax.
    """

    max_steps: int = 1000
    gtol: Any = None
    memory_size: int = 10
    max_linesearch_steps: int = 30


OPTIMIZERS = (Newton, LBFGS)


def _default_gtol(gtol, params):
    if gtol is not None:
        return gtol
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(params))
    return 1e-9 if dtype == jnp.float64 else 1e-5


def _newton(f, p0, cfg: Newton, gtol):
    value_and_grad = jax.value_and_grad(f)
    f0, g0 = value_and_grad(p0)
    cg = _solvers.CG(rtol=cfg.cg_rtol, max_steps=cfg.cg_max_steps)
    eps = jnp.finfo(jnp.result_type(f0)).eps

    def cond(s):
        k, _, _, g, _ = s
        return (k < cfg.max_steps) & (_tree.norm(g) > gtol)

    def body(s):
        k, p, fv, g, hvps = s
        _, hv = jax.linearize(jax.grad(f), p)
        sol = cg.symmetric(lambda v: _tree.axpy(cfg.damping, v, hv(v)), _tree.scale(-1.0, g))
        slope = _tree.vdot(g, sol.value)
        bad = ~(slope < 0) | ~_tree.all_finite(sol.value)
        d = _tree.where(bad, _tree.scale(-1.0, g), sol.value)
        slope = jnp.where(bad, -_tree.vdot(g, g), slope)
        slack = 10 * eps * jnp.abs(fv)
        accept = lambda t, ft: ft <= fv + 1e-4 * t * slope + slack  # NaN fails: backtrack

        def ls_cond(ls):
            t, ft, i = ls
            return (i < cfg.max_backtracks) & ~accept(t, ft)

        def ls_body(ls):
            t, _, i = ls
            t = t / 2
            return t, f(_tree.axpy(t, d, p)), i + 1

        one = jnp.ones((), slope.dtype)
        t, _, _ = jax.lax.while_loop(ls_cond, ls_body, (one, f(_tree.axpy(one, d, p)), 0))
        p_new = _tree.axpy(t, d, p)
        f_new, g_new = value_and_grad(p_new)
        return k + 1, p_new, f_new, g_new, hvps + sol.num_matvecs

    k, p, fv, g, hvps = jax.lax.while_loop(cond, body, (jnp.int32(0), p0, f0, g0, jnp.int32(0)))
    return p, fv, _tree.norm(g), k, hvps


def _lbfgs(f, p0, cfg: LBFGS, gtol):
    opt = optax.lbfgs(memory_size=cfg.memory_size, linesearch=optax.scale_by_zoom_linesearch(
        max_linesearch_steps=cfg.max_linesearch_steps))
    value_and_grad = optax.value_and_grad_from_state(f)

    def cond(s):
        k, _, _, gnorm = s
        return (k < cfg.max_steps) & (gnorm > gtol)

    def body(s):
        k, p, state, _ = s
        value, grad = value_and_grad(p, state=state)
        updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=f)
        p = optax.apply_updates(p, updates)
        return k + 1, p, state, optax.tree_utils.tree_norm(optax.tree_utils.tree_get(state, "grad"))

    gnorm0 = _tree.norm(jax.grad(f)(p0))
    k, p, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), p0, opt.init(p0), gnorm0))
    fv, g = jax.value_and_grad(f)(p)  # recomputed: the stopping norm, reported honestly
    return p, fv, _tree.norm(g), k, jnp.int32(0)


def _minimize(f, p0, optimizer, gtol):
    if isinstance(optimizer, Newton):
        return _newton(f, p0, optimizer, gtol)
    return _lbfgs(f, p0, optimizer, gtol)


def _check_optimizer(fn, optimizer):
    if not isinstance(optimizer, OPTIMIZERS):
        raise _checks.error(fn, "optimizer", repr(optimizer),
                            "gifjax.evaluation.Newton(...) or gifjax.evaluation.LBFGS(...)",
                            "pass optimizer=evaluation.Newton() (small / convex models) or "
                            "evaluation.LBFGS(max_steps=...) (large or non-convex ones).",
                            kind=TypeError)
    if not isinstance(optimizer.max_steps, int) or optimizer.max_steps < 1:
        raise _checks.error(fn, "optimizer.max_steps", repr(optimizer.max_steps), "a positive int",
                            "pass e.g. Newton(max_steps=20).")
    _checks.check_nonnegative(fn, "optimizer.gtol", optimizer.gtol)


# ----------------------------------------------------------------------------- retraining


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
        p, fv, gnorm, k, hvps = _minimize(lambda q: weighted_loss_fn(q, w, *data), p0, optimizer,
                                          gtol)
        out = p if example_loss_fn is None else jax.vmap(example_loss_fn, (None, 0))(p, test)
        return out, fv, gnorm, k, hvps

    @jax.jit  # data and init are arguments, not constants baked into the program
    def run(weights, inits, init, data, optimizer, gtol, test):
        batched = jax.vmap(lambda c: one(*c, init, data, optimizer, gtol, test))
        return _map_in_chunks(batched, (weights, inits), chunk_size, caller="evaluation.retrain",
                              arg="weights")

    return run


def _retrain_map(fn, weighted_loss_fn, init, weights, data, optimizer, chunk_size,
                 example_loss_fn=None, test_examples=None, inits=None):
    """Retrain once per row of ``weights`` (from ``init``, or per-row ``inits``), in chunks."""
    _check_optimizer(fn, optimizer)
    gtol = _default_gtol(optimizer.gtol, init)
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


def _check_chunk(fn, chunk_size):
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise _checks.error(fn, "chunk_size", repr(chunk_size), "a positive int",
                            "pass e.g. chunk_size=32 (retrains vmapped at once; lower it to save "
                            "memory).")


def retrain(weighted_loss_fn: Callable, init, weights, *data, optimizer=Newton(),
            chunk_size: int = 32) -> Retrained:
    r"""Minimise ``weighted_loss_fn(θ, w, *data)`` from ``init`` for every weight vector w.

        θ_w = argmin_θ weighted_loss_fn(θ, w, *data)

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
    _check_chunk(fn, chunk_size)
    w = _check_weights(fn, weights)
    return _retrain_map(fn, weighted_loss_fn, init, w.astype(_dtype(init)), data, optimizer,
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


def _dtype(params):
    return jnp.result_type(*jax.tree_util.tree_leaves(params))


def _check_scores(fn, scores, n_test):
    """Scores as {name: [n, n_test] array} (a bare array becomes {None: it}); n shared."""
    named = scores if isinstance(scores, dict) else {None: scores}
    out, sizes = {}, set()
    for name, sc in named.items():
        arg = "scores" if name is None else f"scores[{name!r}]"
        s = jnp.asarray(sc)
        if s.ndim != 2 or s.shape[1] != n_test or not jnp.issubdtype(s.dtype, jnp.floating):
            raise _checks.error(fn, arg, f"shape {s.shape}, dtype {s.dtype}",
                                f"float influence scores [n_train, {n_test}] (one column per test "
                                "example)", "pass gifjax.influence_scores(...) over the whole "
                                "training set and these test examples.")
        out[name] = s
        sizes.add(s.shape[0])
    if len(sizes) != 1:
        raise _checks.error(fn, "scores", f"score matrices with {sorted(sizes)} rows",
                            "one number of training examples n for all",
                            "score every method on the same training set.")
    return out, sizes.pop()


def _unwrap(results):
    return results[None] if list(results) == [None] else results


# ----------------------------------------------------------------------------- leave-one-out


class LOO(NamedTuple):
    """What :func:`leave_one_out` returns.

    Attributes:
      removed: [k] the removed training indices.
      predicted: [k, n_test] predicted change of each test loss, −I[i, j]/n.
      actual: [k, n_test] ℓ(test_j; θ₋ᵢ) − ℓ(test_j; θ_ref).
      pearson, spearman: correlations over all k·n_test pairs (pooled).
      pearson_per_test, spearman_per_test: [n_test] correlations across the
        k removals, one per test example (Koh & Liang's plot is one of these).
      retrain: :class:`Retrained` diagnostics of the k retrains (``params``
        is ``None``).
      reference: :class:`Retrained` diagnostics (scalars; ``params`` is
        ``None``) of the all-weights-1 retrain θ_ref from the same start
        with the same optimiser: it
        absorbs any residual optimisation of the given θ̂, so the actual
        changes contain only the removal.
    """

    removed: jax.Array
    predicted: jax.Array
    actual: jax.Array
    pearson: jax.Array
    spearman: jax.Array
    pearson_per_test: jax.Array
    spearman_per_test: jax.Array
    retrain: Retrained
    reference: Retrained


def _check_removed(fn, removed, n):
    r = np.asarray(removed)
    if r.ndim != 1 or r.size == 0 or not np.issubdtype(r.dtype, np.integer) or r.min() < 0 or r.max() >= n:
        got = f"shape {r.shape}, dtype {r.dtype}" + (
            f", values in [{r.min()}, {r.max()}]" if r.size and np.issubdtype(r.dtype, np.number) else "")
        raise _checks.error(fn, "removed", got, f"a non-empty 1-D int array of indices in [0, {n})",
                            "pass the training indices to leave out, e.g. np.arange(50).")
    if r.size < 2:
        raise _checks.error(fn, "removed", f"{r.size} index", "at least 2 indices",
                            "remove at least 2 points so that a correlation is defined.")
    return r


@jax.jit
def _loo_stats(scores, removed, losses):
    actual = losses[1:] - losses[:1]
    predicted = (-scores[removed] / scores.shape[0]).astype(actual.dtype)
    per_test = (jax.vmap(pearson, (1, 1))(predicted, actual),
                jax.vmap(spearman, (1, 1))(predicted, actual))
    return (predicted, actual, pearson(predicted.ravel(), actual.ravel()),
            spearman(predicted.ravel(), actual.ravel())) + per_test


def leave_one_out(weighted_loss_fn: Callable, params, scores, removed, example_loss_fn: Callable,
                  test_examples, *data, optimizer=Newton(), chunk_size: int = 32):
    r"""Leave-one-out check: predicted vs actual test-loss change when one training point goes.

    For each i in ``removed`` (k indices of n), retrain from θ̂ = ``params``
    with w = 1 − e_i, then

        predicted[i, j] = −I[i, j] / n,
        actual[i, j]    = ℓ(test_j; θ₋ᵢ) − ℓ(test_j; θ_ref),

    θ_ref the all-ones retrain from θ̂ (equal to θ̂ when it is converged), and
    Pearson / Spearman between them, pooled over all pairs and per test
    example. All k + 1 retrains share one compile (see :func:`retrain`).

    Args:
      weighted_loss_fn: ``(params, weights [n], *data) -> scalar``, your
        training objective with example weights (module docstring); at
        all-ones weights it must be the ``loss_fn`` the scores came from.
      params: the trained θ̂ (the warm start).
      scores: [n, n_test] influence scores I of *all* n training examples
        (rows picked by ``removed``), e.g. :func:`gifjax.influence_scores`;
        or a dict ``{name: scores}`` to compare several estimators against
        one set of retrains (then a dict ``{name: LOO}`` is returned).
      removed: [k] int training indices to leave out (k ≥ 2).
      example_loss_fn: ``(params, example) -> scalar`` for one test example.
      test_examples: pytree with leading axis n_test.
      *data: passed to ``weighted_loss_fn``.
      optimizer: :class:`Newton` (default) or :class:`LBFGS`.
      chunk_size: retrains per vmapped chunk (static).

    Returns:
      :class:`LOO` (check ``retrain.converged`` and ``retrain.grad_norm``),
      or a dict of them when ``scores`` is a dict.

    Example:
      >>> import jax, jax.numpy as jnp, gifjax
      >>> from gifjax import evaluation
      >>> X = jax.random.normal(jax.random.key(0), (40, 3)); y = X @ jnp.ones(3) + X[:, 0] ** 2
      >>> ex = lambda w, xy: 0.5 * (xy[0] @ w - xy[1]) ** 2
      >>> f = evaluation.weighted_objective(ex, lambda w: 0.05 * w @ w)
      >>> loss = lambda w, X, y: f(w, jnp.ones(40), (X, y))
      >>> w = evaluation.retrain(f, jnp.zeros(3), jnp.ones(40), (X, y)).params[0]
      >>> I = gifjax.influence_scores(loss, w, ex, (X, y), (X[:5], y[:5]), X, y)
      >>> out = evaluation.leave_one_out(f, w, I, jnp.arange(20), ex, (X[:5], y[:5]), (X, y))
      >>> bool(out.pearson > 0.95), bool(out.retrain.converged.all())
      (True, True)

    Warning:
      Use float64 (``jax.enable_x64``): the changes are O(1/n) and float32
      rounding in the retrains is of the same order.
    """
    fn = "evaluation.leave_one_out"
    _check_chunk(fn, chunk_size)
    n_test = _checks.leading_size(fn, "test_examples", test_examples)
    scores, n = _check_scores(fn, scores, n_test)
    removed = _check_removed(fn, removed, n)
    weights = np.ones((1 + removed.size, n), _dtype(params))
    weights[1 + np.arange(removed.size), removed] = 0
    out = _retrain_map(fn, weighted_loss_fn, params, weights, data, optimizer, chunk_size,
                       example_loss_fn, test_examples)
    info = lambda sl: out._replace(params=None, objective=out.objective[sl],
                                   grad_norm=out.grad_norm[sl], num_steps=out.num_steps[sl],
                                   num_hvps=out.num_hvps[sl], converged=out.converged[sl])
    retrained, reference = info(slice(1, None)), info(0)
    return _unwrap({name: LOO(jnp.asarray(removed), *_loo_stats(s, removed, out.params),
                              retrained, reference) for name, s in scores.items()})


# ----------------------------------------------------------------------------- LDS


class LDS(NamedTuple):
    """What :func:`linear_datamodeling_score` returns.

    Attributes:
      score: mean over test examples of ``per_query``.
      per_query: [n_test] Spearman, across the M subsets, of predicted vs
        actual test loss.
      predicted: [M, n_test] L_j(θ̂) − Σ_{i∉S} I[i, j] / n.
      actual: [M, n_test] test loss of the model retrained on subset S.
      subsets: [M, n] bool, True = kept.
      alpha: fraction of the training set kept (each subset has ⌊αn⌋).
      key: the key the subsets (and per-subset inits) were drawn from.
      warm_start: True if every retrain started from θ̂; False if from the
        given ``init`` (one pytree, or one per subset from ``init(key_m)``).
      retrain: :class:`Retrained` diagnostics (``params`` is ``None``).
    """

    score: jax.Array
    per_query: jax.Array
    predicted: jax.Array
    actual: jax.Array
    subsets: jax.Array
    alpha: float
    key: Any
    warm_start: bool
    retrain: Retrained


def random_subsets(key, n: int, num_subsets: int, alpha: float = 0.5):
    """[num_subsets, n] bool masks, each with exactly ⌊αn⌋ True, subset m from ``fold_in(key, m)``.

    Example:
      >>> import jax
      >>> from gifjax import evaluation
      >>> evaluation.random_subsets(jax.random.key(0), 10, 3, 0.5).sum(1).tolist()
      [5, 5, 5]
    """
    fn = "evaluation.random_subsets"
    _check_alpha(fn, alpha, n)
    if not isinstance(num_subsets, int) or num_subsets < 1:
        raise _checks.error(fn, "num_subsets", repr(num_subsets), "a positive int",
                            "pass e.g. num_subsets=32.")
    return _subsets(_as_key(fn, key), n, num_subsets, int(np.floor(alpha * n)))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _subsets(key, n, num_subsets, size):
    def one(m):
        kept = jax.random.permutation(jax.random.fold_in(key, m), n)[:size]
        return jnp.zeros(n, bool).at[kept].set(True)

    return jax.vmap(one)(jnp.arange(num_subsets))


@functools.partial(jax.jit, static_argnames=("example_loss_fn",))
def _lds_stats(scores, subsets, params, actual, test_examples, example_loss_fn):
    base = jax.vmap(example_loss_fn, (None, 0))(params, test_examples).astype(actual.dtype)
    removed = (~subsets).astype(actual.dtype)
    predicted = base[None] - removed @ scores.astype(actual.dtype) / scores.shape[0]
    per_query = jax.vmap(spearman, (1, 1))(predicted, actual)
    return jnp.mean(per_query), per_query, predicted


def _check_alpha(fn, alpha, n):
    if not isinstance(alpha, (int, float)) or not 0 < alpha < 1 or int(np.floor(alpha * n)) < 1:
        raise _checks.error(fn, "alpha", repr(alpha), f"a float in (0, 1) with ⌊α·{n}⌋ ≥ 1",
                            "pass the kept fraction, e.g. alpha=0.5.")


def _as_key(fn, key):
    if isinstance(key, (int, np.integer)):
        return jax.random.key(int(key))
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    raise _checks.error(fn, "key", repr(key), "a jax.random.key(...) or an int seed",
                        "pass key=jax.random.key(0) (or key=0).", kind=TypeError)


def linear_datamodeling_score(weighted_loss_fn: Callable, params, scores,
                              example_loss_fn: Callable, test_examples, *data,
                              num_subsets: int = 32, alpha: float = 0.5, key=0, init=None,
                              optimizer=Newton(), chunk_size: int = 32):
    r"""Linear datamodeling score (LDS) of influence scores on random α-subsets.

    Draw M subsets S_m of ⌊αn⌋ training examples (:func:`random_subsets`),
    retrain on each (weights 1 on S_m, 0 elsewhere), and compare per test
    example j the actual loss L_j(θ_S) with the additive prediction

        L̂_j(S) = L_j(θ̂) − Σ_{i∉S} I[i, j] / n

    (each removed point changes the loss by −I[i, j]/n, README sign). Then

        LDS = mean_j Spearman_m(L̂_j(S_m), L_j(θ_{S_m})).

    Ranks across subsets are unchanged by a per-query shift or positive
    scale, so the ranking equals that of Σ_{i∈S} I[i, j] ("sum of
    attributions over the subset"), and the group-removal rescaling
    m/(n − m) ∇(mean_U ℓ + R) of :func:`gifjax.removal_gradient` (a scale
    and a subset-independent shift for equal-sized subsets at a stationary
    θ̂) gives the same score.

    Args:
      weighted_loss_fn, params, scores, example_loss_fn, test_examples,
        *data, optimizer, chunk_size: as in :func:`leave_one_out`
        (``scores`` [n, n_test] over all n training examples).
      num_subsets: M ≥ 2 (static).
      alpha: kept fraction in (0, 1).
      key: ``jax.random.key`` or int seed; subset m uses ``fold_in(key, m)``.
      init: ``None`` — warm start every retrain from θ̂ (measures the local,
        linearised model; default); a pytree like ``params`` — retrain every
        subset from it; or a callable ``init(key) -> params`` — subset m
        starts from ``init(fold_in(fold_in(key, 1), m))``.

    Returns:
      :class:`LDS` with subsets, key, warm-start flag and retrain
      diagnostics; a dict ``{name: LDS}`` (one set of retrains) when
      ``scores`` is a dict.

    Example:
      >>> import jax, jax.numpy as jnp, gifjax
      >>> from gifjax import evaluation
      >>> X = jax.random.normal(jax.random.key(0), (40, 3)); y = X @ jnp.ones(3)
      >>> ex = lambda w, xy: 0.5 * (xy[0] @ w - xy[1]) ** 2
      >>> f = evaluation.weighted_objective(ex, lambda w: 0.05 * w @ w)
      >>> loss = lambda w, X, y: f(w, jnp.ones(40), (X, y))
      >>> w = evaluation.retrain(f, jnp.zeros(3), jnp.ones(40), (X, y)).params[0]
      >>> I = gifjax.influence_scores(loss, w, ex, (X, y), (X[:5], y[:5]), X, y)
      >>> out = evaluation.linear_datamodeling_score(f, w, I, ex, (X[:5], y[:5]), (X, y),
      ...                                            num_subsets=16, key=0)
      >>> out.subsets.shape, bool(out.score > 0.5)
      ((16, 40), True)

    Warning:
      With a warm start on a non-convex model the retrains stay near θ̂, which
      flatters any linear estimate; from-scratch retrains (``init``) add the
      run-to-run variance of training, which no influence estimate predicts.
    """
    fn = "evaluation.linear_datamodeling_score"
    _check_chunk(fn, chunk_size)
    n_test = _checks.leading_size(fn, "test_examples", test_examples)
    scores, n = _check_scores(fn, scores, n_test)
    if not isinstance(num_subsets, int) or num_subsets < 2:
        raise _checks.error(fn, "num_subsets", repr(num_subsets), "an int ≥ 2",
                            "pass e.g. num_subsets=32 (Spearman across subsets needs several).")
    _check_alpha(fn, alpha, n)
    key = _as_key(fn, key)
    if init is not None and not callable(init):
        _checks.check_like(fn, "init", init, params)
    subsets = _subsets(jax.random.fold_in(key, 0), n, num_subsets, int(np.floor(alpha * n)))
    inits = None
    if callable(init):
        init_key = jax.random.fold_in(key, 1)
        inits = jax.jit(lambda k: jax.vmap(lambda m: init(jax.random.fold_in(k, m)))(
            jnp.arange(num_subsets)))(init_key)
        _checks.check_like(fn, "init", tree_map(lambda a: a[0], inits), params)
    start = params if init is None or callable(init) else init
    weights = np.asarray(subsets).astype(_dtype(params))
    out = _retrain_map(fn, weighted_loss_fn, start, weights, data, optimizer, chunk_size,
                       example_loss_fn, test_examples, inits)
    info = out._replace(params=None)
    results = {}
    for name, sc in scores.items():
        score, per_query, predicted = _lds_stats(sc, subsets, params, out.params, test_examples,
                                                 example_loss_fn=example_loss_fn)
        results[name] = LDS(score, per_query, predicted, out.params, subsets, float(alpha), key,
                            init is None, info)
    return _unwrap(results)


# ----------------------------------------------------------------------------- mislabels


class MislabelDetection(NamedTuple):
    """What :func:`mislabel_detection` returns.

    Attributes:
      auc: ROC AUC of the suspicion ranking for finding mislabelled examples.
      fractions: the inspected fractions x.
      recall: [len(fractions)] share of all mislabelled examples among the
        top ⌈x·n⌉ most suspicious (ties at the cut counted fractionally: the
        expected recall under random tie-breaking).
      num_mislabelled: how many examples are mislabelled.
      ranking: [n] indices, most suspicious first (stable for ties).
    """

    auc: float
    fractions: tuple
    recall: np.ndarray
    num_mislabelled: int
    ranking: np.ndarray


def mislabel_detection(scores, is_mislabelled, fractions=(0.05, 0.1, 0.2), *,
                       suspicious: str = "low") -> MislabelDetection:
    r"""How well a per-example score finds mislabelled training examples.

    With ``suspicious="low"`` (default) the most suspicious examples have the
    *lowest* score — right for gifjax's self-influence I[i, i] =
    −∇ℓ_iᵀ H⁻¹ ∇ℓ_i ≤ 0 (:func:`gifjax.self_influence`): rank by −I[i, i], the
    curvature-weighted gradient norm, large for points the model finds hard
    to fit. Use ``suspicious="high"`` for scores where larger is more
    suspicious (training loss, |gradient|).

        AUC = P(s_mislabelled more suspicious than s_clean)  (ties ½)
        recall@x = |top ⌈x·n⌉ ∩ mislabelled| / |mislabelled|

    Args:
      scores: [n] float, one per training example (concrete).
      is_mislabelled: [n] bool ground truth, with both classes present.
      fractions: inspected fractions, each in (0, 1].
      suspicious: ``"low"`` or ``"high"``.

    Example:
      >>> import numpy as np
      >>> from gifjax import evaluation
      >>> si = np.array([-9.0, -0.1, -0.2, -5.0, -0.3])        # self-influence
      >>> out = evaluation.mislabel_detection(si, np.array([1, 0, 0, 1, 0], bool), fractions=(0.4,))
      >>> out.auc, out.recall.tolist(), out.ranking[:2].tolist()
      (1.0, [1.0], [0, 3])
    """
    fn = "evaluation.mislabel_detection"
    _checks.check_choice(fn, "suspicious", suspicious, ("low", "high"))
    s = np.asarray(scores)
    if s.ndim != 1 or not np.issubdtype(s.dtype, np.number) or not np.all(np.isfinite(s)):
        raise _checks.error(fn, "scores", f"shape {s.shape}, dtype {s.dtype}"
                            + ("" if s.ndim != 1 or not np.issubdtype(s.dtype, np.number)
                               else ", with non-finite values"),
                            "a 1-D array of finite numbers, one per training example",
                            "pass e.g. gifjax.self_influence(...) (check its solves converged).")
    m = np.asarray(is_mislabelled)
    if m.shape != s.shape or m.dtype != bool:
        raise _checks.error(fn, "is_mislabelled", f"shape {m.shape}, dtype {m.dtype}",
                            f"a bool array of shape {s.shape}",
                            "pass the boolean mask returned by flip_labels (or labels != clean).")
    if m.all() or not m.any():
        raise _checks.error(fn, "is_mislabelled", f"{int(m.sum())} of {m.size} True",
                            "both mislabelled and clean examples", "AUC needs both classes present.")
    fr = tuple(float(f) for f in np.atleast_1d(fractions))
    if not fr or any(not 0 < f <= 1 for f in fr):
        raise _checks.error(fn, "fractions", repr(fractions), "fractions in (0, 1]",
                            "pass e.g. fractions=(0.05, 0.1, 0.2).")
    susp = -s.astype(np.float64) if suspicious == "low" else s.astype(np.float64)
    area = float(auc(jnp.asarray(susp), jnp.asarray(m)))
    order = np.argsort(-susp, kind="stable")
    recall = np.array([_recall_at(susp, m, int(np.ceil(f * s.size - 1e-9))) for f in fr])
    return MislabelDetection(area, fr, recall, int(m.sum()), order)


def _recall_at(susp, m, k):
    """Expected recall in the top k under random tie-breaking at the cut."""
    t = np.sort(susp)[::-1][k - 1]
    above = susp > t
    tied = susp == t
    found = m[above].sum() + m[tied].sum() * (k - above.sum()) / tied.sum()
    return float(found / m.sum())


def flip_labels(key, labels, fraction: float, num_classes: int | None = None):
    """Corrupt exactly round(fraction·n) labels, each to a uniformly random *other* class.

    Deterministic given ``key`` (a ``jax.random.key`` or int seed).

    Returns:
      ``(noisy_labels, is_flipped)``: int array like ``labels`` and [n] bool.

    Example:
      >>> import jax.numpy as jnp
      >>> from gifjax import evaluation
      >>> y = jnp.arange(10) % 3
      >>> noisy, flipped = evaluation.flip_labels(0, y, 0.3, num_classes=3)
      >>> int(flipped.sum()), bool((noisy != y).sum() == 3), bool((noisy[~flipped] == y[~flipped]).all())
      (3, True, True)
    """
    fn = "evaluation.flip_labels"
    key = _as_key(fn, key)
    y = np.asarray(labels)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or y.size == 0 or y.min() < 0:
        raise _checks.error(fn, "labels", f"shape {y.shape}, dtype {y.dtype}",
                            "a non-empty 1-D array of int class labels ≥ 0",
                            "pass integer labels, e.g. y.astype(np.int32).")
    c = int(y.max()) + 1 if num_classes is None else num_classes
    if not isinstance(c, (int, np.integer)) or c < 2 or c <= y.max():
        raise _checks.error(fn, "num_classes", repr(num_classes), f"an int ≥ max(2, {y.max() + 1})",
                            "pass the number of classes of the task.")
    if not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise _checks.error(fn, "fraction", repr(fraction), "a float in [0, 1]",
                            "pass e.g. fraction=0.1 to flip 10 % of the labels.")
    noisy, flipped = _flip(key, jnp.asarray(y), int(round(fraction * y.size)), c)
    return noisy, flipped


@functools.partial(jax.jit, static_argnums=(2, 3))
def _flip(key, y, k, c):
    k_idx, k_shift = jax.random.split(key)
    idx = jax.random.permutation(k_idx, y.shape[0])[:k]
    shift = jax.random.randint(k_shift, (k,), 1, c, dtype=y.dtype)
    return y.at[idx].set((y[idx] + shift) % c), jnp.zeros(y.shape, bool).at[idx].set(True)
