"""Fuzzing a live server with malformed and hostile messages from a seeded generator.

Hundreds of cases (random fields, wrong dtypes and shapes, huge declared shapes with tiny buffers,
NaN/inf, wild positions, out-of-order steps, raw bytes, frames that declare huge lengths, pushes into
other peers' sessions, floods of sessions and steps, unary garbage, forward and backward passes with
random gradients, deep prompts, LoRA weights and adapter names, beam reorders) from two hostile peers, while a
legitimate session stays open. Afterwards: the server is up, never answered INTERNAL, its memory did
not grow beyond a bound, and both the old session and a new one give the local model's tokens.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
import uuid
from contextlib import suppress

import psutil
import pytest
import torch
from hivemind.p2p import P2P
from transformers import AutoModelForCausalLM

from client import AutoDistributedModelForCausalLM
from proto import pb
from swarm.tools.localswarm import LocalSwarm
from tests.swarm.hostile import (
    FRAME_END,
    HIDDEN,
    HostilePeer,
    RawMessage,
    answers,
    header_request,
    open_request,
    receive,
    relay_request,
    rss_mb,
    send,
    session_start,
    step_request,
)

SEED = 20261122
CASES = 1000  # about 40 s on 2 cores
WARMUP = 60  # cases run before the first memory reading (allocator pools, lazy imports)
MAX_SESSIONS_PER_PEER = 4
# Everything a case can make the server hold is bounded: messages of ~100 KB (64 tokens of 64 floats),
# 4 sessions per peer of at most 2048 cached tokens (~3 MB of KV for the tiny model), streams closed
# after each case. 64 MB leaves room for allocator noise while catching any per-case leak (600 cases)
# or buffering of the ~2 MB that each giant-frame case sends.
MAX_RSS_GROWTH_MB = 64
SERVER_ARGS = (
    "--max-request-tokens",
    "64",
    "--cache-tokens",
    "2048",
    "--max-sessions-per-peer",
    str(MAX_SESSIONS_PER_PEER),
    "--session-idle-timeout",
    "300",  # the legitimate session idles through the whole fuzzing
)
PEER_ID_LIKE = "12D3KooWGzBPmD6C4nj3ss1n4bYnpoc7XgpCfiEHRAzNixBBnF5u"


def torch_generator(rng: random.Random) -> torch.Generator:
    return torch.Generator().manual_seed(rng.randrange(2**31))


def tensor_message(rng: random.Random) -> pb.Tensor:
    """Anything from a valid hidden state to nonsense: wrong dtypes, ranks, huge shapes, short buffers."""
    kind = rng.random()
    if kind < 0.45:  # plausible hidden states, sometimes with NaN/inf or a wrong size
        shape = [rng.choice([1, 1, 2]), rng.choice([1, 2, 3, 65]), rng.choice([HIDDEN, HIDDEN, HIDDEN - 1])]
        values = torch.randn(*shape, generator=torch_generator(rng)) * rng.choice([1.0, 1.0, 1e30])
        if rng.random() < 0.2:
            values.view(-1)[rng.randrange(values.numel())] = rng.choice([float("nan"), float("inf"), -float("inf")])
        dtype = rng.choice([torch.float32, torch.float32, torch.float32, torch.float16, torch.bfloat16])
        values = values.to(dtype)
        name = str(dtype).removeprefix("torch.")
        buffer = values.reshape(-1).view(torch.uint8).numpy().tobytes()
        return pb.Tensor(buffer=buffer, shape=shape, dtype=name)
    dtype = rng.choice(["float32", "int64", "bool", "int32", "float16", "float64", "", "x" * rng.randint(1, 300)])
    rank = rng.choice([0, 1, 2, 3, 3, 4, rng.randint(5, 2000)])
    dims = [rng.choice([0, 1, 2, 3, HIDDEN, -1, -(2**63), 2**31, 2**40, 2**63 - 1]) for _ in range(rank)]
    buffer = rng.randbytes(rng.choice([0, 1, 7, 8, 512, rng.randint(0, 1 << 16)]))
    return pb.Tensor(buffer=buffer, shape=dims, dtype=dtype)


def int_tensor(rng: random.Random, rows: int, cols: int, dtype: torch.dtype) -> pb.Tensor:
    if dtype == torch.bool:
        values = torch.rand(rows, cols, generator=torch_generator(rng)) < 0.8
    else:  # int32 wraps the large values around
        low, high = rng.choice([(0, 16), (-(2**40), 2**40), (2**20, 2**21)])
        values = torch.randint(low, high, (rows, cols), generator=torch_generator(rng)).to(dtype)
    buffer = values.reshape(-1).view(torch.uint8).numpy().tobytes() if values.numel() else b""
    return pb.Tensor(buffer=buffer, shape=[rows, cols], dtype=str(dtype).removeprefix("torch."))


def random_adapter(rng: random.Random) -> pb.Adapter:
    """A preloaded adapter's name, or LoRA weights: often plausible, often not."""
    if rng.random() < 0.2:
        return pb.Adapter(name=rng.choice(["", "x" * 300, "trained", "\x00"]))
    rank = rng.choice([1, 4, 4, 0, 33, 2**32 - 1])
    weights = []
    for _ in range(rng.choice([0, 1, 2, 3])):
        module = rng.choice(["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj", "nope", "y" * 300])
        weight = pb.LoraWeight(block=rng.choice([0, 3, 5, 6, 2**32 - 1]), module=module)
        weight.a.CopyFrom(tensor_message(rng) if rng.random() < 0.5 else float_tensor(rng, [max(rank, 1) % 64, HIDDEN]))
        weight.b.CopyFrom(tensor_message(rng) if rng.random() < 0.5 else float_tensor(rng, [HIDDEN, max(rank, 1) % 64]))
        weights.append(weight)
    return pb.Adapter(lora=pb.LoraWeights(rank=rank, alpha=rng.choice([8.0, float("nan"), 1e300]), weights=weights))


