"""gifjax: generalized influence functions (GIF) and classic influence functions in JAX.

Pure functions over pytrees. The core (``hvp`` → operators → ``solvers`` →
``influence``) imports nothing from the data/model/training modules.
"""

from . import evaluation as evaluation
from . import lowrank as lowrank
from . import masks as masks
from . import parallel as parallel
from . import selection as selection
from . import solvers as solvers
from . import sweep as sweep
from . import spectrum as spectrum
from .curvature import GGN as GGN
from .curvature import batched_hvp as batched_hvp
from .curvature import ggn_product as ggn_product
from .curvature import hutchinson_trace as hutchinson_trace
from .curvature import hvp as hvp
from .curvature import linearize_ggn as linearize_ggn
from .curvature import linearize_hvp as linearize_hvp
from .curvature import masked_hvp as masked_hvp
from .curvature import mixed_precision as mixed_precision
from .group import GroupInfluence as GroupInfluence
from .group import group_influence as group_influence
from .influence import METHODS as METHODS
from .influence import AutoDamping as AutoDamping
from .influence import Influence as Influence
from .influence import Scores as Scores
from .influence import adjoint_solve as adjoint_solve
from .influence import curvature_operator as curvature_operator
from .influence import hessian_operator as hessian_operator
from .influence import influence as influence
from .influence import influence_scores as influence_scores
from .influence import removal_gradient as removal_gradient
from .influence import resolve_damping as resolve_damping
from .influence import self_influence as self_influence
from .solvers import Solution as Solution

__version__ = "0.1.0"
