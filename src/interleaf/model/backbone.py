"""The model without its output head, as transformers' ``base_model`` is: hidden states out.

Trainers that compute the loss themselves (TRL's chunked loss) run ``model.base_model(**inputs)``,
read ``last_hidden_state`` and project it with ``model.get_output_embeddings().weight``
(:class:`~interleaf.model.embeddings.FullVocabularyHead`). :class:`Backbone` is that ``base_model``
for both fusion families: the images are encoded and fused exactly as in ``forward``, the LM's own
base model (``language_model.base_model``, any family) gives its final, normalised hidden states.
Under placement ``replace`` (xGen-MM), where the model grows each ``<image>`` into the image's
positions, the hidden states are those at the caller's positions, one per input id, as the logits are.
"""

from __future__ import annotations

from torch import nn


class Backbone(nn.Module):
    """``model.base_model`` of :class:`~interleaf.model.InterleafForConditionalGeneration`.

    Called with ``forward``'s inputs (``input_ids``, ``attention_mask``, ``pixel_values``, ...; no
    ``labels``), it returns a ``BaseModelOutputWithPast`` whose ``last_hidden_state`` is ``(B, T, D)``.
    It owns no parameter and is not a submodule (the model holds it unregistered), so checkpoints and
    parameter lists are unchanged.
    """

    _tp_plan = None  # read by transformers from ``base_model`` (no tensor- or pipeline-parallel plan)
    _pp_plan = None

    def __init__(self, model: nn.Module):
        super().__init__()
        object.__setattr__(self, "_model", model)  # the model owns the weights; no second registration

    def forward(self, *args, **kwargs):
        model = self._model
        # The class's forward, not the instance's: a trainer may have replaced the instance's forward
        # by one that calls this backbone.
        return type(model).forward(model, *args, hidden_states_only=True, **kwargs)

    def __repr__(self) -> str:
        return f"Backbone({type(self._model).__name__})"
