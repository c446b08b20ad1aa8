"""Hostile messages for a live server, drawn by Hypothesis: tensors, adapters, opens, step specs, requests of
every kind, pushes, unary calls and raw frames, malformed on purpose (often valid, often not).

``play_acts`` plays acts (``tests.swarm.hostile``: streams, raw frames, pushes, unary calls, floods) in a fixed
mix, each drawn by Hypothesis from a seed: the same acts on every run, no example database. The ``draw_*``
helpers take Hypothesis' ``draw`` and build one message from module-level strategies (built once: a strategy
made per draw costs more than the draw). Large payloads (hidden states, random bytes) are built from a drawn
seed, so examples stay small for Hypothesis while the server gets megabytes. ``tests.swarm.test_fuzz`` plays a
thousand acts; ``benchmarks/fuzz.py`` ten thousand or more.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass

import torch
from hivemind.p2p import P2P
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from proto import pb
from tests.swarm.hostile import (
    HIDDEN,
    Flood,
    Fuzzer,
    Pushes,
    RawFrames,
    RawMessage,
    StreamAct,
    Unary,
    header_request,
    open_request,
    relay_request,
    step_request,
)

CACHE_TOKENS = 2048  # the fuzzed server's KV budget
MAX_SESSIONS_PER_PEER = 4
PEER_ID_LIKE = "12D3KooWGzBPmD6C4nj3ss1n4bYnpoc7XgpCfiEHRAzNixBBnF5u"
U32, U64 = 2**32 - 1, 2**64 - 1
SEEDS = st.integers(0, 2**31 - 1)
CHANCE = {n: st.integers(0, n - 1) for n in (2, 5, 10)}  # draw(CHANCE[5]) == 0: one time in five
COMPRESSION = st.sampled_from([pb.COMPRESSION_NONE] * 6 + [pb.COMPRESSION_FLOAT16, pb.COMPRESSION_INT8, 3, 99])
HIDDEN_COMPRESSION = st.sampled_from([pb.COMPRESSION_NONE] * 12 + [1, 1, 2, 2, 3, 99])  # mostly ones that exist
NAN_OR_HUGE = st.sampled_from([float("nan"), float("inf"), -1e38])
FLOATS = st.sampled_from([torch.float32, torch.float32, torch.float32, torch.float16, torch.bfloat16])
DTYPE_NAMES = st.sampled_from(
    ["float32", "int64", "bool", "int32", "float16", "bfloat16", "float64", "", "x" * 300, "é"]
)
DIMS = st.sampled_from([0, 1, 2, 3, HIDDEN, -1, -(2**63), 2**31, 2**40, 2**63 - 1])
RANKS = st.sampled_from([0, 1, 2, 3, 3, 4, 7, 2000])
SIZES = st.sampled_from([0, 1, 7, 8, 512, 4096, 1 << 16])
INT_SHAPES = st.sampled_from([(1, 2), (1, 3), (2, 2), (1, 1), (0, 0), (1, 100)])
INT_DTYPES = st.sampled_from([torch.int64, torch.int64, torch.int32, torch.bool])
INT_RANGES = st.sampled_from([(0, 16), (-(2**40), 2**40), (2**20, 2**21)])
# bytes per value: of the encoding (float16 and int8 compression), else of the dtype
ITEMSIZES = {1: 2, 2: 1, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "bool": 1, "float64": 8}
SESSION_IDS = st.uuids().map(lambda value: "f-" + value.hex)
ALPHAS = st.sampled_from([8.0, float("nan"), 1e300, -1.0])


def server_args(idle_timeout: int) -> tuple[str, ...]:
    """Limits of the server the acts are drawn for (serving blocks 0:6 of a tiny model of hidden size 64):
    ``idle_timeout`` seconds let the legitimate session idle through the whole fuzzing."""
    return (
        *("--max-request-tokens", "64", "--cache-tokens", str(CACHE_TOKENS)),
        *("--max-sessions-per-peer", str(MAX_SESSIONS_PER_PEER), "--session-idle-timeout", str(idle_timeout)),
    )


@functools.lru_cache(maxsize=256)
def pick(*options) -> st.SearchStrategy:
    """One of ``options`` (repeat an option to weight it); the strategy is built once per set of options."""
    return st.sampled_from(options)


def one_in(draw, n: int) -> bool:
    return draw(CHANCE[n]) == 0


def draw_bytes(draw, size: int) -> bytes:
    """``size`` random bytes from a drawn seed (cheap for Hypothesis at any size)."""
    return random.Random(draw(SEEDS)).randbytes(size)


def raw(values: torch.Tensor) -> bytes:
    return values.reshape(-1).view(torch.uint8).numpy().tobytes() if values.numel() else b""


def noise(draw, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(draw(SEEDS)))


def draw_hidden(draw) -> pb.Tensor:
    """Plausible hidden states: sometimes NaN/inf, huge, a wrong size, another float dtype, compressed, or with
    a truncated buffer or missing int8 scales."""
    tokens = 65 if one_in(draw, 10) else draw(pick(1, 2, 3))  # 65: over --max-request-tokens
    shape = [draw(pick(1, 1, 2)), tokens, HIDDEN - 1 if one_in(draw, 10) else HIDDEN]
    values = noise(draw, *shape) * (1e30 if one_in(draw, 10) else 1.0)
    if one_in(draw, 10):
        values.view(-1)[draw(st.integers(0, values.numel() - 1))] = draw(NAN_OR_HUGE)
    dtype = draw(FLOATS)
    message = pb.Tensor(shape=shape, dtype=str(dtype).removeprefix("torch."), compression=draw(HIDDEN_COMPRESSION))
    if message.compression == pb.COMPRESSION_INT8:
        rows = values.reshape(-1, shape[-1])
        scales = rows.abs().amax(dim=1) / 127.0
        message.buffer = raw(torch.round(rows / scales[:, None]).clamp(-127, 127).to(torch.int8))
        message.scales = raw(scales[: len(scales) - (1 if one_in(draw, 5) else 0)])  # sometimes one short
    else:
        message.buffer = raw(values.to(torch.float16 if message.compression == pb.COMPRESSION_FLOAT16 else dtype))
    if one_in(draw, 10):  # a truncated buffer
        message.buffer = message.buffer[: len(message.buffer) - draw(pick(1, 3))]
    return message


def draw_garbage(draw) -> pb.Tensor:
    """Odd headers: unknown dtypes, any rank, zero, huge or negative dims, wild compression; with buffers (and
    int8 scales) of any size, or of just the size the header declares, so that the bytes are read."""
    rank = draw(RANKS)
    shape = [draw(DIMS) for _ in range(rank)] if rank < 100 else [1] * rank
    message = pb.Tensor(shape=shape, dtype=draw(DTYPE_NAMES), compression=draw(COMPRESSION))
    numel = math.prod(shape)
    if one_in(draw, 2) and 0 <= numel <= 1 << 14 and min(shape, default=0) >= 0:
        itemsize = ITEMSIZES.get(message.compression) or ITEMSIZES.get(message.dtype, 4)
        message.buffer = draw_bytes(draw, numel * itemsize)
        rows = numel // shape[-1] if shape and shape[-1] else 1
        message.scales = draw_bytes(draw, 4 * rows) if message.compression == pb.COMPRESSION_INT8 else b""
        return message
    message.buffer = draw_bytes(draw, draw(SIZES))
    if one_in(draw, 2):
        message.scales = draw_bytes(draw, draw(pick(0, 4, 8, 13)))
    return message


def draw_tensor(draw) -> pb.Tensor:
    kind = draw(pick("hidden", "hidden", "garbage", "garbage", "empty"))
    return draw_hidden(draw) if kind == "hidden" else draw_garbage(draw) if kind == "garbage" else pb.Tensor()


def draw_ints(draw, rows: int, cols: int) -> pb.Tensor:
    """Position ids, masks or reorders: int64, int32 (wrapping large values) or bool, of a given shape."""
    dtype = draw(INT_DTYPES)
    generator = torch.Generator().manual_seed(draw(SEEDS))
    if dtype == torch.bool:
        values = torch.rand(rows, cols, generator=generator) < 0.8
    else:
        low, high = draw(INT_RANGES)
        values = torch.randint(low, high, (rows, cols), generator=generator).to(dtype)
    return pb.Tensor(buffer=raw(values), shape=[rows, cols], dtype=str(dtype).removeprefix("torch."))


def draw_floats(draw, shape: list[int]) -> pb.Tensor:
    values = noise(draw, *shape)
    if values.numel() and one_in(draw, 5):
        values.view(-1)[0] = float("nan")
    return pb.Tensor(buffer=raw(values), shape=shape, dtype="float32")


def draw_adapter(draw) -> pb.Adapter:
    """A preloaded adapter's name, or LoRA weights: often plausible, often not."""
    if one_in(draw, 5):
        return pb.Adapter(name=draw(pick("", "x" * 300, "trained", "\x00")))
    rank = draw(pick(1, 4, 4, 0, 33, U32))
    side = max(rank, 1) % 64
    modules = pick("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj", "nope", "y" * 300)
    weights = []
    for _ in range(draw(st.integers(0, 3))):
        weight = pb.LoraWeight(block=draw(pick(0, 3, 5, 6, U32)), module=draw(modules))
        weight.a.CopyFrom(draw_floats(draw, [side, HIDDEN]) if one_in(draw, 2) else draw_tensor(draw))
        weight.b.CopyFrom(draw_floats(draw, [HIDDEN, side]) if one_in(draw, 2) else draw_tensor(draw))
        weights.append(weight)
    alpha = draw(ALPHAS)
    return pb.Adapter(lora=pb.LoraWeights(rank=rank, alpha=alpha, weights=weights))


