"""Seeded random inference messages for the fuzz test: tensors, adapters, opens, step specs and requests,
malformed and hostile on purpose (``tests.swarm.test_fuzz`` sends them to a live server)."""

from __future__ import annotations

import random
import uuid

import torch

from proto import pb
from tests.swarm.hostile import HIDDEN

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
