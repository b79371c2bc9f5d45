"""gifjax: generalized influence functions (GIF) and classic influence functions in JAX.

Pure functions over pytrees, in layers whose imports point one way::

    estimators (influence, influence_scores, ...)  ← operators meet masks and solvers
       │              │
    solvers      operators (curvature spec → linear operators; the estimator table)
       │              │
       └── curvature ─┘ (hvp: jvp of grad; GGN products)

plus ``masks`` and ``selection`` (which parameters move), ``lowrank``,
``stepping`` (apply Δ: search the step), ``diagnostics`` (can I trust the
scores?), ``spectrum``, ``group``, ``sweep``, ``parallel`` and ``evaluation`` on top.
The end-to-end pieces (data, models, training, the paper's tasks, the demo)
live in :mod:`gifjax.experiments`; the core never imports them.
"""

from . import diagnostics as diagnostics
from . import estimators as estimators
from . import evaluation as evaluation
from . import lowrank as lowrank
from . import masks as masks
from . import operators as operators
from . import parallel as parallel
from . import preconditioners as preconditioners
from . import selection as selection
from . import solvers as solvers
from . import spectrum as spectrum
from . import stepping as stepping
from . import sweep as sweep
from .curvature import GGN as GGN
from .curvature import batched_hvp as batched_hvp
from .curvature import ggn_product as ggn_product
from .curvature import hutchinson_trace as hutchinson_trace
from .curvature import hvp as hvp
from .curvature import linearize_ggn as linearize_ggn
from .curvature import linearize_hvp as linearize_hvp
from .curvature import masked_hvp as masked_hvp
from .curvature import mixed_precision as mixed_precision
from .diagnostics import ScoreCheck as ScoreCheck
from .diagnostics import check_scores as check_scores
from .estimators import Influence as Influence
from .estimators import Scores as Scores
from .estimators import adjoint_solve as adjoint_solve
from .estimators import influence as influence
from .estimators import influence_scores as influence_scores
from .estimators import removal_gradient as removal_gradient
from .estimators import self_influence as self_influence
from .group import GroupInfluence as GroupInfluence
from .group import group_influence as group_influence
from .operators import METHODS as METHODS
from .operators import AutoDamping as AutoDamping
from .operators import Curvature as Curvature
from .operators import Estimator as Estimator
from .operators import curvature_operator as curvature_operator
from .operators import hessian_operator as hessian_operator
from .operators import resolve_damping as resolve_damping
from .solvers import Solution as Solution
from .stepping import StepSearch as StepSearch
from .stepping import step_search as step_search

__version__ = "0.1.0"

__all__ = ["AutoDamping", "Curvature", "Estimator", "GGN", "GroupInfluence", "Influence", "METHODS",
           "Scores", "Solution", "adjoint_solve", "batched_hvp", "curvature_operator", "estimators",
           "evaluation", "ggn_product", "group_influence", "hessian_operator", "hutchinson_trace", "hvp",
           "influence", "influence_scores", "linearize_ggn", "linearize_hvp", "lowrank", "masked_hvp",
           "masks", "mixed_precision", "operators", "parallel", "preconditioners", "removal_gradient", "resolve_damping",
           "selection", "self_influence", "solvers", "spectrum", "sweep",
           "StepSearch", "step_search", "stepping", "ScoreCheck", "check_scores", "diagnostics"]