def draw_prompts(draw) -> pb.Tensor:
    shape = [draw(pick(6, 3, 1, 0)), draw(pick(1, 2)), draw(pick(1, 2, 3)), draw(pick(HIDDEN, 3))]
    return draw_tensor(draw) if one_in(draw, 5) else draw_floats(draw, shape)


@dataclass(frozen=True)
class Target:
    """What the acts aim at: the server, and the legitimate client's session ids on it (pushes aim there)."""

    server: str
    victims: tuple[str, ...]


def draw_open(draw, session_id: str, target: Target) -> pb.Open:
    message = pb.Open(
        session_id=draw(pick(*["own"] * 4, "", "é" * 40, "s" * 200, *target.victims)).replace("own", session_id),
        start_block=draw(pick(0, 0, 0, 3, 5, 6, U32)),
        end_block=draw(pick(6, 6, 6, 3, 0, 9, U32)),
        max_length=draw(pick(16, 16, 64, 0, 1, 2049, U32)),
        batch_size=draw(pick(1, 1, 1, 2, 0, 64, U32)),
    )
    if one_in(draw, 5):
        message.adapter.CopyFrom(draw_adapter(draw))
    if one_in(draw, 10):
        message.membership = draw_bytes(draw, draw(st.integers(0, 100)))
    return message