def float_tensor(rng: random.Random, shape: list[int]) -> pb.Tensor:
    values = torch.randn(*shape, generator=torch_generator(rng))
    if rng.random() < 0.2 and values.numel():
        values.view(-1)[0] = float("nan")
    return pb.Tensor(buffer=values.reshape(-1).view(torch.uint8).numpy().tobytes(), shape=shape, dtype="float32")


def random_extras(rng: random.Random, message) -> None:
    """Deep prompts and an adapter on a pass; deep prompts and a reorder on a step's spec."""
    if rng.random() < 0.2:
        shape = [rng.choice([6, 3, 1, 0]), rng.choice([1, 2]), rng.choice([1, 2, 3]), rng.choice([HIDDEN, 3])]
        message.prompts.CopyFrom(float_tensor(rng, shape) if rng.random() < 0.7 else tensor_message(rng))
    if isinstance(message, pb.StepSpec):
        if rng.random() < 0.2:
            rows = rng.choice([1, 2, 3])
            message.reorder.CopyFrom(int_tensor(rng, 1, rows, rng.choice([torch.int64, torch.int32])))
            if rng.random() < 0.7:  # a 1-D reorder, as the server expects
                message.reorder.shape[:] = [rows]
    elif rng.random() < 0.2:
        message.adapter.CopyFrom(random_adapter(rng))


def random_open(rng: random.Random, session_id: str, victims: list[str]) -> pb.Open:
    message = pb.Open(
        session_id=rng.choice([session_id] * 4 + ["", "é" * 40, "s" * 200] + victims),
        start_block=rng.choice([0, 0, 0, 3, 5, 6, 2**32 - 1]),
        end_block=rng.choice([6, 6, 6, 3, 0, 9, 2**32 - 1]),
        max_length=rng.choice([16, 16, 64, 0, 1, 2049, 2**32 - 1]),
        batch_size=rng.choice([1, 1, 1, 2, 0, 64, 2**32 - 1]),
    )
    if rng.random() < 0.2:
        message.adapter.CopyFrom(random_adapter(rng))
    if rng.random() < 0.1:
        message.membership = rng.randbytes(rng.randint(0, 100))
    return message


def random_spec(rng: random.Random, server: str, victims: list[str]) -> pb.StepSpec:
    message = pb.StepSpec(
        step=rng.choice([0, 0, 0, 1, 2, 2**64 - 1]),
        position=rng.choice([0, 0, 0, 1, 3, 2**32 - 1]),
        compression=rng.choice([0, 0, 0, 1, 2, 99]),
    )
    if rng.random() < 0.4:
        rows, cols = rng.choice([(1, 2), (1, 3), (2, 2), (1, 1), (0, 0), (1, 100)])
        dtype = rng.choice([torch.int64, torch.int64, torch.int32, torch.bool])
        field = rng.choice([message.position_ids, message.attention_mask])
        field.CopyFrom(int_tensor(rng, rows, cols, dtype) if rng.random() < 0.7 else tensor_message(rng))
    if rng.random() < 0.3:
        message.push_to.peer_id = rng.choice([server, PEER_ID_LIKE, "not a peer!", "1" * 500, ""])
        message.push_to.session_id = rng.choice(victims + ["", "s" * 300, uuid.uuid4().hex])
    if rng.random() < 0.2:
        message.round_id = rng.choice([0, 1, 2**64 - 1])
        message.round_size = rng.choice([0, 1, 4, 2**32 - 1])
    random_extras(rng, message)
    return message


