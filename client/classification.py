"""AutoDistributedModelForSequenceClassification: the base model in the swarm, a local score head.

As transformers' own sequence classifiers: the score head (``model.score``, no bias) gives per-token
logits; each row is pooled at its last token that is not ``pad_token_id`` (left or right padding;
the last token when there is no pad token or only ``inputs_embeds``); ``labels`` give the loss of the
problem type (regression, single- or multi-label classification) through transformers' loss function.
A checkpoint without score weights gets a newly initialised head (train it, e.g. with LoRA).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import Cache
from transformers.modeling_outputs import SequenceClassifierOutputWithPast

from client.base import with_cache
from client.pretrained import DistributedPreTrainedModel
from client.swarmclient import SwarmClient

HEAD = "score"


class DistributedModelForSequenceClassification(DistributedPreTrainedModel):
    def __init__(self, config: PretrainedConfig, client: SwarmClient | None = None):
        super().__init__(config, client)
        self.num_labels = config.num_labels
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)

    def local_heads(self) -> dict[str, nn.Module]:
        return {HEAD: self.score}

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        cache: Cache | None = None,  # transformers >= 5.24 passes the cache under this name
        **kwargs,
    ) -> SequenceClassifierOutputWithPast | tuple:
        past_key_values = cache if cache is not None else past_key_values
        outputs = self.base(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        logits = self.score(outputs.last_hidden_state)  # [batch, tokens, num_labels]
        batch = logits.shape[0]
        pooled = logits[torch.arange(batch), self._last_tokens(input_ids, batch, logits.shape[1])]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled, config=self.config)
        result = with_cache(
            SequenceClassifierOutputWithPast,
            past_key_values,
            loss=loss,
            logits=pooled,
            hidden_states=outputs.hidden_states,
        )
        return result.to_tuple() if return_dict is False else result

    def _last_tokens(self, input_ids: torch.Tensor | None, batch: int, tokens: int) -> torch.Tensor | int:
        """Index of each row's last token that is not padding (the rightmost, so left and right padding work)."""
        pad = self.config.pad_token_id
        if pad is None and batch != 1:
            raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined.")
        if pad is None or input_ids is None:
            return -1
        positions = torch.arange(tokens) * (input_ids != pad).to(torch.int64)  # 0 where padding
        return positions.argmax(-1)


AutoDistributedModelForSequenceClassification = DistributedModelForSequenceClassification
