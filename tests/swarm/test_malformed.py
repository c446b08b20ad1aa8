"""Malformed requests sent straight to a live server get clear, typed errors; the server keeps serving,
and a session opened before the bad requests carries on correctly."""

from __future__ import annotations

import asyncio
import contextlib
from contextlib import suppress

import pytest
import torch
from google.protobuf.message import Message
from hivemind.p2p import P2P
from transformers import AutoModelForCausalLM

from client import AutoDistributedModelForCausalLM
from proto import pb, rpc_name
from swarm import errors
from swarm.net import tensors
from swarm.net.rpc import InferenceStream, ServerFailure, call_backward, call_forward
from swarm.tools.localswarm import LocalSwarm
from tests.swarm.hostile import (
    HostilePeer,
    header_request,
    open_request,
    receive,
    relay_request,
    rss_mb,
    step_request,
)

pytestmark = pytest.mark.timeout(240)
HIDDEN = 64
PEER_ID_LIKE = "12D3KooWGzBPmD6C4nj3ss1n4bYnpoc7XgpCfiEHRAzNixBBnF5u"


OPEN_FIELDS = set(pb.Open.DESCRIPTOR.fields_by_name)


def request(step=0, position=0, tokens=2, hidden=None, **fields) -> list[pb.InferenceRequest]:
    """A session opened over blocks 0:6 and its first step; ``fields`` override those of either message."""
    hidden = hidden if hidden is not None else torch.randn(1, tokens, HIDDEN)
    opening = {name: fields.pop(name) for name in list(fields) if name in OPEN_FIELDS}
    opening.setdefault("session_id", "s-" + str(torch.randint(0, 1 << 30, ()).item()))
    opening.setdefault("batch_size", hidden.shape[0] if hidden.ndim else 1)
    session_id = opening.pop("session_id")
    return [open_request(session_id, **opening), step_request(step, position, hidden=hidden, **fields)]


BAD_REQUESTS = {
    "wrong hidden size": (request(hidden=torch.randn(1, 2, HIDDEN - 1)), errors.InvalidRequestError),
    "integer hidden": (request(hidden=torch.ones(1, 2, HIDDEN, dtype=torch.int64)), errors.InvalidRequestError),
    "too many tokens": (request(tokens=65, max_length=100), errors.InvalidRequestError),
    "step of no session": ([step_request(step=5, position=10)], errors.SessionNotFoundError),
    "negative position id": (request(position_ids=torch.tensor([[-1, 0]])), errors.InvalidRequestError),
    "huge position id": (request(position_ids=torch.tensor([[0, 1 << 40]])), errors.InvalidRequestError),
    "position ahead of cache": (request(position=3), errors.InvalidRequestError),
    "position ids of wrong shape": (request(position_ids=torch.tensor([[0, 1, 2]])), errors.InvalidRequestError),
    "mask of wrong length": (request(attention_mask=torch.ones(1, 5, dtype=torch.bool)), errors.InvalidRequestError),
    "blocks outside span": (request(end_block=9), errors.BlocksNotServedError),
    "empty block range": (request(start_block=3, end_block=3), errors.InvalidRequestError),
    "max_length zero": (request(max_length=0), errors.InvalidRequestError),
    "max_length too large": (request(max_length=10**6), errors.InvalidRequestError),
    "more tokens than max_length": (request(tokens=5, max_length=4), errors.InvalidRequestError),
    "session over cache budget": (request(max_length=2000, batch_size=1), errors.CacheFullError),
    "batch differs from session": (request(batch_size=2), errors.InvalidRequestError),
    "NaN hidden": (request(hidden=torch.full((1, 2, HIDDEN), float("nan"))), errors.InvalidRequestError),
    "float16 hidden that overflows": (
        request(hidden=torch.full((1, 2, HIDDEN), 1e5).half()),
        errors.InvalidRequestError,
    ),
    "empty session id": (request(session_id=""), errors.InvalidRequestError),
    "step out of order": (request(step=1), errors.InvalidRequestError),
    "a second open": (request()[:1] * 2, errors.InvalidRequestError),
    "a message of no kind": (request()[:1] + [pb.InferenceRequest()], errors.InvalidRequestError),
    "relay before any open": ([relay_request(0, torch.randn(1, 2, HIDDEN))], errors.SessionNotFoundError),
    "relay of another batch size": (
        request()[:1] + [relay_request(0, torch.randn(2, 2, HIDDEN)), header_request(PEER_ID_LIKE)],
        errors.InvalidRequestError,
    ),
    "header naming no pusher": (request()[:1] + [header_request("")], errors.InvalidRequestError),
    "malformed pusher": (request()[:1] + [header_request("x" * 500)], errors.InvalidRequestError),
    "round id without a size": (request(round_id=7), errors.InvalidRequestError),
    "round too large": (request(round_id=7, round_size=1 << 20), errors.InvalidRequestError),
}