def random_request(rng: random.Random, session_id: str, server: str, victims: list[str]) -> pb.InferenceRequest:
    """An inference message of any kind (or none), with every field random (often valid, often not)."""
    kind = rng.choice(["open", "step", "step", "step", "header", "relay", "none"])
    hidden = tensor_message(rng) if rng.random() < 0.8 else pb.Tensor()
    if kind == "open":
        return pb.InferenceRequest(open=random_open(rng, session_id, victims))
    if kind == "step":
        return pb.InferenceRequest(step=pb.Step(spec=random_spec(rng, server, victims), hidden=hidden))
    if kind == "header":
        push_from = rng.choice([server, PEER_ID_LIKE, "x" * 300, "bad id", ""])
        return pb.InferenceRequest(header=pb.Header(spec=random_spec(rng, server, victims), push_from=push_from))
    if kind == "relay":
        return pb.InferenceRequest(relay=pb.Relay(position=rng.choice([0, 2, 2**32 - 1]), hidden=hidden))
    return pb.InferenceRequest()


class Fuzzer:
    """Runs cases against one server; counts what the server answered."""

    def __init__(self, server, peers: list[HostilePeer], victims: list[str], seed: int):
        self.server, self.peers, self.victims = server.peer_id, peers, victims
        self.rng = random.Random(seed)
        torch.manual_seed(seed)  # step_request's hidden states
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.internal: list[str] = []

    def record(self, kind: str, responses: list[pb.InferenceResponse]) -> None:
        for response in responses:
            if response.HasField("error"):
                name = pb.ErrorCode.Name(response.error.code)
                if response.error.code in (pb.INTERNAL, pb.ERROR_CODE_UNSPECIFIED):
                    self.internal.append(f"{kind}: {response.error.message}")
            else:
                name = "answered"
            self.outcomes[f"{kind}: {name}"] += 1
        if not responses:
            self.outcomes[f"{kind}: closed"] += 1

    async def run(self, count: int) -> None:
        cases = [self.random_stream, self.valid_then_hostile, self.raw_bytes, self.pushes, self.unary]
        for index in range(count):
            case = self.many_sessions if index % 50 == 49 else self.rng.choice(cases)
            await case(self.rng.choice(self.peers))

    async def random_stream(self, peer: HostilePeer) -> None:
        reader, writer = await peer.stream(self.server)
        session_id = "f-" + uuid.uuid4().hex
        messages = [
            random_request(self.rng, session_id, self.server, self.victims) for _ in range(self.rng.randint(1, 4))
        ]
        if self.rng.random() < 0.6:  # most streams open a session first, so that their steps get further
            messages.insert(0, pb.InferenceRequest(open=random_open(self.rng, session_id, self.victims)))
        await self.finish("random", reader, writer, messages)

    async def valid_then_hostile(self, peer: HostilePeer) -> None:
        """A session opened properly, then one hostile follow-up."""
        session_id = "f-" + uuid.uuid4().hex
        reader, writer = await peer.stream(self.server)
        follow = self.rng.choice(
            [
                [step_request(step=5, position=2)],  # out of order
                [step_request(step=1, position=7)],  # wrong position
                [step_request(step=1, position=2, hidden=torch.full((1, 2, HIDDEN), float("nan")))],
                [step_request(step=1, position=2, position_ids=torch.tensor([[-5, 2**50]]))],
                [step_request(step=1, position=2, attention_mask=torch.ones(1, 9, dtype=torch.bool))],
                [step_request(step=1, position=2, tokens=20)],  # past max_length
                [header_request(PEER_ID_LIKE, step=1, position=2)],  # nobody pushes
                [relay_request(2, tensor_message(self.rng)), header_request(PEER_ID_LIKE, step=1, position=2)],
                [open_request(session_id)],  # a second open
                [random_request(self.rng, session_id, self.server, self.victims)],
            ]
        )
        flood = [step_request(step=i, position=2) for i in range(1, self.rng.choice([1, 1, 12]))]
        await self.finish("valid+hostile", reader, writer, [*session_start(session_id), *follow, *flood])

    async def raw_bytes(self, peer: HostilePeer) -> None:
        """Random bytes, or frames with random markers and lengths (sometimes declaring terabytes)."""
        reader, writer = await peer.stream(self.server, self.rng.choice(["Inference", "Inference", "Push"]))
        rng = self.rng
        if rng.random() < 0.4:
            writer.write(rng.randbytes(rng.randint(1, 4096)))
        else:
            marker = rng.choice([P2P.MESSAGE_MARKER, P2P.MESSAGE_MARKER, P2P.ERROR_MARKER, b"\x07"])
            length = rng.choice([0, 5, 100, 1 << 20, 1 << 40, 2**64 - 1])
            writer.write(marker + length.to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + rng.randbytes(rng.randint(0, 300)))
            if length >= 1 << 20 and rng.random() < 0.3:  # send a real load behind the giant frame
                with suppress(ConnectionError):
                    for _ in range(2):
                        writer.write(bytes(1 << 20))
                        await writer.drain()
        self.record("raw", await answers(reader, timeout=0.3))
        writer.close()

    async def pushes(self, peer: HostilePeer) -> None:
        """Pushes into random sessions, the legitimate client's session, or our own."""
        reader, writer = await peer.stream(self.server, "Push")
        for _ in range(self.rng.randint(1, 5)):
            push = pb.PushRequest(
                session_id=self.rng.choice(self.victims + ["", "x" * 300, uuid.uuid4().hex]),
                position=self.rng.choice([0, 1, 7, 8, 9, 2**32 - 1]),
            )
            if self.rng.random() < 0.9:
                push.hidden.CopyFrom(tensor_message(self.rng))
            with suppress(ConnectionError):
                await send(writer, push)
        self.record("push", await answers(reader, timeout=0.05))
        writer.close()

    async def unary(self, peer: HostilePeer) -> None:
        rng = self.rng
        if rng.random() < 0.3:
            rpc = rng.choice(["Forward", "Backward", "Info", "Receipt"])
            message = RawMessage(rng.randbytes(rng.randint(0, 2048)))
        elif rng.random() < 0.25:
            rpc, message = "Receipt", pb.ReceiptRequest(receipt=self.forged_receipt())
        else:
            rpc = rng.choice(["Forward", "Backward"])
            message = pb.ForwardRequest() if rpc == "Forward" else pb.BackwardRequest()
            message.start_block, message.end_block = rng.choice([0, 0, 2, 6]), rng.choice([6, 6, 3, 0, 99])
            message.hidden.CopyFrom(tensor_message(rng))
            if rng.random() < 0.3:
                message.position_ids.CopyFrom(int_tensor(rng, 1, rng.choice([1, 2, 3]), torch.int64))
            random_extras(rng, message)
            if rpc == "Forward":
                message.output_hidden_states = rng.random() < 0.3
            else:
                grad = message.hidden if rng.random() < 0.6 else tensor_message(rng)
                message.grad_output.CopyFrom(grad)
                if rng.random() < 0.2:
                    message.grad_block_outputs.CopyFrom(tensor_message(rng))
        response_type = {
            "Forward": pb.ForwardResponse,
            "Backward": pb.BackwardResponse,
            "Info": pb.ServerRecord,
            "Receipt": pb.ReceiptResponse,
        }[rpc]
        try:
            response = await asyncio.wait_for(peer.unary(self.server, rpc, message, response_type), 10)
        except Exception:  # garbage that does not parse: the server's p2p layer answers with an error
            self.outcomes[f"unary {rpc}: refused"] += 1
            return
        failed = not isinstance(response, pb.ServerRecord) and response.HasField("error")
        self.record(
            f"unary {rpc}", [pb.InferenceResponse(error=response.error)] if failed else [pb.InferenceResponse()]
        )

    def forged_receipt(self) -> pb.Receipt:
        """A receipt that claims work for this server but is not signed by its sender."""
        rng = self.rng
        return pb.Receipt(
            server_peer_id=rng.choice([self.server, "", "x" * 300]),
            client_peer_id=rng.choice(["", self.server, "y" * 60]),
            epoch=rng.random(),
            work=rng.randint(0, 2**64 - 1),
            verified_work=rng.randint(0, 2**64 - 1),
            public_key=rng.randbytes(rng.randint(0, 600)),
            signature=rng.randbytes(rng.randint(0, 300)),
        )

    async def many_sessions(self, peer: HostilePeer) -> None:
        """More sessions than one peer may hold, opened at once."""
        streams = [await peer.stream(self.server) for _ in range(MAX_SESSIONS_PER_PEER + 3)]
        for _, writer in streams:
            await send(writer, *session_start("f-" + uuid.uuid4().hex))
        for reader, writer in streams:
            self.record("many sessions", [r for r in [await receive(reader, timeout=10)] if r is not None])
            writer.write(FRAME_END)
            writer.close()

    async def finish(self, kind: str, reader, writer, messages: list[pb.InferenceRequest]) -> None:
        """Send the messages; end the stream properly or just drop it; collect what the server says."""
        with suppress(ConnectionError):
            await send(writer, *messages)
            if self.rng.random() < 0.8:
                writer.write(FRAME_END)
                self.record(kind, await answers(reader, timeout=5))
            else:
                self.record(kind, await answers(reader, timeout=0.1))
        writer.close()