def draw_spec(draw, target: Target) -> pb.StepSpec:
    message = pb.StepSpec(
        step=draw(pick(0, 0, 0, 1, 2, U64)), position=draw(pick(0, 0, 0, 1, 3, U32)), compression=draw(COMPRESSION)
    )
    if draw(CHANCE[5]) < 2:
        field = message.position_ids if one_in(draw, 2) else message.attention_mask
        field.CopyFrom(draw_garbage(draw) if one_in(draw, 5) else draw_ints(draw, *draw(INT_SHAPES)))
    if draw(CHANCE[10]) < 3:
        message.push_to.peer_id = draw(pick(target.server, PEER_ID_LIKE, "not a peer!", "1" * 500, ""))
        message.push_to.session_id = draw(pick(*target.victims, "", "s" * 300, "f-nobody"))
    if one_in(draw, 5):
        message.round_id, message.round_size = draw(pick(0, 1, U64)), draw(pick(0, 1, 4, U32))
    if one_in(draw, 5):
        message.prompts.CopyFrom(draw_prompts(draw))
    if one_in(draw, 5):
        rows = draw(pick(1, 2, 3))
        message.reorder.CopyFrom(draw_ints(draw, 1, rows))
        if draw(CHANCE[10]) < 7:  # a 1-D reorder, as the server expects
            message.reorder.shape[:] = [rows]
    return message


