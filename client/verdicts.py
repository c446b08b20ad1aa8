"""The pure decisions of verification (``client.verify``): how far apart two answers are, when that is
too far for the dtypes involved, who is lying once a referee has spoken, how often to check, and which
servers to avoid as verifiers.

Tolerance (per token, relative L2 distance ||a - b|| / max(||a||, ||b||) of a span's output hidden states,
judged by the less precise dtype of the pair). Calibration: the last block's output of float32 vs the
same model in another dtype, per token, over random prompts:

- SmolLM2-135M-Instruct (the default model), all 30 blocks, 512 tokens: bfloat16 median 0.0135, p99
  0.039, max 0.106; float16 median 0.0016, p99 0.0038, max 0.0091. float32 vs float32 across batching
  and merged-vs-single steps: ~1e-6.
- The tests' tiny Llama (6 blocks, weights of std 0.1): bfloat16 max 0.023, float16 max 0.0037 (with
  weights of std 0.2, ill-conditioned on purpose elsewhere: bfloat16 max 0.16).

The thresholds are about twice the largest honest distance measured. A cheat larger than its dtype's
threshold is caught; a smaller one is not (a bfloat16 server may add noise up to ~20 % unseen, a float32
server only ~0.2 %), so a client that cares uses float32 verifiers, which are preferred anyway.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from swarm.net.records import ServerInfo
from swarm.routing.chains import uncovered_blocks
from swarm.spans import BlockRange

TOLERANCES = {torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 2e-1}  # per-token relative L2
PRECISION = {"float32": 3, "float16": 2, "bfloat16": 1}  # more is more precise (mantissa bits)
DEFAULT_VERIFY = 1 / 12  # the share of steps that end a check window: every 12th step checks the last 12


@dataclasses.dataclass(frozen=True)
class Evidence:
    """Why two answers to the same step disagree."""

    distance: float  # the largest per-token relative L2 distance between them
    tolerance: float  # what the dtypes involved allow
    token: int  # the index (in the step's tokens, row-major over the batch) of the token at ``distance``

    def __str__(self) -> str:
        return f"relative L2 distance {self.distance:.3g} > tolerance {self.tolerance:.3g} at token {self.token}"


@dataclasses.dataclass(frozen=True)
class Detection:
    peer_id: str  # the flagged server
    span: BlockRange  # the blocks it served (or checked) in this session
    position: int  # the session's processed tokens when it was caught
    step_position: int  # the first position of the disputed step
    evidence: Evidence
    role: str  # "suspect" (it served the session) or "shadow" (it was checking another server)


@dataclasses.dataclass
class VerifyStats:
    """What verification did for one client (all sessions)."""

    checks: int = 0  # steps whose output was compared with a shadow's
    tokens: int = 0  # of them, tokens compared
    mismatches: int = 0  # comparisons beyond tolerance (each one goes to a referee)
    skipped: int = 0  # steps left unchecked (no other server of the span, or its shadows failed)
    shadow_units: int = 0  # token-blocks computed by shadows and referees (work units)
    largest: dict[str, float] = dataclasses.field(default_factory=dict)  # dtype pair -> largest distance seen
    detections: list[Detection] = dataclasses.field(default_factory=list)
    unchecked: set[str] = dataclasses.field(default_factory=set)  # servers warned about as going unchecked (once)


def tolerance(dtype_a: torch.dtype, dtype_b: torch.dtype) -> float:
    """The largest honest per-token distance between answers computed in these dtypes."""
    return max(TOLERANCES.get(dtype_a, TOLERANCES[torch.bfloat16]), TOLERANCES.get(dtype_b, TOLERANCES[torch.bfloat16]))


def least_precise(dtypes: list[torch.dtype]) -> torch.dtype:
    """The dtype with the largest tolerance among ``dtypes`` (float32 if none)."""
    return max(dtypes, key=lambda d: TOLERANCES.get(d, TOLERANCES[torch.bfloat16]), default=torch.float32)


def distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-token relative L2 distance of two [batch, tokens, hidden] answers: [batch, tokens] (NaN or inf
    anywhere in a token makes its distance inf)."""
    a, b = a.double(), b.double()
    scale = torch.maximum(a.norm(dim=-1), b.norm(dim=-1)).clamp_min(1e-12)
    distance = (a - b).norm(dim=-1) / scale
    finite = torch.isfinite(a).all(dim=-1) & torch.isfinite(b).all(dim=-1)
    return torch.where(finite, distance, torch.full_like(distance, math.inf))


