"""The model: vision tower, resampler, gated cross-attention, and the LM they wrap."""

from .cross_attention import GatedCrossAttentionBlock, MediaCache
from .modeling import InterleafForConditionalGeneration, InterleafOutput, InterleafPreTrainedModel, causal_lm_loss

__all__ = [
    "GatedCrossAttentionBlock",
    "InterleafForConditionalGeneration",
    "InterleafOutput",
    "InterleafPreTrainedModel",
    "MediaCache",
    "causal_lm_loss",
]
