"""AutoDistributedModelForCausalLM: local embeddings, final norm and LM head; blocks in the swarm.

It is a transformers ``PreTrainedModel`` with ``GenerationMixin``, so ``generate`` works as usual
(greedy, sampling, eos, padded batches, streamers). During ``generate`` the model's cache is a
``RemoteCache`` that stands for an inference session: its length is the number of tokens the
servers already hold, which is how transformers knows to send only new tokens.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from client.config import ClientConfig
from client.session import InferenceSession
from client.swarmclient import SwarmClient
from swarm.models.families import get_family
from swarm.models.modelpath import DEFAULT_MODEL, resolve_model
from swarm.models.weights import load_tensors, tensor_index
from swarm.spans import model_prefix

logger = logging.getLogger(__name__)


class RemoteCache(Cache):
    """The transformers-side face of an inference session: it only reports how many tokens it holds."""

    def __init__(self, session: InferenceSession):
        super().__init__(layers=[])
        self.session = session

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.session.position

    @property
    def is_compileable(self) -> bool:
        return False


class DistributedModelForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = PretrainedConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"

    def __init__(self, config: PretrainedConfig, client: SwarmClient | None = None):
        super().__init__(config)
        family = get_family(config.model_type)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, getattr(config, "pad_token_id", None))
        self.norm = family.norm_class(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.client = client
        self._local = threading.local()  # per thread: the session of an enclosing ``inference_session``

    @classmethod
    def from_pretrained(
        cls,
        model: str | None = None,
        initial_peers: list[str] | tuple[str, ...] = (),
        dht_prefix: str | None = None,
        dtype: torch.dtype = torch.float32,
        swarm_key: str | None = None,
        **client_options,
    ) -> DistributedModelForCausalLM:
        """Load only the local parts of ``model`` (name or folder) and connect to the swarm."""
        name = model or DEFAULT_MODEL
        folder = resolve_model(model)
        config = AutoConfig.from_pretrained(folder)
        client_config = ClientConfig(
            initial_peers=list(initial_peers), dht_prefix=dht_prefix, swarm_key=swarm_key, **client_options
        )
        prefix = dht_prefix or model_prefix(name)
        instance = cls(config)
        instance._load_local_weights(folder, dtype)
        with contextlib.suppress(OSError):
            instance.generation_config = GenerationConfig.from_pretrained(folder)
        instance.client = SwarmClient(client_config, prefix, config.num_hidden_layers)
        return instance.eval()

    def _load_local_weights(self, folder: Path, dtype: torch.dtype) -> None:
        family = get_family(self.config.model_type)
        wanted = {
            family.embed_key: "embed_tokens.weight",
            family.norm_key: "norm.weight",
            family.head_key: "lm_head.weight",
        }
        state = load_tensors(folder, lambda name: name in wanted, dtype, tensor_index(folder))
        if family.head_key not in state:  # tied embeddings
            state[family.head_key] = state[family.embed_key]
        missing = [key for key in wanted if key not in state]
        if missing:
            raise ValueError(f"{folder} lacks the local weights {missing}")
        self.load_state_dict({wanted[key]: value for key, value in state.items()}, strict=True, assign=True)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    @contextlib.contextmanager
    def inference_session(self, max_length: int):
        """Keep one server-side session across several ``generate`` calls (pass the whole history)."""
        session = self.client.inference_session(max_length)
        previous, self._local.session = self._active_session, session
        try:
            with session:
                yield session
        finally:
            self._local.session = previous

    @property
    def _active_session(self) -> InferenceSession | None:
        """The session of this thread's enclosing ``inference_session`` (threads never share one)."""
        return getattr(self._local, "session", None)

    def generate(self, inputs: torch.Tensor | None = None, *args, session: InferenceSession | None = None, **kwargs):
        if kwargs.get("past_key_values") is not None:
            return super().generate(inputs, *args, **kwargs)
        session = session or self._active_session
        if session is not None:
            return super().generate(inputs, *args, past_key_values=RemoteCache(session), **kwargs)
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        prompt_length = ids.shape[1] if ids is not None else 1
        max_length = self._max_length(prompt_length, kwargs)
        with self.inference_session(max_length) as new_session:
            return super().generate(inputs, *args, past_key_values=RemoteCache(new_session), **kwargs)

    def _max_length(self, prompt_length: int, kwargs: dict) -> int:
        config = kwargs.get("generation_config") or self.generation_config
        new_tokens = kwargs.get("max_new_tokens") or getattr(config, "max_new_tokens", None)
        if new_tokens is not None:
            return prompt_length + new_tokens
        return max(kwargs.get("max_length") or config.max_length or 0, prompt_length + 1)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        hidden = inputs_embeds if inputs_embeds is not None else self.embed_tokens(input_ids)
        session = past_key_values.session if isinstance(past_key_values, RemoteCache) else None
        past = session.position if session is not None else 0
        batch, tokens, _ = hidden.shape
        if position_ids is None:  # as transformers does: consecutive positions after the past
            position_ids = torch.arange(past, past + tokens).expand(batch, tokens)
        position_ids = position_ids.expand(batch, tokens).to(torch.int64)
        mask = new_tokens_mask(attention_mask, past, tokens, session.padding if session is not None else None)
        with torch.no_grad() if not torch.is_grad_enabled() else contextlib.nullcontext():
            if session is not None:
                hidden = session.step(hidden, position_ids, mask)
            else:
                hidden = self.client.forward(hidden, position_ids, mask)
        hidden = self.norm(hidden)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        return CausalLMOutputWithPast(logits=logits, past_key_values=past_key_values)

    def shutdown(self) -> None:
        """Leave the swarm (also done at interpreter exit)."""
        if self.client is not None:
            self.client.shutdown()
            self.client = None


AutoDistributedModelForCausalLM = DistributedModelForCausalLM


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
