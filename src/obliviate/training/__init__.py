"""The training layer: what every gradient method and every regularizer share.

- ``session``: the typed ``TrainingSession`` a request's run sees, its batches and losses;
- ``gradients``: gradient accumulation over batches (saliency, Fisher estimates) and AEGIS's rectification
  of a retain gradient that conflicts with the rest of a step's;
- ``masks``: top-fraction and Fisher-ratio parameter masks;
- ``subspace``: orthonormal bases, and the text token states and layer inputs they are built from;
- ``simulation``: simulated fine-tuning on a scratch copy and the gradients defences take through it
  (and the optimizers an attacker, simulated or real, may use);
- ``adapter``: per-request low-rank adapters, trained as one more constraint of the contract;
- ``contract``: how constraints from a method and its regularizers combine into one projector
  per parameter.
"""

from .adapter import adapter_constraints, adapter_factors, gradient_directions, refuse_masks, update_directions
from .contract import ParameterConstraint, UpdateProjector, combine_constraints
from .gradients import accumulate_gradients, rectified_retain_gradient
from .masks import fisher_ratio_mask, top_fraction_mask
from .session import (TRAINABLE_PRESETS, Batch, GradientConfig, PassCounter, TrainingSession, match_names,
                      select_parameters)
from .simulation import (OPTIMIZERS, FineTuneDistribution, ScratchModule, first_order_meta_gradient, linear_surrogate,
                         moreau_hypergradient)
from .subspace import OUT_PATTERN, aligned_token_states, orthonormal_basis, projection_inputs, protected_basis, token_states

__all__ = ["OPTIMIZERS", "OUT_PATTERN", "TRAINABLE_PRESETS", "Batch", "FineTuneDistribution", "GradientConfig", "ParameterConstraint", "PassCounter",
           "ScratchModule", "TrainingSession", "UpdateProjector", "accumulate_gradients", "adapter_constraints",
           "adapter_factors", "aligned_token_states", "combine_constraints", "first_order_meta_gradient", "fisher_ratio_mask",
           "gradient_directions", "linear_surrogate", "match_names", "moreau_hypergradient", "orthonormal_basis", "projection_inputs", "protected_basis",
           "rectified_retain_gradient", "refuse_masks", "select_parameters", "token_states", "top_fraction_mask",
           "update_directions"]
