"""The model: vision tower, resampler, gated cross-attention, and the LM they wrap."""

from .cross_attention import GatedCrossAttentionBlock, MediaCache
from .inserted_images import InsertedImages
from .loss import causal_lm_loss
from .modeling import InterleafForConditionalGeneration, InterleafOutput, InterleafPreTrainedModel

__all__ = [
    "GatedCrossAttentionBlock",
    "InsertedImages",
    "InterleafForConditionalGeneration",
    "InterleafOutput",
    "InterleafPreTrainedModel",
    "MediaCache",
    "causal_lm_loss",
]
