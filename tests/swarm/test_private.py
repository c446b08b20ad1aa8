"""Private swarms: only holders of the swarm key can join, read or write records, or get RPCs served;
forged or unsigned announcements are ignored by clients."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
import torch
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time
from multiaddr import Multiaddr
from transformers import AutoModelForCausalLM

from client import AutoDistributedModelForCausalLM
from proto import pb
from swarm import errors
from swarm.net import tensors
from swarm.net.dht import DHTConfig, SwarmDHT, SwarmJoinError, store_records
from swarm.net.membership import generate_key, load_key
from swarm.net.records import ServerInfo, ServerState
from swarm.net.rpc import InferenceStream, ServerFailure, call_forward, call_info
from swarm.spans import BlockRange, block_key
from swarm.tools.localswarm import LocalSwarm

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def keyed_swarm(tiny_models, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys")
    key, other = generate_key(keys / "swarm.key"), generate_key(keys / "other.key")
    folder = tiny_models["qwen2"]
    with LocalSwarm() as swarm:
        servers = swarm.start(folder, [("0:3", ("--swarm-key", str(key))), ("3:6", ("--swarm-key", str(key)))])
        yield swarm, folder, key, other, servers


def test_member_client_generates_correctly(keyed_swarm):
    swarm, folder, key, _, _ = keyed_swarm
    local = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(folder), initial_peers=swarm.initial_peers, swarm_key=key
    )
    try:
        actual = model.generate(ids, max_new_tokens=10, do_sample=False)
    finally:
        model.shutdown()
    assert actual.tolist() == local.generate(ids, max_new_tokens=10, do_sample=False).tolist()


@pytest.mark.parametrize("which", ["no key", "wrong key"])
def test_client_without_the_key_is_refused_clearly(keyed_swarm, which):
    swarm, folder, _, other, _ = keyed_swarm
    key = None if which == "no key" else other
    with pytest.raises(SwarmJoinError, match="not|member") as caught:
        AutoDistributedModelForCausalLM.from_pretrained(str(folder), initial_peers=swarm.initial_peers, swarm_key=key)
    assert "swarm-key" in str(caught.value) or "swarm key" in str(caught.value)


@pytest.mark.parametrize("which", ["no key", "wrong key"])
def test_server_without_the_key_cannot_join(keyed_swarm, which):
    swarm, folder, _, other, _ = keyed_swarm
    command = [sys.executable, "-m", "server", "--model", str(folder), "--blocks", "0:6", "--host", "127.0.0.1"]
    command += ["--initial-peers", *swarm.initial_peers] + ([] if which == "no key" else ["--swarm-key", str(other)])
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, start_new_session=True)
    assert result.returncode != 0
    assert "could not join the swarm" in result.stdout + result.stderr
    assert "Serving blocks" not in result.stdout


def test_non_member_rpc_gets_not_a_member(keyed_swarm):
    """A stranger who knows a server's address dials it directly: every RPC is refused as NOT_A_MEMBER."""
    _, _, _, other, servers = keyed_swarm
    target = servers[0]

    async def ask(stranger: SwarmDHT) -> list[BaseException]:
        p2p = await stranger.replicate_p2p()
        await p2p._client.connect(PeerID.from_base58(target.peer_id), [Multiaddr(target.maddrs[0])])
        forward = pb.ForwardRequest(start_block=0, end_block=3, hidden=tensors.to_proto(torch.zeros(1, 1, 64)))
        opening = pb.Open(session_id="stranger", start_block=0, end_block=3, max_length=8, batch_size=1)
        stream = InferenceStream(p2p, target.peer_id)
        await stream.open(timeout=10)
        failures = []
        for call in (
            call_forward(p2p, target.peer_id, forward, 10),
            stream.step(pb.InferenceRequest(open=opening), 10),  # refused: the answer to its first step
            call_info(p2p, target.peer_id, 10),
        ):
            with pytest.raises(ServerFailure) as caught:
                await call
            failures.append(caught.value)
        return failures

    for stranger_key in (None, load_key(other)):
        stranger = SwarmDHT(DHTConfig(swarm_key=stranger_key))  # a swarm of its own
        try:
            forward_failure, inference_failure, info_failure = asyncio.run(ask(stranger))
        finally:
            stranger.shutdown()
        assert isinstance(forward_failure.cause, errors.NotAMemberError)
        assert isinstance(inference_failure.cause, errors.NotAMemberError)
        assert "member" in str(info_failure).lower()
    assert target.proc.poll() is None


def test_forged_and_unsigned_announcements_are_ignored(keyed_swarm):
    swarm, folder, key, _, servers = keyed_swarm
    victim = servers[1]
    member = SwarmDHT(DHTConfig(initial_peers=swarm.initial_peers, client_mode=True, swarm_key=load_key(key)))
    prefix = "tiny-qwen2"
    try:
        # a member writes, under the victim's subkey, a record claiming the victim went offline...
        later = get_dht_time() + 60
        forged = ServerInfo(victim.peer_id, ServerState.OFFLINE, BlockRange(3, 6), announced_at=later, expires_at=later)
        signed_by_member = ServerInfo(**{**forged.__dict__, "public_key": member.identity.public_key})
        signed_by_member = ServerInfo(**{**signed_by_member.__dict__, "signature": member.identity.sign(b"x")})
        for record in (forged, signed_by_member):  # unsigned, and signed with the wrong key
            keys = [block_key(prefix, block) for block in range(3, 6)]
            stored = member.run_coroutine(
                store_records, keys=keys, subkey=victim.peer_id, value=record.to_bytes(), ttl=60
            ).result(timeout=30)
            assert not stored  # every DHT node refuses to store it
        # ...and a fake server for blocks 0:6 under its own peer id, unsigned
        fake = ServerInfo(member.peer_id, ServerState.ONLINE, BlockRange(0, 6), throughput=1e9)
        keys = [block_key(prefix, block) for block in range(6)]
        member.run_coroutine(store_records, keys=keys, subkey=member.peer_id, value=fake.to_bytes(), ttl=60).result(
            timeout=30
        )

        seen = {s.peer_id: s for s in member.fetch_servers(prefix, 6)}
        assert member.peer_id not in seen
        assert seen[victim.peer_id].state == ServerState.ONLINE  # the victim's own signed record, untouched
    finally:
        member.shutdown()

    local = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(2))
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(folder), initial_peers=swarm.initial_peers, swarm_key=key
    )
    try:
        actual = model.generate(ids, max_new_tokens=6, do_sample=False)
        assert {hop.peer_id for hop in model.client.loop.run(model.client.routes.chain())} <= {
            s.peer_id for s in servers
        }
    finally:
        model.shutdown()
    assert actual.tolist() == local.generate(ids, max_new_tokens=6, do_sample=False).tolist()


def test_typed_error_exists():
    assert issubclass(errors.NotAMemberError, errors.StamenError)
