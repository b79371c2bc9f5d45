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

    weighted_loss_fn(params, weights, \*data) -> scalar,  weights ∈ [0, 1]^n,

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

from ._statistics import auc as auc
from ._statistics import pearson as pearson
from ._statistics import rankdata as rankdata
from ._statistics import spearman as spearman
from ._optimize import LBFGS as LBFGS
from ._optimize import OPTIMIZERS as OPTIMIZERS
from ._optimize import Newton as Newton
from ._retrain import Retrained as Retrained
from ._retrain import retrain as retrain
from ._retrain import weighted_objective as weighted_objective
from ._ground_truth import LDS as LDS
from ._ground_truth import LOO as LOO
from ._ground_truth import MislabelDetection as MislabelDetection
from ._ground_truth import flip_labels as flip_labels
from ._ground_truth import leave_one_out as leave_one_out
from ._ground_truth import linear_datamodeling_score as linear_datamodeling_score
from ._ground_truth import mislabel_detection as mislabel_detection
from ._ground_truth import random_subsets as random_subsets

__all__ = [
    "auc",
    "pearson",
    "rankdata",
    "spearman",
    "LBFGS",
    "OPTIMIZERS",
    "Newton",
    "Retrained",
    "retrain",
    "weighted_objective",
    "LDS",
    "LOO",
    "MislabelDetection",
    "flip_labels",
    "leave_one_out",
    "linear_datamodeling_score",
    "mislabel_detection",
    "random_subsets",
]
