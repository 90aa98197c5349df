"""The training layer: what every gradient method and every regularizer share.

- ``session``: the typed ``TrainingSession`` a request's run sees, its batches and losses;
- ``gradients``: gradient accumulation over batches (saliency, Fisher estimates);
- ``masks``: top-fraction and Fisher-ratio parameter masks;
- ``subspace``: orthonormal bases and the text token states they are built from;
- ``contract``: how constraints from a method and its regularizers combine into one projector
  per parameter.
"""

from .contract import ParameterConstraint, UpdateProjector, combine_constraints
from .gradients import accumulate_gradients
from .masks import fisher_ratio_mask, top_fraction_mask
from .session import TRAINABLE_PRESETS, Batch, GradientConfig, PassCounter, TrainingSession, select_parameters
from .subspace import aligned_token_states, orthonormal_basis, token_states

__all__ = ["TRAINABLE_PRESETS", "Batch", "GradientConfig", "ParameterConstraint", "PassCounter", "TrainingSession",
           "UpdateProjector", "accumulate_gradients", "aligned_token_states", "combine_constraints",
           "fisher_ratio_mask", "orthonormal_basis", "select_parameters", "token_states", "top_fraction_mask"]
