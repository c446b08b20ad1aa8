"""Fixtures of the API tests: tiny chat models (a tiny model of a family with a character tokenizer and a
chat template; the Llama one for most tests), a swarm of one with ``python -m client.api`` in front, and
local references: transformers' greedy continuation, and the API's own sampler on transformers' logits."""

from __future__ import annotations

import json
import shutil
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import torch
from tokenizers import Tokenizer, decoders, models
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from client.api.decoding import eos_ids, new_generator, sample
from client.api.protocol import Sampling
from swarm.tools.localswarm import LocalSwarm

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3: pad, bos, eos (as in the tiny config), unknown
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def characters(count: int) -> list[str]:
    """``count`` distinct characters (newline, then printable ones, ASCII first), one token each."""
    found = ["\n"]
    for code in range(32, 0x500):
        char = chr(code)
        if (char == " " or unicodedata.category(char)[0] in "LNPS") and char not in found:
            found.append(char)
        if len(found) == count:
            return found
    raise ValueError("not enough characters")


def add_char_tokenizer(folder: Path, vocab_size: int) -> None:
    """A tokenizer whose tokens are single characters (no merges), with the tiny model's special tokens."""
    vocab = {token: index for index, token in enumerate(SPECIALS + characters(vocab_size - len(SPECIALS)))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.add_special_tokens(SPECIALS)
    tokenizer.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)


def make_chat_model(source: Path, folder: Path, **config_changes) -> Path:
    """A copy of the tiny model in ``source`` with the character tokenizer, and ``config_changes`` applied."""
    shutil.copytree(source, folder)
    add_char_tokenizer(folder, vocab_size=256)
    if config_changes:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **config_changes}))
    return folder


@pytest.fixture(scope="session")
def chat_model(tiny_models, tmp_path_factory) -> Path:
    return make_chat_model(tiny_models["llama"], tmp_path_factory.mktemp("chat") / "tiny-chat")


class Reference:
    """Local greedy decoding with transformers, on the same token ids the API builds."""

    def __init__(self, folder: Path):
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder).eval()

    def chat_ids(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def greedy(self, ids: list[int], max_tokens: int) -> tuple[str, list[int]]:
        prompt = torch.tensor([ids])
        output = self.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_tokens,
                                     do_sample=False)  # fmt: skip
        tokens = output[0, len(ids) :].tolist()
        return self.tokenizer.decode(tokens, skip_special_tokens=True), tokens

    def sampled(self, ids: list[int], max_tokens: int, sampling: Sampling) -> tuple[str, list[int]]:
        """What the API's sampler, seeded as the request, picks from transformers' next-token logits of the
        same ids, token by token until eos or ``max_tokens``."""
        generator, eos, tokens = new_generator(sampling.seed), eos_ids(self.model.generation_config, self.tokenizer), []
        with torch.no_grad():
            while len(tokens) < max_tokens and not (tokens and tokens[-1] in eos):
                logits = self.model(torch.tensor([ids + tokens])).logits[0, -1].float()  # [vocab]
                tokens.append(sample(logits, sampling, generator))
        return self.tokenizer.decode(tokens, skip_special_tokens=True), tokens


@pytest.fixture(scope="session")
def reference(chat_model) -> Reference:
    return Reference(chat_model)


@dataclass
class API:
    """A swarm of the tiny chat model (servers "alpha" 0:3 and "beta" 3:6) with the API in front."""

    swarm: LocalSwarm
    url: str
    client: openai.OpenAI

    @property
    def route(self) -> list[tuple[str, str, str]]:
        """(peer id, public name, blocks) of the servers, in chain order."""
        return [(server.peer_id, name, server.blocks) for server, name in zip(self.swarm.servers, NAMES, strict=True)]


NAMES = ("alpha", "beta")


def openai_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="not-needed", max_retries=0, timeout=60)


@pytest.fixture(scope="package")
def api(chat_model):
    """Started once for the tests of this folder that use it (the browser test included)."""
    with LocalSwarm() as swarm:
        spans = zip(("0:3", "3:6"), NAMES, strict=True)
        swarm.start(chat_model, [(blocks, ("--public-name", name)) for blocks, name in spans])
        process = swarm.start_api(chat_model, "--wait-for-blocks", "1", "--max-prompt-tokens", "200")
        client = openai_client(process.url)
        try:
            yield API(swarm, process.url, client)
        finally:
            client.close()
