"""How ``generate`` goes on after verification took outputs back (``client.verify.SessionRewound``).

A lazy check (the default ``verify``) may find, a few steps late, that a server's outputs were wrong. The
session then goes back to the last verified token on honest servers, and ``generate`` resumes from there:
the tokens up to that point were computed from verified outputs, so it calls transformers' ``generate``
again with them as the prompt and as many new tokens as are left. Greedy decoding thus returns exactly
what an honest swarm gives. Sampling goes on from the verified prefix with the random state where it is:
the result is a sample from the model, but not the one the same seed gives without a rewind. Beam search,
``inputs_embeds`` and a rewind into a trainable prompt restart the whole generation instead; a streamer
cannot take tokens back, so a rewind under a streamer raises ``UnverifiedOutputStreamed``.

Pure functions and one small recorder; no I/O.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import StoppingCriteria

from swarm.errors import StamenError


class UnverifiedOutputStreamed(StamenError):
    """A check found wrong outputs after their tokens had gone to the caller's streamer."""


class Recorder(StoppingCriteria):
    """A stopping criterion that never stops: it keeps the sequences so far (prompt and generated tokens)."""

    def __init__(self):
        self.ids: torch.Tensor | None = None  # [batch, tokens]

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        self.ids = input_ids
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@dataclasses.dataclass(frozen=True)
class Resume:
    """How to call ``generate`` again after a rewind."""

    ids: torch.Tensor  # [batch, tokens]: the verified prefix, as the new prompt
    attention_mask: torch.Tensor | None  # [batch, tokens], or None if the caller gave none
    kept: int  # tokens of ``ids`` that ``generate`` had generated (the rest is the caller's prompt)


def resume_from(
    verified: int,
    prompt: torch.Tensor,
    attention_mask: torch.Tensor | None,
    recorded: torch.Tensor | None,
    held: torch.Tensor | None,
) -> Resume:
    """The prompt for resuming once the session holds the caller's first ``verified`` tokens: every token
    sent to the session up to and including the one at ``verified`` (it came from a verified output), or
    the whole ``prompt`` [batch, prompt_tokens] if that is longer. ``recorded``: the sequences generated so
    far (``Recorder.ids``), None if no token was generated yet; ``held``: the padding mask of the tokens the
    session holds, [batch, verified] bool. The new prompt's mask is the caller's ``attention_mask`` when it
    is the caller's prompt again, else the held one and a new (generated, never padding) token: never one
    transformers would infer from a generated token that happens to be the pad token."""
    known = recorded if recorded is not None else prompt
    length = max(verified + 1, prompt.shape[1])
    ids = known[:, :length]
    mask = attention_mask
    if length > prompt.shape[1]:
        dtype = attention_mask.dtype if attention_mask is not None else torch.long
        held = held if held is not None else torch.ones(ids.shape[0], verified, dtype=torch.bool)
        mask = torch.ones(ids.shape[0], length, dtype=dtype, device=ids.device)
        mask[:, :verified] = held[:, :verified].to(dtype)
    return Resume(ids, mask, ids.shape[1] - prompt.shape[1])


def left_tokens(kwargs: dict, config, kept: int) -> dict:
    """``generate``'s keyword arguments for the new tokens still to come after ``kept`` were generated
    (``max_new_tokens`` and ``min_new_tokens`` count from the prompt; ``max_length`` is absolute)."""
    changed = {}
    for name in ("max_new_tokens", "min_new_tokens"):
        value = kwargs.get(name, getattr(config, name, None))
        if value is not None:
            changed[name] = max(0, value - kept)
    return changed


def pad_after_eos(sequences: torch.Tensor, prompt_tokens: int, eos: list[int], pad: int | None) -> torch.Tensor:
    """As transformers ends rows of a batch: after a row's first eos among the generated tokens, only
    padding; the sequences end once every row has ended. A resumed ``generate`` does not know which rows
    had ended before the rewind, so this is applied to its result."""
    if not eos or sequences.shape[1] <= prompt_tokens:
        return sequences
    pad = eos[0] if pad is None else pad
    generated = sequences[:, prompt_tokens:]
    is_eos = torch.isin(generated, torch.tensor(eos, device=sequences.device))
    ended = (is_eos.cumsum(dim=1) - is_eos.long()) > 0  # after the first eos
    generated = generated.masked_fill(ended, pad)
    if bool(is_eos.any(dim=1).all()):
        last = int(is_eos.long().argmax(dim=1).max())
        generated = generated[:, : last + 1]
    return torch.cat([sequences[:, :prompt_tokens], generated], dim=1)
