"""The ground-truth checks (private): leave-one-out, linear datamodeling score, mislabel detection."""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import _checks, _repr
from ._optimize import Newton
from ._retrain import Retrained, check_chunk, params_dtype, retrain_map
from ._statistics import auc, pearson, spearman

tree_map = jax.tree_util.tree_map


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


@_repr.compact_repr()
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
    check_chunk(fn, chunk_size)
    n_test = _checks.leading_size(fn, "test_examples", test_examples)
    scores, n = _check_scores(fn, scores, n_test)
    removed = _check_removed(fn, removed, n)
    weights = np.ones((1 + removed.size, n), params_dtype(params))
    weights[1 + np.arange(removed.size), removed] = 0
    out = retrain_map(fn, weighted_loss_fn, params, weights, data, optimizer, chunk_size,
                      example_loss_fn, test_examples)
    info = lambda sl: out._replace(params=None, objective=out.objective[sl],
                                   grad_norm=out.grad_norm[sl], num_steps=out.num_steps[sl],
                                   num_hvps=out.num_hvps[sl], converged=out.converged[sl])
    retrained, reference = info(slice(1, None)), info(0)
    return _unwrap({name: LOO(jnp.asarray(removed), *_loo_stats(s, removed, out.params),
                              retrained, reference) for name, s in scores.items()})


# ----------------------------------------------------------------------------- LDS


@_repr.compact_repr()
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
      weighted_loss_fn, params, example_loss_fn, test_examples, \*data, optimizer, chunk_size:
        as in :func:`leave_one_out`.
      scores: as in :func:`leave_one_out` ([n, n_test] over all n training examples).
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
    check_chunk(fn, chunk_size)
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
    weights = np.asarray(subsets).astype(params_dtype(params))
    out = retrain_map(fn, weighted_loss_fn, start, weights, data, optimizer, chunk_size,
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


@_repr.compact_repr()
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
    suspicious (training loss, \|gradient\|).

        AUC = P(s_mislabelled more suspicious than s_clean)  (ties ½)
        recall@x = \|top ⌈x·n⌉ ∩ mislabelled\| / \|mislabelled\|

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
