"""Activation compression on the wire (off by default): asked for by the client, used with servers that
support it, on the answers and on server-to-server pushes; the logits stay close to the local model's."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from client import AutoDistributedModelForCausalLM
from proto import pb
from swarm.tools.localswarm import LocalSwarm

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def swarm_and_local(tiny_models):
    folder = tiny_models["llama"]
    with LocalSwarm() as swarm:
        swarm.start(folder, [("0:3", ()), ("3:6", ())])
        yield swarm, folder, AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.mark.parametrize(
    "compression, push, tolerance",
    [("none", False, 1e-5), ("float16", False, 1e-3), ("int8", False, 3e-2), ("int8", True, 3e-2)],
)
def test_compressed_steps_stay_close_to_the_local_model(swarm_and_local, compression, push, tolerance):
    swarm, folder, local = swarm_and_local
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(folder), initial_peers=swarm.initial_peers, compression=compression, push=push
    )
    ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(11))
    try:
        with torch.no_grad(), model.inference_session(max_length=16) as session:
            logits = model(ids[:, :5], past_key_values=None).logits  # stateless forward
            prefix = torch.cat([model.generate(ids[:, :5], max_new_tokens=1, do_sample=False)], dim=1)
            wanted = {"none": pb.COMPRESSION_NONE, "float16": pb.COMPRESSION_FLOAT16, "int8": pb.COMPRESSION_INT8}
            assert {hop.envelope.compression for hop in session.hops} == {wanted[compression]}
    finally:
        model.shutdown()
    with torch.no_grad():
        expected = local(ids[:, :5]).logits
    error = ((logits - expected).norm() / expected.norm()).item()
    assert error <= tolerance
    assert prefix.shape == (2, 6)


def test_an_unknown_compression_is_refused(swarm_and_local):
    swarm, folder, _ = swarm_and_local
    with pytest.raises(ValueError, match="compression must be one of"):
        AutoDistributedModelForCausalLM.from_pretrained(
            str(folder), initial_peers=swarm.initial_peers, compression="zip"
        )
