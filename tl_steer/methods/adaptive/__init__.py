"""Adaptive steering: interventions whose push follows the activation, token by token
(``docs/methods.md``, section "Adaptive steering").

- :class:`ProjectionClamp` (:func:`projection_clamp`): set the component along the concept direction to a
  target seen in clean concept text.
- :class:`BudgetedAddition` (:func:`budgeted_addition`): add DiffMean's vector only as far as a
  ManifoldProbe's Mahalanobis percentile allows.
- :class:`Rotation` (:func:`rotation`): turn the activation toward the concept direction, keeping its norm.
- :class:`Conditional` (:func:`condition_probe`, :func:`conditional`): any intervention, only where a linear
  condition probe fires.

Each fit function reads the concept's training completions once; :func:`concept_activations` makes that
pass shareable (``activations=``), and ``base=`` reuses an existing DiffMean vector.
"""

from tl_steer.methods.adaptive._fit import ConceptActivations, concept_activations
from tl_steer.methods.adaptive.budget import BudgetedAddition, budgeted_addition
from tl_steer.methods.adaptive.clamp import ProjectionClamp, projection_clamp
from tl_steer.methods.adaptive.conditional import Conditional, ConditionProbe, condition_probe, conditional
from tl_steer.methods.adaptive.rotation import Rotation, rotate_toward, rotation

__all__ = [
    "BudgetedAddition",
    "ConceptActivations",
    "ConditionProbe",
    "Conditional",
    "ProjectionClamp",
    "Rotation",
    "budgeted_addition",
    "concept_activations",
    "condition_probe",
    "conditional",
    "projection_clamp",
    "rotate_toward",
    "rotation",
]