def corrupt_bytes() -> list[pb.InferenceRequest]:
    messages = request()
    messages[1].step.hidden.buffer = messages[1].step.hidden.buffer[:-3]
    return messages


def declared(field: str, shape: list[int], dtype: str, buffer: bytes = b"\0" * 8) -> list[pb.InferenceRequest]:
    """A step whose ``field`` declares ``shape`` but carries only a few bytes (nothing may be allocated)."""
    messages = request()
    step = messages[1].step
    target = step.hidden if field == "hidden" else getattr(step.spec, field)
    target.CopyFrom(pb.Tensor(buffer=buffer, shape=shape, dtype=dtype))
    return messages


BAD_REQUESTS["bytes do not match shape"] = (corrupt_bytes(), errors.InvalidRequestError)
BAD_REQUESTS.update(
    {
        "hidden declares 2**40 tokens": (declared("hidden", [1, 2**40, HIDDEN], "float32"), errors.InvalidRequestError),
        "hidden declares 2**62 rows": (
            declared("hidden", [2**62, 2**62, HIDDEN], "float32"),
            errors.InvalidRequestError,
        ),
        "hidden of 1000 dimensions": (declared("hidden", [1] * 1000, "float32"), errors.InvalidRequestError),
        "hidden of unknown dtype": (declared("hidden", [1, 2, HIDDEN], "float64"), errors.InvalidRequestError),
        "mask declares 2**40 columns": (declared("attention_mask", [1, 2**40], "bool"), errors.InvalidRequestError),
        "mask of wrong dtype": (request(attention_mask=torch.ones(1, 2)), errors.InvalidRequestError),
        "position ids declare 2**40": (declared("position_ids", [1, 2**40], "int64"), errors.InvalidRequestError),
        "position ids of wrong dtype": (
            request(position_ids=torch.tensor([[0, 1]], dtype=torch.int32)),
            errors.InvalidRequestError,
        ),
        "infinite hidden": (request(hidden=torch.full((1, 2, HIDDEN), float("inf"))), errors.InvalidRequestError),
        "push to a malformed peer id": (request(push_to=("not a peer id!", "x")), errors.InvalidRequestError),
        "push without a session id": (request(push_to=(PEER_ID_LIKE, "")), errors.InvalidRequestError),
        "session id too long": (request(session_id="s" * 129), errors.InvalidRequestError),
    }
)


def lora(rank: int = 4, block: int = 0, module: str = "self_attn.q_proj", a=None, b=None) -> pb.Adapter:
    a = torch.zeros(rank, HIDDEN) if a is None else a
    b = torch.zeros(HIDDEN, rank) if b is None else b
    weight = pb.LoraWeight(block=block, module=module, a=tensors.to_proto(a), b=tensors.to_proto(b))
    return pb.Adapter(lora=pb.LoraWeights(rank=rank, alpha=8, weights=[weight]))