def group_rss_mb(pid: int) -> float:
    """The server with its children (hivemind's DHT process and the p2p daemon)."""
    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 2**20


def suspicious(line: str) -> bool:
    """A server log line that means a request got further than a typed error."""
    if "Traceback" in line or " ERROR " in line:
        return True
    return "WARN" in line and any(name in line for name in ("server.handler", "server.streams", "p2p_daemon"))


@pytest.fixture(scope="module")
def fuzzed_server(tiny_models):
    folder = tiny_models["llama"]
    with LocalSwarm() as swarm:
        (server,) = swarm.start(folder, [("0:6", SERVER_ARGS)])
        model = AutoDistributedModelForCausalLM.from_pretrained(str(folder), initial_peers=swarm.initial_peers)
        try:
            yield server, model, AutoModelForCausalLM.from_pretrained(folder).eval()
        finally:
            model.shutdown()


@pytest.mark.timeout(300)
def test_fuzzed_server_stays_up_bounded_and_correct(fuzzed_server):
    server, model, local = fuzzed_server
    loop = model.client.loop
    prompt = torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(11))
    expected = local.generate(prompt, max_new_tokens=10, do_sample=False)
    peers = [loop.run(HostilePeer.start(server.maddrs)) for _ in range(2)]
    try:
        with model.inference_session(max_length=32) as session:
            model.generate(prompt[:, :4], max_new_tokens=1, do_sample=False)  # a session open during the fuzzing
            victims = [hop.session_id for hop in session.hops]  # its ids on the server: pushes aim at them
            fuzzer = Fuzzer(server, peers, victims, SEED)
            loop.run(fuzzer.run(WARMUP))
            before, group_before, started = rss_mb(server.proc.pid), group_rss_mb(server.proc.pid), time.monotonic()
            loop.run(fuzzer.run(CASES))
            elapsed, after, group_after = (
                time.monotonic() - started,
                rss_mb(server.proc.pid),
                group_rss_mb(server.proc.pid),
            )
            assert server.proc.poll() is None, "".join(server.output[-50:])
            assert session.position == 4
            continued = model.generate(prompt, max_new_tokens=10, do_sample=False)
            assert [hop.session_id for hop in session.hops] == victims  # the same server-side session, no replay
    finally:
        for peer in peers:
            loop.run(peer.shutdown())
    fresh = model.generate(prompt, max_new_tokens=10, do_sample=False)  # a new session after the fuzzing

    print(f"\n{WARMUP} + {CASES} fuzz cases in {elapsed:.1f} s; server RSS {before:.0f} MB -> {after:.0f} MB")
    print(f"server with its DHT process and p2p daemon: {group_before:.0f} MB -> {group_after:.0f} MB")
    for outcome, count in sorted(fuzzer.outcomes.items()):
        print(f"  {count:5d}  {outcome}")
    assert not fuzzer.internal, fuzzer.internal[:5]
    assert not [line for line in server.output if suspicious(line)], "".join(filter(suspicious, server.output))
    assert after - before < MAX_RSS_GROWTH_MB
    assert continued.tolist() == expected.tolist()
    assert fresh.tolist() == expected.tolist()
    assert server.proc.poll() is None
