"""End-to-end tasks of the GIF paper: class removal and backdoor relabelling, against retraining.

* :mod:`gifjax.experiments.tasks.class_removal` — forget one class: :func:`remove_class`
  (one estimator on a trained model), :func:`run_experiment` (train, retrain
  without the class, run IF / PIF / FIF / GIF);
* :mod:`gifjax.experiments.tasks.backdoor` — checkerboard trigger, poisoning, and
  :func:`correct_backdoor` / its ``run_experiment``;
* :mod:`gifjax.experiments.tasks.common` — :class:`TaskConfig`, :class:`TrainConfig`,
  :func:`f1`, the jitted step-grid evaluation :func:`predictions_along`.

These modules use :mod:`gifjax.experiments.data`, :mod:`gifjax.experiments.models` and
:mod:`gifjax.experiments.train`; the core (``gifjax.influence`` and below) never imports them.
"""

from . import backdoor as backdoor
from . import class_removal as class_removal
from . import common as common
from .backdoor import BackdoorMetrics as BackdoorMetrics
from .backdoor import BackdoorResult as BackdoorResult
from .backdoor import Poisoned as Poisoned
from .backdoor import Trigger as Trigger
from .backdoor import add_trigger as add_trigger
from .backdoor import apply_trigger as apply_trigger
from .backdoor import backdoor_metrics as backdoor_metrics
from .backdoor import checkerboard as checkerboard
from .backdoor import correct_backdoor as correct_backdoor
from .backdoor import poison as poison
from .backdoor import trigger_for as trigger_for
from .class_removal import RemovalExperiment as RemovalExperiment
from .class_removal import RemovalMetrics as RemovalMetrics
from .class_removal import RemovalResult as RemovalResult
from .class_removal import remove_class as remove_class
from .class_removal import removal_metrics as removal_metrics
from .common import PROTOCOLS as PROTOCOLS
from .common import TaskConfig as TaskConfig
from .common import TrainConfig as TrainConfig
from .common import f1 as f1
from .common import predictions_along as predictions_along