BAD_REQUESTS.update(
    {
        "reorder out of range": (request(batch_size=1, reorder=torch.tensor([1])), errors.InvalidRequestError),
        "reorder of wrong length": (request(reorder=torch.tensor([0, 0])), errors.InvalidRequestError),
        "reorder of wrong dtype": (request(reorder=torch.tensor([0], dtype=torch.int32)), errors.InvalidRequestError),
        "step prompts longer than the step": (
            request(prompts=torch.zeros(6, 1, 3, HIDDEN)),
            errors.InvalidRequestError,
        ),
        "session LoRA on an unknown layer": (
            request(adapter=lora(module="mlp.nothing")),
            errors.InvalidRequestError,
        ),
    }
)


@pytest.fixture(scope="module")
def server_and_client(tiny_models):
    folder = tiny_models["llama"]
    with LocalSwarm() as swarm:
        (server,) = swarm.start(folder, [("0:6", ("--max-request-tokens", "64", "--cache-tokens", "1024"))])
        model = AutoDistributedModelForCausalLM.from_pretrained(str(folder), initial_peers=swarm.initial_peers)
        try:
            yield server, model, AutoModelForCausalLM.from_pretrained(folder).eval()
        finally:
            model.shutdown()


async def send_one(p2p, peer_id: str, messages: list[pb.InferenceRequest]) -> BaseException | None:
    """Send ``messages`` on a new stream; the server's error for them (None if it answered a step)."""
    stream = InferenceStream(p2p, peer_id)
    await stream.open(timeout=5)
    try:
        for message in messages[:-1]:
            stream.send(message)
        await stream.step(messages[-1], timeout=10)
    except ServerFailure as failure:
        return failure.cause
    finally:
        stream.close()
    return None


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_inference_request_gets_typed_error(server_and_client, case):
    server, model, _ = server_and_client
    message, expected = BAD_REQUESTS[case]
    cause = model.client.loop.run(send_one(model.client.p2p, server.peer_id, message))
    assert isinstance(cause, expected), f"{case}: got {cause!r}"
    assert str(cause)  # a message the user can read
    assert server.proc.poll() is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_step_in_another_float_dtype_is_converted_on_arrival(server_and_client, dtype):
    """The float32 server computes a float16 (or bfloat16) step exactly as that step converted to float32."""
    server, model, _ = server_and_client
    sent = torch.randn(1, 3, HIDDEN, generator=torch.Generator().manual_seed(3)).to(dtype)

    async def output(hidden: torch.Tensor) -> torch.Tensor:
        stream = InferenceStream(model.client.p2p, server.peer_id)
        await stream.open(timeout=5)
        try:
            opening, step = request(hidden=hidden)
            stream.send(opening)
            return tensors.from_proto((await stream.step(step, timeout=10)).hidden)
        finally:
            stream.close()

    converted = model.client.loop.run(output(sent))
    assert converted.dtype == torch.float32
    assert torch.equal(converted, model.client.loop.run(output(sent.float())))


def test_bad_forward_requests_get_typed_errors(server_and_client):
    server, model, _ = server_and_client
    client = model.client
    outside = pb.ForwardRequest(start_block=4, end_block=8, hidden=tensors.to_proto(torch.randn(1, 2, HIDDEN)))
    wrong = pb.ForwardRequest(start_block=0, end_block=6, hidden=tensors.to_proto(torch.randn(2, 3)))
    for message, expected in ((outside, errors.BlocksNotServedError), (wrong, errors.InvalidRequestError)):
        with pytest.raises(ServerFailure) as caught:
            client.loop.run(call_forward(client.p2p, server.peer_id, message, timeout=10))
        assert isinstance(caught.value.cause, expected)


