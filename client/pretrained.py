"""DistributedPreTrainedModel: loading a model's local parts, connecting to the swarm, and the tuning API
shared by the causal LM and the sequence classifier."""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, GenerationConfig, PretrainedConfig, PreTrainedModel

from client.base import DistributedModel, Layout
from client.config import ClientConfig
from client.layers import BlocksState
from client.lora import RemoteLora
from client.private import LocalBlocks
from client.ptune import PromptTuning
from client.referee import LocalReferee
from client.session import InferenceSession
from client.swarmclient import SwarmClient
from swarm.models.adapters import DEFAULT_TARGETS, linear_layers, load_adapter, save_adapter
from swarm.models.families import family_for
from swarm.models.modelpath import DEFAULT_MODEL, resolve_model
from swarm.models.weights import load_tensors, tensor_index
from swarm.spans import model_prefix

logger = logging.getLogger(__name__)

CONFIG_OPTIONS = ("num_labels", "id2label", "label2id", "problem_type", "pad_token_id")  # from_pretrained may set


class DistributedPreTrainedModel(PreTrainedModel):
    config_class = PretrainedConfig
    main_input_name = "input_ids"

    def __init__(self, config: PretrainedConfig, client: SwarmClient | None = None):
        super().__init__(config)
        self.family = family_for(config)  # checks that this variant of the family can be served
        self.layout = Layout.of(self.family)
        self.base_model_prefix = self.layout.base
        self.blocks_state = BlocksState(lambda: self.client.passes, config.num_hidden_layers)
        self.add_module(self.layout.base, DistributedModel(config, self.family, self.layout, self.blocks_state))
        self.client = client
        self._local = threading.local()  # per thread: the session of an enclosing ``inference_session``

    # -- the local parts, where the family keeps them (and the old top-level names, read-only) --

    @property
    def base(self) -> DistributedModel:
        return getattr(self, self.layout.base)

    @property
    def embed_tokens(self) -> nn.Module:
        return self.base.embeddings

    @property
    def norm(self) -> nn.Module:
        return self.base.final_norm

    def get_input_embeddings(self) -> nn.Module:
        return self.base.embeddings

    def embed(
        self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None, prefix: bool = False
    ) -> torch.Tensor:
        """The input of the first remote block (``DistributedModel.embed``): token embeddings with the family's
        scale, its embedding norm, and with ``prefix`` the trainable prompt prefix where prompt tuning is on."""
        return self.base.embed(input_ids, inputs_embeds, prefix)

    # -- loading --

    @classmethod
    def from_pretrained(
        cls,
        model: str | None = None,
        initial_peers: list[str] | tuple[str, ...] = (),
        dht_prefix: str | None = None,
        dtype: torch.dtype = torch.float32,
        swarm_key: str | None = None,
        tuning_mode: str | None = None,
        pre_seq_len: int = 0,
        adapter: str | None = None,
        **options,
    ):
        """Load only the local parts of ``model`` (name or folder) and connect to the swarm.

        ``tuning_mode`` "ptune" / "deep_ptune" with ``pre_seq_len`` adds trainable prompts (everything else
        frozen); ``adapter`` uses a LoRA adapter preloaded on the servers; config options (e.g. ``num_labels``)
        and ClientConfig fields may be given as keywords."""
        name = model or DEFAULT_MODEL
        folder = resolve_model(model)
        overrides = {key: options.pop(key) for key in CONFIG_OPTIONS if key in options}
        config = AutoConfig.from_pretrained(folder, **overrides)
        client_config = ClientConfig(
            initial_peers=list(initial_peers), dht_prefix=dht_prefix, swarm_key=swarm_key, **options
        )
        instance = cls(config)
        instance._load_local_weights(folder, dtype)
        with contextlib.suppress(OSError):
            instance.generation_config = GenerationConfig.from_pretrained(folder)
        if tuning_mode is not None:
            instance.enable_prompt_tuning(tuning_mode, pre_seq_len)
        elif pre_seq_len:
            raise ValueError("pre_seq_len needs tuning_mode='ptune' or 'deep_ptune'")
        if adapter is not None:
            instance.use_adapter(adapter)
        local = None
        if client_config.local_blocks or client_config.local_last_blocks:  # private mode: some blocks run here
            first, last = client_config.local_blocks, client_config.local_last_blocks
            local = LocalBlocks(folder, config, first, last, instance.dtype)
        instance.client = SwarmClient(client_config, dht_prefix or model_prefix(name), config.num_hidden_layers)
        instance.client.local = instance.blocks_state.local = local
        instance.client.referee = LocalReferee(folder, config)  # loads a span's blocks only if a dispute needs it
        return instance.eval()

    def local_heads(self) -> dict[str, nn.Module]:
        """Modules at the top besides the base model (the family's LM head, a score head...)."""
        return {}

    def _load_local_weights(self, folder: Path, dtype: torch.dtype) -> None:
        """The embeddings (and embedding norm), final norm and heads, by the checkpoint's own names; a tied LM
        head shares the embeddings' weight; a head the checkpoint lacks (a new classifier) is initialised."""
        layout, index = self.layout, tensor_index(folder)
        tied = self.family.tied_head(self.config) and layout.head in self.local_heads()
        parts = {
            f"{layout.base}.{layout.embed}": self.base.embeddings,
            f"{layout.base}.{layout.norm}": self.base.final_norm,
        }
        if layout.embed_norm is not None:
            parts[f"{layout.base}.{layout.embed_norm}"] = self.base.get_submodule(layout.embed_norm)
        heads = {name: head for name, head in self.local_heads().items() if not (tied and name == layout.head)}
        wanted = {}  # checkpoint tensor name -> our state dict key
        for path, module in {**parts, **heads}.items():
            prefix = self.family.checkpoint_prefix(f"{path}.", index)
            wanted.update({prefix + key: f"{path}.{key}" for key in module.state_dict()})
        state = {wanted[name]: value for name, value in load_tensors(folder, wanted.__contains__, dtype, index).items()}
        for name, head in heads.items():
            for key in head.state_dict():
                if f"{name}.{key}" not in state and name != layout.head:
                    self._init_missing(f"{name}.{key}", state)
        missing = [key for key in wanted.values() if key not in state]
        if missing:
            raise ValueError(f"{folder} lacks the local weights {missing}")
        self.load_state_dict(state, strict=False, assign=True)
        if tied:
            getattr(self, layout.head).weight = self.base.embeddings.weight
        self.to(dtype)

    def _init_missing(self, key: str, state: dict) -> None:
        """A head the checkpoint lacks (e.g. a new classifier): initialised as transformers does."""
        logger.warning("%s is not in the checkpoint: newly initialised; train it before use", key)
        tensor = self.get_parameter(key).detach()
        state[key] = torch.empty_like(tensor, device="cpu").normal_(
            0.0, getattr(self.config, "initializer_range", 0.02)
        )

    # -- tuning --

    def enable_prompt_tuning(self, mode: str, pre_seq_len: int) -> PromptTuning:
        """Trainable prompts (``client.ptune``); every other parameter is frozen."""
        std = float(self.base.embeddings.weight.detach().std())
        tuning = PromptTuning(mode, pre_seq_len, self.config.hidden_size, self.config.num_hidden_layers, std)
        self._freeze_pretrained()
        self.base.prompt_tuning = tuning
        return tuning

    def add_lora(
        self, rank: int = 8, alpha: float = 16.0, target_modules: tuple[str, ...] | list[str] = DEFAULT_TARGETS
    ) -> RemoteLora:
        """LoRA adapters on the remote blocks' linear layers named ``target_modules`` (e.g. "q_proj"), kept and
        trained here, sent with every request. Every other parameter is frozen."""
        if self.blocks_state.lora is not None or self.blocks_state.adapter_name is not None:
            raise ValueError("this model already has an adapter")
        lora = RemoteLora(
            linear_layers(self.family, self.config), self.config.num_hidden_layers, rank, alpha, target_modules
        )
        self._freeze_pretrained()
        self.base.blocks.lora = lora  # model.<base>.<layers>.lora: found by model.parameters()
        self.blocks_state.lora = lora
        return lora

    def _freeze_pretrained(self) -> None:
        """Freeze the checkpoint's weights (prompts and LoRA weights already attached stay trainable)."""
        tuned = {id(p) for p in self.base.prompt_tuning.parameters()} if self.base.prompt_tuning is not None else set()
        if self.blocks_state.lora is not None:
            tuned |= {id(p) for p in self.blocks_state.lora.parameters()}
        for param in self.parameters():
            if id(param) not in tuned:
                param.requires_grad_(False)

    def use_adapter(self, name: str | None) -> None:
        """Use a LoRA adapter preloaded on the servers (``--adapters NAME=PATH``); None: no adapter."""
        if self.blocks_state.lora is not None:
            raise ValueError("this model has its own LoRA weights (add_lora); it cannot use a server's adapter too")
        self.blocks_state.adapter_name = name

    def save_adapter(self, folder: str | Path) -> Path:
        """Write the LoRA weights in the folder format servers preload (``--adapters NAME=FOLDER``)."""
        if self.blocks_state.lora is None:
            raise ValueError("no LoRA weights to save: call add_lora first")
        adapter, _ = self.blocks_state.lora.adapter(self.base.blocks.span)
        return save_adapter(folder, adapter, self.config.model_type)

    def load_adapter(self, folder: str | Path) -> RemoteLora:
        """Read LoRA weights saved by ``save_adapter`` into this model's LoRA (attached if needed)."""
        adapter = load_adapter(folder)
        if self.blocks_state.lora is None:
            self.add_lora(adapter.rank, adapter.alpha, sorted(adapter.modules()))
        self.blocks_state.lora.load(adapter)
        return self.blocks_state.lora

    def session_adapter(self):
        """What inference sessions carry: the LoRA weights (detached) or a preloaded adapter's name."""
        if self.blocks_state.lora is not None:
            return self.blocks_state.lora.adapter(self.base.blocks.span)[0]
        return self.blocks_state.adapter_name

    # -- sessions and lifecycle --

    @contextlib.contextmanager
    def inference_session(self, max_length: int):
        """Keep one server-side session across several ``generate`` calls (pass the whole history)."""
        session = InferenceSession(self.client, max_length, self.session_adapter())
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

    @property
    def flagged_servers(self) -> set[str]:
        """Peer ids of the servers caught answering wrongly (``client.verify``); never used again."""
        return self.client.routes.flagged if self.client is not None else set()

    def shutdown(self) -> None:
        """Leave the swarm (also done at interpreter exit)."""
        if self.client is not None:
            self.client.shutdown()
            self.client = None