def draw_request(draw, session_id: str, target: Target) -> pb.InferenceRequest:
    """An inference message of any kind (or none), with every field drawn."""
    kind = draw(pick("open", "step", "step", "step", "header", "relay", "none"))
    if kind == "open":
        return pb.InferenceRequest(open=draw_open(draw, session_id, target))
    if kind == "step":
        return pb.InferenceRequest(step=pb.Step(spec=draw_spec(draw, target), hidden=draw_tensor(draw)))
    if kind == "header":
        push_from = draw(pick(target.server, PEER_ID_LIKE, "x" * 300, "bad id", ""))
        return pb.InferenceRequest(header=pb.Header(spec=draw_spec(draw, target), push_from=push_from))
    if kind == "relay":
        return pb.InferenceRequest(relay=pb.Relay(position=draw(pick(0, 2, U32)), hidden=draw_tensor(draw)))
    return pb.InferenceRequest()


@st.composite
def random_streams(draw, target: Target) -> StreamAct:
    """1-4 drawn messages, most often after an open of the same session (so that steps get further)."""
    session_id = draw(SESSION_IDS)
    messages = [draw_request(draw, session_id, target) for _ in range(draw(st.integers(1, 4)))]
    if draw(CHANCE[10]) < 6:
        messages.insert(0, pb.InferenceRequest(open=draw_open(draw, session_id, target)))
    return StreamAct("random", tuple(messages), end=not one_in(draw, 5))


def follow_up(draw, kind: int, session_id: str, target: Target) -> list[pb.InferenceRequest]:
    """A hostile message after the first step (position 2) of a session opened with max_length 16."""
    later = {"step": 1, "position": 2}
    if kind == 0:
        return [step_request(step=5, position=2, hidden=noise(draw, 1, 2, HIDDEN))]  # out of order
    if kind == 1:
        return [step_request(step=1, position=7, hidden=noise(draw, 1, 2, HIDDEN))]  # wrong position
    if kind == 2:
        return [step_request(**later, hidden=torch.full((1, 2, HIDDEN), float("nan")))]
    if kind == 3:
        return [step_request(**later, hidden=noise(draw, 1, 2, HIDDEN), position_ids=torch.tensor([[-5, 2**50]]))]
    if kind == 4:
        mask = torch.ones(1, 9, dtype=torch.bool)
        return [step_request(**later, hidden=noise(draw, 1, 2, HIDDEN), attention_mask=mask)]
    if kind == 5:
        return [step_request(**later, hidden=noise(draw, 1, 20, HIDDEN))]  # past max_length
    if kind == 6:
        return [header_request(PEER_ID_LIKE, **later)]  # nobody pushes
    if kind == 7:
        return [relay_request(2, draw_tensor(draw)), header_request(PEER_ID_LIKE, **later)]
    if kind == 8:
        return [open_request(session_id)]  # a second open
    return [draw_request(draw, session_id, target)]


@st.composite
def hostile_follow_ups(draw, target: Target) -> StreamAct:
    """A session opened properly and its first step, then one hostile follow-up, sometimes a flood of steps."""
    session_id = draw(SESSION_IDS)
    start = [open_request(session_id), step_request(hidden=noise(draw, 1, 2, HIDDEN))]
    follow = follow_up(draw, draw(st.integers(0, 9)), session_id, target)
    flood = [step_request(step=i, position=2, hidden=noise(draw, 1, 2, HIDDEN)) for i in range(1, draw(pick(1, 1, 12)))]
    return StreamAct("valid+hostile", (*start, *follow, *flood), end=not one_in(draw, 5))


@st.composite
def raw_frames(draw) -> RawFrames:
    """Random bytes, or a frame with any marker and a declared length up to 2^64 - 1 (sometimes a real load
    of megabytes behind a giant one)."""
    rpc = draw(pick("Inference", "Inference", "Push"))
    if draw(CHANCE[5]) < 2:
        return RawFrames(rpc, draw_bytes(draw, draw(st.integers(1, 4096))), load_mb=0)
    marker = draw(pick(P2P.MESSAGE_MARKER, P2P.MESSAGE_MARKER, P2P.ERROR_MARKER, b"\x07"))
    length = draw(pick(0, 5, 100, 1 << 20, 1 << 40, U64))
    header = marker + length.to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER)
    load = 2 if length >= 1 << 20 and draw(CHANCE[10]) < 3 else 0
    return RawFrames(rpc, header + draw_bytes(draw, draw(st.integers(0, 300))), load_mb=load)