def test_garbage_bytes_on_the_stream_do_not_hurt_the_server(server_and_client):
    server, model, _ = server_and_client
    client = model.client

    async def send_garbage():
        from hivemind.p2p import PeerID

        _, reader, writer = await client.p2p.call_binary_stream_handler(
            PeerID.from_base58(server.peer_id), rpc_name("Inference")
        )
        writer.write(b"\x05\xff\xff\xff\xff\xff\x00garbage" * 10)
        await writer.drain()
        await asyncio.wait_for(reader.read(1024), timeout=10)  # the server answers or closes; it must not hang
        writer.close()

    client.loop.run(send_garbage())
    assert server.proc.poll() is None


def test_server_still_serves_sessions_correctly_after_bad_requests(server_and_client):
    server, model, local = server_and_client
    prompt = torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(9))
    expected = local.generate(prompt, max_new_tokens=12, do_sample=False)
    with model.inference_session(max_length=32) as session:
        first = model.generate(prompt[:, :4], max_new_tokens=1, do_sample=False)  # a session opened before...
        for message, _ in list(BAD_REQUESTS.values())[:6]:  # ...bad requests from someone else...
            model.client.loop.run(send_one(model.client.p2p, server.peer_id, message))
        assert session.position == 4
        # ...carries on: feed the rest of the prompt and generate
        actual = model.generate(prompt, max_new_tokens=12, do_sample=False)
    assert first[0, :4].tolist() == prompt[0, :4].tolist()
    assert actual.tolist() == expected.tolist()
    assert server.proc.poll() is None


def test_oversized_message_is_refused_before_it_is_read(server_and_client):
    """A frame declaring 1 TiB gets a typed error at once; what follows is discarded, not buffered."""
    server, model, _ = server_and_client
    peer = HostilePeer(model.client.p2p)  # the client's own peer: not shut down here
    before = rss_mb(server.proc.pid)

    async def flood() -> pb.InferenceResponse | None:
        reader, writer = await peer.stream(server.peer_id)
        writer.write(P2P.MESSAGE_MARKER + (1 << 40).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + bytes(1 << 18))
        answer = await receive(reader, timeout=10)
        with suppress(ConnectionError):  # the server drops the stream a moment later
            for _ in range(64):
                writer.write(bytes(1 << 20))
                await writer.drain()
        writer.close()
        return answer

    answer = model.client.loop.run(flood())
    assert answer is not None and answer.error.code == pb.INVALID_ARGUMENT, answer
    assert "exceeds this server's limit" in answer.error.message
    after = rss_mb(server.proc.pid)
    print(f"server RSS {before:.0f} MB -> {after:.0f} MB after 64 MiB sent behind a 1 TiB frame")
    assert after - before < 32
    assert server.proc.poll() is None


def test_forward_over_the_daemon_limit_fails_on_the_sender(server_and_client):
    server, model, _ = server_and_client
    client = model.client
    huge = pb.ForwardRequest(start_block=0, end_block=6, hidden=tensors.to_proto(torch.randn(1, 20000, HIDDEN)))
    with pytest.raises(ServerFailure, match="size"):  # 5 MiB: the sender's daemon refuses it (4 MiB cap)
        client.loop.run(call_forward(client.p2p, server.peer_id, huge, timeout=10))
    assert server.proc.poll() is None


def backward(tokens: int = 2, **fields) -> pb.BackwardRequest:
    """A valid backward request over blocks 0:6 unless ``fields`` override something."""
    generator = torch.Generator().manual_seed(tokens)
    message = pb.BackwardRequest(start_block=fields.pop("start_block", 0), end_block=fields.pop("end_block", 6))
    message.hidden.CopyFrom(tensors.to_proto(fields.pop("hidden", torch.randn(1, tokens, HIDDEN, generator=generator))))
    message.grad_output.CopyFrom(
        tensors.to_proto(fields.pop("grad", torch.randn(1, tokens, HIDDEN, generator=generator)))
    )
    for name, value in fields.items():
        if isinstance(value, torch.Tensor):
            getattr(message, name).CopyFrom(tensors.to_proto(value))
        elif isinstance(value, Message):
            getattr(message, name).CopyFrom(value)
        else:
            setattr(message, name, value)
    return message


