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
from tests.swarm.fuzzcases import (
    PEER_ID_LIKE,
    int_tensor,
    random_extras,
    random_open,
    random_request,
    tensor_message,
)
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
