"""Rank statistics (private): ranks with ties averaged, Pearson, Spearman, ROC AUC."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .. import _checks

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
