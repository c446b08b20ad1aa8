"""What every distributed model shares: the family's layout, the base model, loading, and tuning.

A model keeps the modules where the family's transformers class keeps them, so tools that look
modules up by name find them: for Llama-style families ``model.model.embed_tokens``,
``model.model.layers`` (the remote blocks, ``client.layers``), ``model.model.norm`` and the head at
the top (``model.lm_head``, ``model.score``). The names come from the family adapter's weight names,
so the model's state dict keys are the checkpoint's own.

Tuning, all on the client (the servers' weights stay frozen): prompt tuning (``tuning_mode="ptune"`` or
``"deep_ptune"``, ``client.ptune``), LoRA adapters on the remote blocks' linear layers (``add_lora``,
``client.lora``), or a LoRA adapter preloaded on the servers, chosen by name (``use_adapter``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast

from client.layers import BlocksState, RemoteBlocks
from client.ptune import PromptTuning
from client.session import InferenceSession
from swarm.models.families import Family

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """Where the family's transformers class keeps its modules (from the family's ``LocalLayout``)."""

    base: str  # the base model's attribute, e.g. "model"
    embed: str  # inside the base model, e.g. "embed_tokens"
    layers: str  # inside the base model, e.g. "layers"
    norm: str  # inside the base model, e.g. "norm"
    head: str  # at the top, e.g. "lm_head"
    embed_norm: str | None = None  # inside the base model: a norm right after the embeddings (BLOOM)

    @classmethod
    def of(cls, family: Family) -> Layout:
        local = family.layout
        base = local.base.rstrip(".")
        inside = {}
        for field, path in (("embed", local.embed), ("layers", local.layers), ("norm", local.norm)):
            if not path.startswith(base + ".") or "." in path[len(base) + 1 :]:
                raise ValueError(f"family {family.model_type}: {path} is not a module of {base}")
            inside[field] = path[len(base) + 1 :]
        embed_norm = local.embed_norm[len(base) + 1 :] if local.embed_norm else None
        return cls(base, inside["embed"], inside["layers"], inside["norm"], local.head, embed_norm)


class RemoteCache(Cache):
    """The transformers-side face of an inference session: how many tokens it holds (the caller's, not a
    trainable prefix), and the reorders beam search asks for (sent to the servers with the next step)."""

    def __init__(self, session: InferenceSession):
        super().__init__(layers=[])
        self.session = session

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.session.position - self.session.prefix

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.session.reorder(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.session.batch_size is not None and indices.numel() != self.session.batch_size:
            raise NotImplementedError("a remote session keeps its batch size; it cannot drop or add rows")
        self.session.reorder(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            raise NotImplementedError("a remote session keeps its batch size; it cannot repeat rows")

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise NotImplementedError("a remote session cannot drop tokens it holds (assisted decoding)")

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_linear(self) -> list[bool]:
        """One attention cache (not a linear-attention state), so generate sends only the tokens it lacks."""
        return [False]


class DistributedModel(nn.Module):
    """The base model (``model.model``): local embeddings, the remote blocks, the local final norm."""

    def __init__(self, config: PretrainedConfig, family: Family, layout: Layout, state: BlocksState):
        super().__init__()
        self.layout, self.blocks_state = layout, state
        self.add_module(layout.embed, family.build_embedding(config))
        if layout.embed_norm is not None:
            self.add_module(layout.embed_norm, family.build_embed_norm(config))
        self.add_module(layout.layers, RemoteBlocks(state))
        self.add_module(layout.norm, family.build_norm(config))
        self.prompt_tuning: PromptTuning | None = None

    @property
    def embeddings(self) -> nn.Module:
        return getattr(self, self.layout.embed)

    @property
    def blocks(self) -> RemoteBlocks:
        return getattr(self, self.layout.layers)

    @property
    def final_norm(self) -> nn.Module:
        return getattr(self, self.layout.norm)

    def embed(
        self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None, prefix: bool = False
    ) -> torch.Tensor:
        """The first block's input [batch, tokens, hidden]: the token embeddings of ``input_ids`` [batch, tokens]
        (with the family's scale, e.g. Gemma's sqrt(hidden_size)) or the caller's ``inputs_embeds``, then the
        family's embedding norm (BLOOM's ``word_embeddings_layernorm``), as the family's transformers model
        does. With ``prefix`` and prompt tuning on, the trainable prompt prefix goes in front: [batch,
        pre_seq_len + tokens, hidden]. The one place the client computes its input to the blocks."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        hidden = inputs_embeds if inputs_embeds is not None else self.embeddings(input_ids)
        if self.layout.embed_norm is not None:
            hidden = getattr(self, self.layout.embed_norm)(hidden)
        if prefix and self.prompt_tuning is not None:
            hidden = torch.cat([self.prompt_tuning.prefix_for(hidden.shape[0], hidden.dtype), hidden], dim=1)
        return hidden

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Like the family's transformers base model: the final-normed hidden states, and with
        ``output_hidden_states`` the embeddings, every block's output and the final-normed output."""
        if output_attentions:
            raise NotImplementedError("output_attentions: servers do not return attention weights")
        if output_hidden_states not in (None, False, True):
            raise NotImplementedError("output_hidden_states takes True or False (not a selection of layers)")
        session = past_key_values.session if isinstance(past_key_values, RemoteCache) else None
        tuning = self.prompt_tuning
        with_prefix = tuning is not None and (session is None or session.position == 0)
        hidden = self.embed(input_ids, inputs_embeds, prefix=with_prefix)
        prefix = tuning.pre_seq_len if with_prefix else 0
        deep = tuning.deep_prompts(hidden.dtype) if tuning is not None else None
        if session is not None:
            output = self._session_step(session, hidden, attention_mask, position_ids, prefix, deep)
            if output_hidden_states:
                raise NotImplementedError(
                    "output_hidden_states inside an inference session (generate): run the "
                    "model outside generate, e.g. model(ids, output_hidden_states=True)"
                )
            block_outputs = ()
        else:
            mask, positions = _with_prefix(attention_mask, position_ids, prefix, hidden)
            result = self.blocks(hidden, mask, positions, deep, bool(output_hidden_states))
            output, block_outputs = result if output_hidden_states else (result, ())
        normed = self.final_norm(output)[:, prefix:]
        states = None
        if output_hidden_states:
            states = tuple(h[:, prefix:] for h in (hidden, *block_outputs)) + (normed,)
        return with_cache(BaseModelOutputWithPast, past_key_values, last_hidden_state=normed, hidden_states=states)

    def _session_step(self, session, hidden, attention_mask, position_ids, prefix: int, deep) -> torch.Tensor:
        """One step of an inference session (``generate``): only the new tokens are sent."""
        if torch.is_grad_enabled() and (hidden.requires_grad or (deep is not None and deep.requires_grad)):
            raise NotImplementedError(
                "gradients through an inference session are not supported: train with stateless calls "
                "(model(...) outside generate and inference_session), or run under torch.no_grad()"
            )
        batch, total, _ = hidden.shape
        past = session.position
        if position_ids is None:  # as transformers does: consecutive positions after the past
            positions = torch.arange(past, past + total).expand(batch, total)
        else:
            positions = position_ids.expand(batch, total - prefix) + session.prefix + prefix
            if prefix:
                positions = torch.cat([torch.arange(prefix).expand(batch, prefix), positions], dim=1)
        held = session.padding[:, session.prefix :] if session.padding is not None else None
        mask = new_tokens_mask(attention_mask, past - session.prefix, total - prefix, held)
        if mask is not None and prefix:
            mask = torch.cat([torch.ones(batch, prefix, dtype=torch.bool), mask], dim=1)
        if prefix:
            session.prefix = prefix
        return session.step(hidden, positions.to(torch.int64), mask, deep.detach() if deep is not None else None)


