"""gifjax: generalized influence functions (GIF) and classic influence functions in JAX.

Pure functions over pytrees. The core (``hvp`` → operators → ``solvers`` →
``influence``) imports nothing from the data/model/training modules.
"""

from . import masks as masks
from . import selection as selection
from . import solvers as solvers
from .curvature import batched_hvp as batched_hvp
from .curvature import hvp as hvp
from .curvature import linearize_hvp as linearize_hvp
from .curvature import masked_hvp as masked_hvp
from .influence import METHODS as METHODS
from .influence import Influence as Influence
from .influence import Scores as Scores
from .influence import adjoint_solve as adjoint_solve
from .influence import hessian_operator as hessian_operator
from .influence import influence as influence
from .influence import influence_scores as influence_scores
from .influence import removal_gradient as removal_gradient
from .influence import self_influence as self_influence
from .solvers import Solution as Solution

__version__ = "0.1.0"
