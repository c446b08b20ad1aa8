"""Malformed requests sent straight to a live server get clear, typed errors; the server keeps serving,
and a session opened before the bad requests carries on correctly."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from client import AutoDistributedModelForCausalLM
from proto import pb, rpc_name
from swarm import errors, tensors
from swarm.localswarm import LocalSwarm
from swarm.rpc import InferenceStream, ServerFailure, call_forward

pytestmark = pytest.mark.timeout(240)
HIDDEN = 64


def request(step=0, position=0, tokens=2, hidden=None, **fields) -> pb.InferenceRequest:
    hidden = hidden if hidden is not None else torch.randn(1, tokens, HIDDEN)
    message = pb.InferenceRequest(
        session_id=fields.pop("session_id", "s-" + str(torch.randint(0, 1 << 30, ()).item())),
        start_block=fields.pop("start_block", 0),
        end_block=fields.pop("end_block", 6),
        max_length=fields.pop("max_length", 16),
        batch_size=fields.pop("batch_size", hidden.shape[0] if hidden.ndim else 1),
        step=step,
        position=position,
        hidden=tensors.to_proto(hidden),
    )
    for name, value in fields.items():
        getattr(message, name).CopyFrom(tensors.to_proto(value))
    return message


BAD_REQUESTS = {
    "wrong hidden size": (request(hidden=torch.randn(1, 2, HIDDEN - 1)), errors.InvalidRequestError),
    "wrong dtype": (request(hidden=torch.randn(1, 2, HIDDEN, dtype=torch.bfloat16)), errors.InvalidRequestError),
    "too many tokens": (request(tokens=65, max_length=100), errors.InvalidRequestError),
    "unknown session": (request(step=5, position=10), errors.SessionNotFoundError),
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
    "empty session id": (request(session_id=""), errors.InvalidRequestError),
}


def corrupt_bytes() -> pb.InferenceRequest:
    message = request()
    message.hidden.buffer = message.hidden.buffer[:-3]
    return message


BAD_REQUESTS["bytes do not match shape"] = (corrupt_bytes(), errors.InvalidRequestError)


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


async def send_one(p2p, peer_id: str, message: pb.InferenceRequest) -> BaseException | None:
    stream = InferenceStream(p2p, peer_id)
    await stream.open(timeout=5)
    try:
        await stream.step(message, timeout=10)
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