def without_grad() -> pb.BackwardRequest:
    message = backward()
    message.ClearField("grad_output")
    return message


BAD_BACKWARD = {
    "gradient of another shape": (backward(grad=torch.randn(1, 3, HIDDEN)), errors.InvalidRequestError),
    "NaN gradient": (backward(grad=torch.full((1, 2, HIDDEN), float("nan"))), errors.InvalidRequestError),
    "infinite input": (backward(hidden=torch.full((1, 2, HIDDEN), float("inf"))), errors.InvalidRequestError),
    "no gradient": (without_grad(), errors.InvalidRequestError),
    "too many tokens": (backward(tokens=65), errors.InvalidRequestError),
    "gradient declares 2**40 tokens": (
        backward(grad_output=pb.Tensor(buffer=b"\0" * 8, shape=[1, 2**40, HIDDEN], dtype="float32")),
        errors.InvalidRequestError,
    ),
    "block gradients of wrong count": (
        backward(grad_block_outputs=torch.zeros(2, 1, 2, HIDDEN)),
        errors.InvalidRequestError,
    ),
    "prompts longer than the input": (backward(prompts=torch.zeros(6, 1, 3, HIDDEN)), errors.InvalidRequestError),
    "prompts for other blocks": (backward(prompts=torch.zeros(5, 1, 1, HIDDEN)), errors.InvalidRequestError),
    "NaN prompts": (backward(prompts=torch.full((6, 1, 1, HIDDEN), float("nan"))), errors.InvalidRequestError),
    "LoRA rank over the limit": (backward(adapter=lora(rank=33)), errors.InvalidRequestError),
    "LoRA on an unknown layer": (backward(adapter=lora(module="self_attn.x_proj")), errors.InvalidRequestError),
    "LoRA of wrong shape": (backward(adapter=lora(a=torch.zeros(4, HIDDEN - 1))), errors.InvalidRequestError),
    "LoRA outside the blocks": (backward(adapter=lora(block=7)), errors.InvalidRequestError),
    "NaN LoRA weights": (backward(adapter=lora(b=torch.full((HIDDEN, 4), float("nan")))), errors.InvalidRequestError),
    "unknown preloaded adapter": (backward(adapter=pb.Adapter(name="nope")), errors.AdapterNotFoundError),
    "blocks outside span": (backward(end_block=8), errors.BlocksNotServedError),
}


@pytest.mark.parametrize("case", list(BAD_BACKWARD))
def test_bad_backward_request_gets_typed_error(server_and_client, case):
    server, model, _ = server_and_client
    message, expected = BAD_BACKWARD[case]
    client = model.client
    with pytest.raises(ServerFailure) as caught:
        client.loop.run(call_backward(client.p2p, server.peer_id, message, timeout=10))
    assert isinstance(caught.value.cause, expected), f"{case}: got {caught.value.cause!r}"
    assert str(caught.value.cause)
    assert server.proc.poll() is None


def test_server_still_computes_exact_gradients_after_bad_backward_requests(server_and_client):
    server, model, local = server_and_client
    client = model.client
    for message, _ in BAD_BACKWARD.values():
        with contextlib.suppress(ServerFailure):
            client.loop.run(call_backward(client.p2p, server.peer_id, message, timeout=10))
    good = backward(tokens=5)
    answer = client.loop.run(call_backward(client.p2p, server.peer_id, good, timeout=10))

    hidden = tensors.from_proto(good.hidden).clone().requires_grad_()
    positions = torch.arange(5).unsqueeze(0)
    embeddings = local.model.rotary_emb(hidden, positions)
    output = hidden
    for layer in local.model.layers:
        output = layer(output, attention_mask=None, position_embeddings=embeddings, position_ids=positions)
    output.backward(tensors.from_proto(good.grad_output))
    torch.testing.assert_close(tensors.from_proto(answer.grad_hidden), hidden.grad, rtol=1e-5, atol=1e-5)
    assert server.proc.poll() is None
