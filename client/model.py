"""AutoDistributedModelForCausalLM: local embeddings, final norm and LM head; blocks in the swarm.

It is a transformers ``PreTrainedModel`` with ``GenerationMixin`` laid out like the family's own class
(``model.model.embed_tokens``, ``model.model.layers``, ``model.model.norm``, ``model.lm_head`` for Llama),
so ``generate`` works as usual (greedy, sampling, beam search, eos, padded batches, streamers) and so
does training: ``labels`` give transformers' loss, ``output_hidden_states`` its tuple of hidden states,
and gradients flow through the servers (``client.layers``). During ``generate`` the model's cache is a
``RemoteCache`` that stands for an inference session: its length is the number of tokens the servers
already hold, which is how transformers knows to send only new tokens, and beam search's reorders go
to the servers with the next step.

What the client computes of the model itself is two steps, each in one place and used by ``forward``
(hence ``generate``), the sequence classifier and the HTTP API alike: ``embed`` (token embeddings with the
family's scale, its embedding norm, the trainable prompt prefix; ``client.base``) and ``next_token_logits``
(final norm, LM head, final-logit soft-capping; ``head_logits`` is the part after the norm, for the base
model's already-normed output).
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, StoppingCriteriaList
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from client.base import RemoteCache, new_tokens_mask, with_cache
from client.pretrained import DistributedPreTrainedModel
from client.resume import Recorder, UnverifiedOutputStreamed, left_tokens, pad_after_eos, resume_from
from client.session import InferenceSession, SessionRewound
from client.swarmclient import SwarmClient
from swarm.models.families import soft_cap

logger = logging.getLogger(__name__)
# what generate() and model outputs call the cache: "past_key_values", or "cache" since transformers 5.24
CACHE_KWARG = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

__all__ = ["AutoDistributedModelForCausalLM", "DistributedModelForCausalLM", "RemoteCache", "new_tokens_mask"]


class DistributedModelForCausalLM(DistributedPreTrainedModel, GenerationMixin):
    def __init__(self, config: PretrainedConfig, client: SwarmClient | None = None):
        super().__init__(config, client)
        self.add_module(self.layout.head, nn.Linear(config.hidden_size, config.vocab_size, bias=False))
        self.logit_softcap = self.family.logit_softcap(config)  # Gemma 2: final-logit soft-capping

    @property
    def head(self) -> nn.Linear:
        return getattr(self, self.layout.head)

    def local_heads(self) -> dict[str, nn.Module]:
        return {self.layout.head: self.head}

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def next_token_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The last block's output [..., hidden] -> next-token logits [..., vocab] (the model's dtype): the
        final norm, then ``head_logits``. With ``embed``, all the client computes of the model itself."""
        return self.head_logits(self.base.final_norm(hidden))

    def head_logits(self, normed: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states [..., hidden] (the base model's output) -> logits [..., vocab]: the LM head,
        then the family's final-logit soft-capping (Gemma 2/3), as transformers computes them."""
        return soft_cap(self.head(normed), self.logit_softcap)

    def generate(self, inputs: torch.Tensor | None = None, *args, session: InferenceSession | None = None, **kwargs):
        if kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None:
            return super().generate(inputs, *args, **kwargs)
        session = session or self._active_session
        if session is not None:
            return self._generate_verified(session, inputs, args, kwargs)
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        if ids is None and kwargs.get("inputs_embeds") is not None:
            ids = kwargs["inputs_embeds"]
        prompt_length = ids.shape[1] if ids is not None else 1
        max_length = self._max_length(prompt_length, kwargs)
        with self.inference_session(max_length) as new_session:
            return self._generate_verified(new_session, inputs, args, kwargs)

    def _generate_verified(self, session: InferenceSession, inputs, args: tuple, kwargs: dict):
        """transformers' ``generate`` on ``session``; its steps are confirmed by verification before it returns.
        When a check took outputs back (``SessionRewound``), generation resumes from the last verified token
        (``client.resume``), so the tokens returned are those honest servers give."""
        recorder = Recorder()
        kwargs = dict(kwargs)
        criteria = StoppingCriteriaList([*(kwargs.pop("stopping_criteria", None) or []), recorder])
        call_inputs, call_kwargs, resumed = inputs, kwargs, False
        while True:
            try:
                output = super().generate(
                    call_inputs, *args, stopping_criteria=criteria, **{CACHE_KWARG: RemoteCache(session)}, **call_kwargs
                )
                session.confirm()
            except SessionRewound as rewound:
                if kwargs.get("streamer") is not None:
                    raise UnverifiedOutputStreamed(
                        f"{rewound}; tokens already given to the streamer were wrong"
                    ) from rewound
                call_inputs, call_kwargs = self._resumption(session, inputs, kwargs, recorder)
                resumed = call_inputs is not inputs  # else it starts again from the caller's prompt
                if call_kwargs.get("max_new_tokens") == 0:  # nothing left to generate after the verified prefix
                    output = call_inputs
                    break
                continue
            break
        return (
            self._padded(output, inputs if inputs is not None else kwargs.get("input_ids"), kwargs)
            if resumed
            else output
        )

    def _resumption(self, session: InferenceSession, inputs, kwargs: dict, recorder: Recorder) -> tuple:
        """``generate``'s inputs and keyword arguments to go on from the verified prefix the session went back to
        (or, where that cannot be resumed, to start again: beam search, ``inputs_embeds``, a trainable prompt)."""
        prompt = inputs if inputs is not None else kwargs.get("input_ids")
        config = kwargs.get("generation_config") or self.generation_config
        prefix = self.base.prompt_tuning.pre_seq_len if self.base.prompt_tuning is not None else 0
        beams = kwargs.get("num_beams") or getattr(config, "num_beams", 1) or 1
        if prompt is None or beams > 1 or 0 < session.position <= prefix:
            session.rewind(0)
            return inputs, kwargs
        held = session.padding[:, session.prefix :] if session.padding is not None else None
        verified = session.position - session.prefix
        resume = resume_from(verified, prompt, kwargs.get("attention_mask"), recorder.ids, held)
        changed = {"attention_mask": resume.attention_mask, **left_tokens(kwargs, config, resume.kept)}
        rest = {name: value for name, value in kwargs.items() if name not in ("input_ids", "attention_mask")}
        return resume.ids, {**rest, **changed}

    def _padded(self, output, prompt: torch.Tensor | None, kwargs: dict):
        """A resumed generation's sequences with rows that had ended before the rewind padded, as transformers
        ends them (``client.resume.pad_after_eos``)."""
        if prompt is None:
            return output
        config = kwargs.get("generation_config") or self.generation_config
        eos = kwargs.get("eos_token_id", config.eos_token_id)
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        pad = kwargs.get("pad_token_id", config.pad_token_id)
        if isinstance(output, torch.Tensor):
            return pad_after_eos(output, prompt.shape[1], eos, pad)
        output.sequences = pad_after_eos(output.sequences, prompt.shape[1], eos, pad)
        return output

    def _max_length(self, prompt_length: int, kwargs: dict) -> int:
        config = kwargs.get("generation_config") or self.generation_config
        new_tokens = kwargs.get("max_new_tokens") or getattr(config, "max_new_tokens", None)
        prefix = self.base.prompt_tuning.pre_seq_len if self.base.prompt_tuning is not None else 0
        if new_tokens is not None:
            return prefix + prompt_length + new_tokens
        return prefix + max(kwargs.get("max_length") or config.max_length or 0, prompt_length + 1)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        cache: Cache | None = None,  # transformers >= 5.24 passes the cache under this name
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        past_key_values = cache if cache is not None else past_key_values
        outputs = self.base(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.head_logits(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        result = with_cache(
            CausalLMOutputWithPast, past_key_values, loss=loss, logits=logits, hidden_states=outputs.hidden_states
        )
        return result.to_tuple() if return_dict is False else result


AutoDistributedModelForCausalLM = DistributedModelForCausalLM