def worst_token(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[float, int]:
    """(the largest per-token distance, that token's index) of two [batch, tokens, hidden] answers; tokens
    that ``mask`` [batch, tokens] marks False (padding) do not count; answers of different shapes are
    infinitely far apart."""
    if a.shape != b.shape:
        return math.inf, 0
    distance = distances(a, b)
    if mask is not None:
        distance = torch.where(mask.to(torch.bool), distance, torch.zeros_like(distance))
    if distance.numel() == 0:
        return 0.0, 0
    worst = int(distance.reshape(-1).argmax())
    return float(distance.reshape(-1)[worst]), worst


def mismatch(
    a: torch.Tensor,
    b: torch.Tensor,
    dtype_a: torch.dtype,
    dtype_b: torch.dtype,
    mask: torch.Tensor | None = None,
) -> Evidence | None:
    """Evidence that ``a`` and ``b`` (two servers' outputs for the same inputs, [batch, tokens, hidden])
    are not the same computation, or None if they agree within the tolerance of their dtypes. ``mask``
    [batch, tokens] bool: only tokens marked True count (padding is not compared)."""
    largest, token = worst_token(a, b, mask)
    allowed = tolerance(dtype_a, dtype_b)
    return Evidence(largest, allowed, token) if largest > allowed else None


def verdict(suspect: Evidence | None, shadow: Evidence | None) -> str | None:
    """Who is wrong once a referee recomputed a disputed step: ``suspect`` and ``shadow`` are each side's
    disagreement with the referee. "suspect", "shadow", or None when the referee agrees with both or
    with neither (no majority: nobody is flagged)."""
    if suspect is not None and shadow is None:
        return "suspect"
    if shadow is not None and suspect is None:
        return "shadow"
    return None


def window(verify: float) -> int:
    """Steps per check: every step at verify=1, else round(1 / verify); 0 = never."""
    if not 0.0 <= verify <= 1.0:
        raise ValueError(f"verify must be within [0, 1], got {verify}")
    return 0 if verify == 0 else max(1, round(1 / verify))


def lag_limit(window: int) -> int:
    """Lazy checks: how many steps of a hop may be unchecked while a check of them is in flight before the
    session waits for it. A cheat is then caught within this many steps of its start, whatever the check's
    latency: W + 8 (20 at the default W = 12), at least W + W / 2."""
    return window + max(8, window // 2)


def less_precise(servers: list[ServerInfo], span: BlockRange, dtype: str) -> frozenset[str]:
    """Servers to avoid as verifiers of a server announcing ``dtype`` on ``span``: those less precise
    than it, if the rest still cover the span (else none: a less precise verifier beats none)."""
    rank = PRECISION.get(dtype, 0)
    worse = frozenset(s.peer_id for s in servers if PRECISION.get(s.dtype, 0) < rank)
    rest = [s for s in servers if s.peer_id not in worse]
    return frozenset() if uncovered_blocks(rest, span) else worse


def split_tokens(outputs: list[torch.Tensor], sizes: list[int]) -> list[torch.Tensor]:
    """Outputs of merged steps ([batch, tokens, hidden] each, consecutive steps joined along tokens) cut
    back into the outputs of steps of ``sizes`` new tokens, in order."""
    pieces, sizes = [], list(sizes)
    for output in outputs:
        start = 0
        while start < output.shape[1]:
            size = sizes.pop(0)
            pieces.append(output[:, start : start + size])
            start += size
    if sizes:
        raise ValueError(f"merged outputs cover fewer steps than given ({len(sizes)} left)")
    return pieces
