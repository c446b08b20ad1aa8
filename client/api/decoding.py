"""Per-request decoding: sampling a token from logits, and turning tokens into text with stop strings and eos.

Pure functions and one small state class per request (``TextTracker``); no I/O, no shared state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from client.api.protocol import Sampling


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """One token from ``logits`` [vocab] (float32): argmax at temperature 0, else temperature + top-p sampling
    with this request's own ``generator`` (so a seeded request gives the same tokens whoever else is served)."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        probs, order = probs.sort(descending=True)
        before = probs.cumsum(0) - probs  # probability of the tokens ranked above each one
        probs = probs.masked_fill(before >= sampling.top_p, 0.0)  # keeps at least the first token
        return int(order[torch.multinomial(probs, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


def eos_ids(generation_config, tokenizer) -> frozenset[int]:
    """The tokens that end a completion: the model's generation config's eos (as transformers' ``generate``
    uses), else the tokenizer's."""
    eos = getattr(generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return frozenset([eos] if isinstance(eos, int) else eos or [])


def new_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed % 2**64)
    return generator


def stop_at(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the earliest stop string begins in ``text``, or None."""
    found = [index for stop in stops if (index := text.find(stop)) >= 0]
    return min(found) if found else None


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of ``text`` must wait before being sent: an incomplete character
    (U+FFFD from a token that ends inside a UTF-8 sequence) or the beginning of a possible stop string."""
    longest = len(text) - len(text.rstrip("\ufffd"))
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest


@dataclass
class TextTracker:
    """Tokens of one completion -> its text, finish reason, and the pieces to stream.

    The text is always ``decode(all tokens)`` (so it equals decoding the whole completion at once), cut
    before the first stop string; a piece is sent only once no later token can change it."""

    decode: object  # tokens -> text (the tokenizer's decode, skipping special tokens)
    stops: tuple[str, ...]
    eos_ids: frozenset[int]
    max_tokens: int
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: str = ""  # the text streamed so far (always a prefix of ``text``)
    finish_reason: str | None = None  # "stop" (eos or a stop string) or "length"

    def add(self, token: int) -> str:
        """Take the next generated token; return the new text that can be sent now (maybe empty)."""
        self.tokens.append(token)
        if token in self.eos_ids:
            self.finish_reason = "stop"
        else:
            self.text = self.decode(self.tokens)
            cut = stop_at(self.text, self.stops)
            if cut is not None:
                self.text, self.finish_reason = self.text[:cut], "stop"
            elif len(self.tokens) >= self.max_tokens:
                self.finish_reason = "length"
        ready = self.text if self.finish_reason else self.text[: len(self.text) - held_back(self.text, self.stops)]
        if not ready.startswith(self.sent):  # decoding more tokens rewrote sent text (rare): send no more of it
            return ""
        piece, self.sent = ready[len(self.sent) :], ready
        return piece
