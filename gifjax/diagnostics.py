r"""Can I trust these scores? Recompute a few queries tightly and compare.

Influence scores on a real model come from budgeted iterative solves, and a
ranking can look plausible while being mostly solver noise. :func:`check_scores`
recomputes a random subset of test columns with a *reference* solve — the
structure-appropriate Krylov method at a tolerance 100× tighter than the
dtype's default and a larger step budget — and compares column by column:

* Spearman rank correlation ρ between the scores at hand and the reference
  (does the ranking of training examples hold?);
* top-k overlap: the fraction of the k training examples with the largest
  \|I\| that both agree on (do the lists you would read hold?);
* relative error ‖I_j − I_j^ref‖ / ‖I_j^ref‖;
* each query's convergence, at hand (when you pass :class:`gifjax.Scores`)
  and in the reference. A reference that did not converge is not ground
  truth: the check says so.

Rule of thumb: trust the ranking where ρ ≥ 0.95 and the reference converged;
where it is lower, raise the solver budget (``max_steps``), the damping, or
the Hessian subsample (:class:`gifjax.Curvature`), or compare two budgets.

Example:
    >>> import jax, jax.numpy as jnp, gifjax
    >>> X = jax.random.normal(jax.random.key(0), (30, 3)); y = X @ jnp.array([1.0, -1.0, 2.0])
    >>> loss = lambda w, X, y: 0.5 * jnp.mean((X @ w - y) ** 2) + 0.01 * w @ w
    >>> ex = lambda w, xy: 0.5 * (xy[0] @ w - xy[1]) ** 2
    >>> w, train, test = jnp.zeros(3), (X, y), (X[:6], y[:6])
    >>> I = gifjax.influence_scores(loss, w, ex, train, test, X, y, return_info=True)
    >>> check = gifjax.check_scores(I, loss, w, ex, train, test, X, y, num_queries=4)
    >>> bool(check.spearman.min() > 0.99), check.num_queries
    (True, 4)
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _checks, _repr
from .estimators import Scores, influence_scores
from .operators import Estimator
from .solvers import DEFAULT_MAX_STEPS, FAILURES, LSTSQ, MINRES, Dense, default_rtol, get_solver

__all__ = ["ScoreCheck", "check_scores", "reference_solver"]


@_repr.compact_repr()
class ScoreCheck(NamedTuple):
    """Result of :func:`check_scores`, one entry per checked test column.

    Attributes:
      queries: the indices of the checked test examples.
      spearman: rank correlation with the reference, per query.
      top_k_overlap: fraction of the top-k training examples (by \\|I\\|)
        shared with the reference, per query.
      relative_error: ‖I_j − I_j^ref‖ / ‖I_j^ref‖, per query.
      converged: whether the scores at hand converged (``None`` when a bare
        array was checked).
      reference_converged: whether the reference solve converged.
      reference_failure: the reference's failure names.
      top_k: the k used.
      reference: the reference solver (a value of :mod:`gifjax.solvers`).
    """

    queries: np.ndarray
    spearman: np.ndarray
    top_k_overlap: np.ndarray
    relative_error: np.ndarray
    converged: Any
    reference_converged: np.ndarray
    reference_failure: list
    top_k: int
    reference: Any

    @property
    def num_queries(self) -> int:
        return int(len(self.queries))

    def trustworthy(self, min_spearman: float = 0.95) -> bool:
        """Every reference converged and every checked column has ρ ≥ ``min_spearman``."""
        return bool(np.all(self.reference_converged) and np.all(self.spearman >= min_spearman))

    def summary(self) -> str:
        """A short report to read (one line per query, then a verdict)."""
        head = f"{'query':>6s} {'spearman':>9s} {f'top-{self.top_k}':>7s} {'rel.err':>9s} {'conv.':>6s} {'ref.':>14s}"
        lines = [head]
        for i, q in enumerate(self.queries):
            conv = "-" if self.converged is None else ("yes" if self.converged[i] else "NO")
            ref = "converged" if self.reference_converged[i] else self.reference_failure[i]
            lines.append(f"{int(q):6d} {self.spearman[i]:9.4f} {self.top_k_overlap[i]:7.2f} "
                         f"{self.relative_error[i]:9.2e} {conv:>6s} {ref:>14s}")
        if not np.all(self.reference_converged):
            verdict = ("the reference did not converge everywhere: it is not ground truth there; "
                       "raise max_steps or the damping")
        elif self.trustworthy():
            verdict = "rankings agree with the reference (spearman ≥ 0.95): trust them"
        else:
            verdict = ("rankings differ from the reference: raise the solver budget (max_steps), "
                       "the damping, or the Hessian subsample, and check again")
        return "\n".join(lines + [verdict])


def reference_solver(solver, *, method: str = "if", dtype=jnp.float32, steps_factor: int = 4):
    """The tighter solve :func:`check_scores` compares against.

    ``Dense`` stays dense (already exact). Any other solver — a Krylov
    method, LiSSA, :class:`gifjax.lowrank.LowRank` factors — is replaced by
    the single-query Krylov method for the estimator's structure (MINRES for
    if/pif/fif, which needs no positive definiteness and shares nothing
    between queries with the default block solver; LSTSQ for gif) with
    ``rtol`` 100× below the dtype's default
    (:func:`gifjax.solvers.default_rtol`) and ``steps_factor`` × the budget
    (the given solver's ``max_steps``, or :data:`gifjax.solvers.DEFAULT_MAX_STEPS`).
    """
    form = Estimator(method, None).form
    if isinstance(solver, Dense) or (isinstance(solver, str) and solver == "dense"):
        return get_solver("dense", form=form)
    steps = getattr(solver, "max_steps", None) or DEFAULT_MAX_STEPS
    rtol = default_rtol(dtype, normal=form != "symmetric") / 100
    return (MINRES if form == "symmetric" else LSTSQ)(rtol=rtol, max_steps=int(steps_factor * steps))


def _spearman(a, b):
    ra, rb = (np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(np.float64) for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = np.sqrt((ra @ ra) * (rb @ rb))
    return float(ra @ rb / den) if den > 0 else float("nan")


def _top_overlap(a, b, k):
    top = lambda x: set(np.argsort(-np.abs(x), kind="stable")[:k].tolist())
    return len(top(a) & top(b)) / k


def check_scores(scores, loss_fn: Callable, params, example_loss_fn: Callable, train_examples, test_examples,
                 *args, num_queries: int = 8, top_k: int = 10, reference=None, key=None, method: str = "if",
                 mask=None, solver="auto", damping=0.0, chunk_size: int | None = None, curvature="hessian",
                 test_chunk_size: int = 16, train_chunk_size: int = 256,
                 progress: bool | None = None) -> ScoreCheck:
    r"""Recompute ``num_queries`` random test columns tightly and compare with ``scores``.

    Args:
      scores: the [n_train, n_test] matrix to check, or the :class:`gifjax.Scores`
        of ``influence_scores(..., return_info=True)`` (then each query's
        convergence at hand is reported too).
      num_queries: how many test columns to recompute (all if fewer).
      top_k: k of the top-k overlap.
      reference: the reference solver; default :func:`reference_solver`.
      key: PRNG key choosing the columns (default ``jax.random.key(0)``).
      test_chunk_size, train_chunk_size, progress: for the recomputation.

    The other arguments (``loss_fn``, ``params``, ``example_loss_fn``, the
    examples, ``*args``, ``method``, ``mask``, ``solver``, ``damping``,
    ``chunk_size``, ``curvature``) are exactly those of the
    :func:`gifjax.influence_scores` call that produced ``scores``; ``solver``
    only sets the reference's budget.

    Returns:
      :class:`ScoreCheck`; print ``check.summary()``.
    """
    fn = "check_scores"
    info = scores if isinstance(scores, Scores) else None
    matrix = np.asarray(info.scores if info is not None else scores)
    n_test = _checks.leading_size(fn, "test_examples", test_examples, nonempty=True)
    n_train = _checks.leading_size(fn, "train_examples", train_examples, nonempty=True)
    if matrix.shape != (n_train, n_test):
        raise _checks.error(fn, "scores", f"shape {matrix.shape}", f"[n_train, n_test] = {(n_train, n_test)}",
                            "pass the matrix influence_scores returned for these train and test examples.")
    q = _checks.check_positive_int(fn, "num_queries", num_queries, example="num_queries=8")
    k = min(_checks.check_positive_int(fn, "top_k", top_k, example="top_k=10"), n_train)
    key = jax.random.key(0) if key is None else key
    cols = np.sort(np.asarray(jax.random.choice(key, n_test, (min(q, n_test),), replace=False)))
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    ref_solver = reference if reference is not None else reference_solver(solver, method=method, dtype=dtype)
    subset = jax.tree_util.tree_map(lambda a: a[cols], test_examples)
    with warnings.catch_warnings():  # the reference's own failures are reported in the result
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = influence_scores(loss_fn, params, example_loss_fn, train_examples, subset, *args, method=method,
                               mask=mask, solver=ref_solver, damping=damping, chunk_size=chunk_size,
                               curvature=curvature, test_chunk_size=test_chunk_size,
                               train_chunk_size=train_chunk_size, return_info=True, progress=progress)
    R, A = np.asarray(ref.scores, np.float64), matrix[:, cols].astype(np.float64)
    rel = np.linalg.norm(A - R, axis=0) / np.maximum(np.linalg.norm(R, axis=0), np.finfo(np.float64).tiny)
    return ScoreCheck(
        queries=cols,
        spearman=np.array([_spearman(A[:, j], R[:, j]) for j in range(len(cols))]),
        top_k_overlap=np.array([_top_overlap(A[:, j], R[:, j], k) for j in range(len(cols))]),
        relative_error=rel,
        converged=None if info is None else np.asarray(info.solution.converged)[cols],
        reference_converged=np.asarray(ref.solution.converged),
        reference_failure=[FAILURES[int(c)] for c in np.asarray(ref.solution.failure)],
        top_k=k, reference=ref_solver)