def with_cache(output_class, cache: Cache | None, **fields):
    """A transformers model output holding ``cache`` under the name its class uses ("past_key_values", or
    "cache" since transformers 5.24)."""
    name = "cache" if "cache" in output_class.__dataclass_fields__ else "past_key_values"
    return output_class(**fields, **{name: cache})


def _with_prefix(attention_mask, position_ids, prefix: int, hidden: torch.Tensor):
    """A stateless call's padding mask and positions, with a trainable prefix of ``prefix`` tokens in front."""
    batch, total, _ = hidden.shape
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[1] != total - prefix:
            raise ValueError(f"attention_mask must be a 2D padding mask of {total - prefix} tokens")
        attention_mask = attention_mask.bool()
        if prefix:
            attention_mask = torch.cat([torch.ones(batch, prefix, dtype=torch.bool), attention_mask], dim=1)
    if position_ids is not None:
        position_ids = position_ids.expand(batch, total - prefix) + prefix
        if prefix:
            position_ids = torch.cat([torch.arange(prefix).expand(batch, prefix), position_ids], dim=1)
    return attention_mask, position_ids


def new_tokens_mask(
    attention_mask: torch.Tensor | None, past: int, tokens: int, held: torch.Tensor | None = None
) -> torch.Tensor | None:
    """The padding mask of the new tokens, [batch, tokens] bool, from what the caller passed: a 2D mask of
    the whole sequence so far (past + new tokens, as ``generate`` passes it) or of the new tokens alone.
    The session keeps the rest (``held``, [batch, past]), so nothing here depends on how ``generate``
    slices its mask; a mask that would change the padding of tokens the servers already hold is refused."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or attention_mask.shape[1] not in (past + tokens, tokens):
        raise ValueError(
            f"attention_mask must be a 2D padding mask of {past + tokens} (past + new) or {tokens} (new) tokens, "
            f"got shape {list(attention_mask.shape)}"
        )
    mask = attention_mask.bool()
    if held is not None and mask.shape[1] == past + tokens and past and not torch.equal(mask[:, :past], held):
        raise ValueError(
            "attention_mask marks tokens the inference session already holds differently from when they were "
            "sent (transformers infers padding from pad_token_id when no mask is given: pass attention_mask)"
        )
    return mask[:, -tokens:]
