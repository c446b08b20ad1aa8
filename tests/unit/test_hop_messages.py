"""What a client's session puts on the wire for one server: an ``open`` first, then typed steps, headers and
relays, each with that server's envelope (dtype, compression, membership proof, voucher)."""

from __future__ import annotations

import pytest
import torch

from client.envelope import Envelope
from client.hop import HopSession, StepInput
from proto import pb
from swarm.net import tensors
from swarm.routing.chains import Hop
from swarm.spans import BlockRange

pytestmark = pytest.mark.timeout(30)
PEER = "12D3KooWGzBPmD6C4nj3ss1n4bYnpoc7XgpCfiEHRAzNixBBnF5u"


class Recorder:
    """Stands in for an InferenceStream: keeps what would be sent."""

    def __init__(self):
        self.sent: list[pb.InferenceRequest] = []

    def send(self, request: pb.InferenceRequest) -> None:
        self.sent.append(request)


def hop_session() -> tuple[HopSession, Recorder]:
    voucher = pb.Voucher(issuer_peer_id="issuer", holder_peer_id="holder", expires_at=1.0)
    envelope = Envelope(torch.bfloat16, pb.COMPRESSION_FLOAT16, b"proof", voucher)
    stream = Recorder()
    return HopSession(Hop(PEER, BlockRange(2, 4)), stream, envelope, p2p=None), stream


def item(tokens: int = 3) -> StepInput:
    prompts = torch.randn(6, 1, 1, 8)
    return StepInput(torch.randn(2, tokens, 8), torch.arange(tokens).expand(2, tokens), None, prompts)


def test_the_first_step_opens_the_session_with_the_envelopes_credentials():
    hop, stream = hop_session()
    hop.send_step(item(), max_length=32, adapter="trained", round_id=9, round_size=4)
    opening, step = stream.sent
    assert opening.WhichOneof("kind") == "open" and step.WhichOneof("kind") == "step"
    assert (opening.open.session_id, opening.open.start_block, opening.open.end_block) == (hop.session_id, 2, 4)
    assert (opening.open.max_length, opening.open.batch_size, opening.open.adapter.name) == (32, 2, "trained")
    assert opening.open.membership == b"proof" and opening.open.voucher.holder_peer_id == "holder"
    spec = step.step.spec
    assert (spec.step, spec.position, spec.round_id, spec.round_size) == (0, 0, 9, 4)
    assert spec.compression == pb.COMPRESSION_FLOAT16 and not spec.HasField("push_to")
    assert step.step.hidden.dtype == "bfloat16" and step.step.hidden.compression == pb.COMPRESSION_FLOAT16
    assert list(spec.prompts.shape) == [2, 1, 1, 8] and spec.prompts.dtype == "bfloat16"  # this hop's blocks


def test_headers_name_their_pusher_and_relays_follow_them():
    hop, stream = hop_session()
    hop.send_step(item(), max_length=32)
    hop.position = 3  # the server answered step 0
    stream.sent.clear()
    hop.send_step(item(1), max_length=32, push_from="QmPrevious", push_to=(PEER, "theirs"))
    hop.relay(item(1))
    header, relay = stream.sent
    assert header.WhichOneof("kind") == "header" and header.header.push_from == "QmPrevious"
    assert (header.header.spec.step, header.header.spec.position) == (1, 3)
    assert (header.header.spec.push_to.peer_id, header.header.spec.push_to.session_id) == (PEER, "theirs")
    assert header.header.spec.round_size == 0  # not declared
    assert relay.WhichOneof("kind") == "relay" and relay.relay.position == 3
    assert tensors.from_proto(relay.relay.hidden).dtype == torch.bfloat16