@st.composite
def pushes(draw, target: Target) -> Pushes:
    """Pushes into random sessions, the legitimate client's session, or nobody's."""
    messages = []
    for _ in range(draw(st.integers(1, 5))):
        session_id = draw(pick(*target.victims, "", "x" * 300, "f-nobody"))
        push = pb.PushRequest(session_id=session_id, position=draw(pick(0, 1, 7, 8, 9, U32)))
        if not one_in(draw, 10):
            push.hidden.CopyFrom(draw_tensor(draw))
        messages.append(push)
    return Pushes(tuple(messages))


@st.composite
def passes(draw) -> Unary:
    """A forward or backward pass with drawn blocks, hidden states, positions, deep prompts, adapter, gradients."""
    rpc = draw(pick("Forward", "Backward"))
    message = pb.ForwardRequest() if rpc == "Forward" else pb.BackwardRequest()
    message.start_block, message.end_block = draw(pick(0, 0, 0, 2, 6)), draw(pick(6, 6, 6, 3, 0, 99))
    message.hidden.CopyFrom(draw_hidden(draw) if draw(CHANCE[5]) < 3 else draw_tensor(draw))
    message.compression = draw(COMPRESSION)
    if draw(CHANCE[10]) < 3:
        message.position_ids.CopyFrom(draw_ints(draw, 1, draw(pick(1, 2, 3))))
    if one_in(draw, 5):
        message.prompts.CopyFrom(draw_prompts(draw))
    if one_in(draw, 5):
        message.adapter.CopyFrom(draw_adapter(draw))
    if rpc == "Forward":
        message.output_hidden_states = one_in(draw, 2)
    else:
        message.grad_output.CopyFrom(message.hidden if draw(CHANCE[5]) < 3 else draw_tensor(draw))
        if one_in(draw, 5):
            message.grad_block_outputs.CopyFrom(draw_tensor(draw))
    return Unary(rpc, message)


@st.composite
def forged_receipts(draw, target: Target) -> Unary:
    """A receipt that claims work for this server but is not signed by its sender."""
    receipt = pb.Receipt(
        server_peer_id=draw(pick(target.server, "", "x" * 300)),
        client_peer_id=draw(pick("", target.server, "y" * 60)),
        epoch=draw(st.floats()),
        work=draw(st.integers(0, U64)),
        verified_work=draw(st.integers(0, U64)),
        public_key=draw_bytes(draw, draw(pick(0, 36, 600))),
        signature=draw_bytes(draw, draw(pick(0, 64, 300))),
    )
    return Unary("Receipt", pb.ReceiptRequest(receipt=receipt))


@st.composite
def unary_garbage(draw) -> Unary:
    """Bytes that may not even parse as the RPC's request."""
    rpc = draw(pick("Forward", "Backward", "Info", "Receipt"))
    return Unary(rpc, RawMessage(draw_bytes(draw, draw(st.integers(0, 2048)))))


@st.composite
def floods(draw) -> Flood:
    return Flood(MAX_SESSIONS_PER_PEER + draw(st.integers(1, 3)), draw(SEEDS))


def acts(target: Target) -> st.SearchStrategy:
    """One act, in a fixed mix: 40% streams, 14% raw frames, 16% pushes, 28% unary calls, 2% floods."""
    streams = [random_streams(target), hostile_follow_ups(target)]
    unary = [passes(), passes(), forged_receipts(target), unary_garbage()]
    mix = [*streams * 10, *[raw_frames()] * 7, *[pushes(target)] * 8, *unary * 3, *[passes()] * 2, floods()]
    return st.sampled_from(mix).flatmap(lambda strategy: strategy)


def play_acts(fuzzer: Fuzzer, run, victims: list[str], count: int, seed_value: int) -> None:
    """Play ``count`` acts drawn by Hypothesis from ``seed_value``. ``run`` runs a coroutine on the event loop of
    the fuzzer's peers. Nothing is shrunk: a bug is counted by the fuzzer, with the act that caused it, and the
    run goes on (a shrinking search against a live server would take long and send more)."""
    peers = st.integers(0, len(fuzzer.peers) - 1)

    @settings(
        max_examples=count,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @seed(seed_value)
    @given(peers, acts(Target(fuzzer.server, tuple(victims))))
    def play(peer: int, act) -> None:
        run(fuzzer.play(peer, act))

    play()
