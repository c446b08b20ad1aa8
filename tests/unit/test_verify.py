"""The pure parts of verification (``client.verdicts``), flagged servers in the route manager, receipts of
verified work, and the ``verify`` option's validation."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from client.config import ClientConfig
from client.hop import StepInput, merge_steps
from client.points import ReceiptBook
from client.resume import left_tokens, pad_after_eos, resume_from
from client.sequence import RouteManager
from client.session import cut_steps
from client.verdicts import (
    DEFAULT_VERIFY,
    TOLERANCES,
    Evidence,
    distances,
    lag_limit,
    less_precise,
    mismatch,
    split_tokens,
    tolerance,
    verdict,
    window,
)
from swarm.net.records import ServerInfo, ServerState
from swarm.spans import BlockRange

pytestmark = pytest.mark.timeout(30)


def hidden(seed: int, batch: int = 2, tokens: int = 3, size: int = 64) -> torch.Tensor:
    return torch.randn(batch, tokens, size, generator=torch.Generator().manual_seed(seed))


def noisy(a: torch.Tensor, rel: float, seed: int = 1) -> torch.Tensor:
    """``a`` plus noise whose norm is ``rel`` times each token's norm."""
    noise = torch.randn(a.shape, generator=torch.Generator().manual_seed(seed))
    return a + noise * rel * a.norm(dim=-1, keepdim=True) / noise.norm(dim=-1, keepdim=True)


def test_distances_are_per_token_relative_l2():
    a = hidden(0)
    assert torch.allclose(distances(a, noisy(a, 0.01)), torch.full((2, 3), 0.01, dtype=torch.float64), rtol=0.05)
    assert distances(a, a).abs().max() == 0


def test_nan_or_inf_is_infinitely_far():
    a, b = hidden(0), hidden(0).clone()
    b[1, 2, 5] = math.nan
    assert math.isinf(distances(a, b)[1, 2]) and distances(a, b)[0, 0] == 0
    assert mismatch(a, b, torch.float32, torch.float32).token == 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rounding_to_a_dtype_is_within_its_tolerance(dtype):
    a = hidden(0, tokens=16, size=576) * 3
    assert mismatch(a, a.to(dtype).float(), torch.float32, dtype) is None


def test_tolerance_is_the_less_precise_dtypes():
    assert tolerance(torch.float32, torch.float32) == TOLERANCES[torch.float32]
    assert tolerance(torch.float32, torch.bfloat16) == TOLERANCES[torch.bfloat16]
    assert tolerance(torch.float16, torch.float32) == TOLERANCES[torch.float16]
    assert TOLERANCES[torch.float32] < TOLERANCES[torch.float16] < TOLERANCES[torch.bfloat16]


def test_mismatch_gives_evidence_beyond_tolerance_only():
    a = hidden(0)
    assert mismatch(a, noisy(a, 1e-3), torch.float32, torch.float32) is None
    evidence = mismatch(a, noisy(a, 0.01), torch.float32, torch.float32)
    assert isinstance(evidence, Evidence) and evidence.distance == pytest.approx(0.01, rel=0.05)
    assert evidence.tolerance == TOLERANCES[torch.float32] and "0.01" in str(evidence)
    assert mismatch(a, noisy(a, 0.05), torch.bfloat16, torch.float32) is None  # bfloat16 allows more


def test_mismatch_points_at_the_worst_token_and_skips_padding():
    a = hidden(0)
    b = a.clone()
    b[1, 1] = noisy(a[1:2, 1:2], 0.5)[0, 0]
    assert mismatch(a, b, torch.float32, torch.float32).token == 4  # row 1, token 1 of 3
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 1] = False
    assert mismatch(a, b, torch.float32, torch.float32, mask) is None


def test_mismatch_of_different_shapes():
    assert math.isinf(mismatch(hidden(0), hidden(0, tokens=2), torch.float32, torch.float32).distance)


def test_verdict_needs_a_majority():
    evidence = Evidence(0.1, 0.002, 0)
    assert verdict(evidence, None) == "suspect"
    assert verdict(None, evidence) == "shadow"
    assert verdict(None, None) is None
    assert verdict(evidence, evidence) is None


def test_window():
    assert window(1.0) == 1 and window(0.0) == 0 and window(0.5) == 2 and window(DEFAULT_VERIFY) == 12
    with pytest.raises(ValueError):
        window(1.5)
    with pytest.raises(ValueError):
        ClientConfig(verify=-0.1)
    assert ClientConfig().verify == DEFAULT_VERIFY


def info(peer: str, start: int, end: int, dtype: str) -> ServerInfo:
    return ServerInfo(peer, ServerState.ONLINE, BlockRange(start, end), 1.0, dtype=dtype)


def test_less_precise_verifiers_are_avoided_only_if_others_cover_the_span():
    servers = [info("a", 0, 4, "float32"), info("b", 0, 4, "bfloat16"), info("c", 0, 2, "float16")]
    assert less_precise(servers, BlockRange(0, 4), "float32") == {"b", "c"}
    assert less_precise(servers, BlockRange(0, 4), "float16") == {"b"}
    assert less_precise(servers, BlockRange(0, 4), "bfloat16") == set()
    assert less_precise(servers[1:], BlockRange(0, 4), "float32") == set()  # nothing else covers 2:4


def test_split_tokens_undoes_merge_steps():
    steps = [
        StepInput(hidden(i, tokens=n), torch.zeros(2, n, dtype=torch.int64), None) for i, n in enumerate([3, 1, 1, 2])
    ]
    merged = merge_steps(steps, max_tokens=4)
    assert len(merged) == 2
    pieces = split_tokens([item.hidden for item in merged], [step.hidden.shape[1] for step in steps])
    assert all(torch.equal(piece, step.hidden) for piece, step in zip(pieces, steps, strict=True))
    with pytest.raises(ValueError):
        split_tokens([merged[0].hidden], [3, 1, 1, 2])


class FixedSwarm:
    async def fetch_servers_async(self, prefix, num_blocks):
        return [info("a", 0, 4, "float32"), info("b", 0, 4, "float32")]


def test_flagged_servers_are_never_routed_through():
    routes = RouteManager(FixedSwarm(), "m", 4, ClientConfig())
    routes.flag("a")
    assert [s.peer_id for s in asyncio.run(routes.candidates())] == ["b"]
    assert [hop.peer_id for hop in asyncio.run(routes.chain())] == ["b"]


def test_confirmed_work_counts_as_verified():
    book = ReceiptBook.__new__(ReceiptBook)
    book.work, book.verified, book.sent = {}, {}, {}
    book.add("s", 10)
    book.confirm("s", 6)
    book.add("v", 4, verified=True)
    assert book.work == {"s": 10, "v": 4} and book.verified == {"s": 6, "v": 4}


def test_api_cli_takes_verify():
    from client.api.__main__ import parse_args

    config, _ = parse_args(["--initial-peers", "/ip4/127.0.0.1/tcp/1", "--verify", "1"])
    assert config.verify == 1.0
    assert parse_args(["--initial-peers", "/ip4/127.0.0.1/tcp/1"])[0].verify == DEFAULT_VERIFY
    with pytest.raises(SystemExit):
        parse_args(["--initial-peers", "/ip4/127.0.0.1/tcp/1", "--verify", "2"])


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_local_referee_computes_what_transformers_does(tiny_models, family):
    from transformers import AutoModelForCausalLM

    from client.referee import LocalReferee

    folder = tiny_models[family]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        states = model(ids, output_hidden_states=True).hidden_states  # [i]: the input of block i
    positions = torch.arange(9).expand(2, 9)
    cuts = [(0, 5), (5, 6), (6, 8), (8, 9)]  # a prefill, then decode steps (one of two tokens)
    steps = [StepInput(states[2][:, a:b], positions[:, a:b], None) for a, b in cuts]
    referee = LocalReferee(folder, model.config)
    assert referee.can_run(steps, None) and not referee.can_run(steps, "some-adapter")
    output = referee.run(BlockRange(2, 5), steps)
    assert output.shape == (2, 1, model.config.hidden_size)
    assert torch.allclose(output, states[5][:, 8:9], atol=1e-4, rtol=1e-4)


def test_a_cheat_is_caught_within_20_steps_at_the_default_window():
    assert lag_limit(window(DEFAULT_VERIFY)) == 20
    assert lag_limit(16) == 24 and lag_limit(40) == 60


def test_cut_steps_keeps_the_first_tokens_of_a_history():
    steps = [
        StepInput(hidden(0, tokens=3), torch.arange(3)[None].expand(2, 3), None),
        StepInput(hidden(1, tokens=2), torch.arange(3, 5)[None].expand(2, 2), torch.tensor([[True, False]] * 2)),
    ]
    assert cut_steps(steps, 5) == steps and cut_steps(steps, 0) == [] and cut_steps(steps, 3) == steps[:1]
    first, second = cut_steps(steps, 4)
    assert first is steps[0]
    assert torch.equal(second.hidden, steps[1].hidden[:, :1]) and second.position_ids.tolist() == [[3], [3]]
    assert second.attention_mask.tolist() == [[True], [True]]


def test_resume_from_the_verified_prefix():
    prompt = torch.tensor([[5, 6, 7]])
    recorded = torch.tensor([[5, 6, 7, 0, 9, 10]])  # a generated token may be the pad token (0)
    held = torch.tensor([[False, True, True, True]])
    resume = resume_from(4, prompt, torch.tensor([[0, 1, 1]]), recorded, held)
    assert resume.ids.tolist() == [[5, 6, 7, 0, 9]] and resume.kept == 2  # the token at 4 came from verified outputs
    assert resume.attention_mask.tolist() == [[0, 1, 1, 1, 1]]  # what was sent, and the new token
    assert resume_from(4, prompt, None, recorded, held[:, :4] | True).attention_mask.tolist() == [[1] * 5]
    early = resume_from(1, prompt, None, recorded, held[:, :1])  # back into the prompt: all of it is sent again
    assert early.ids.tolist() == [[5, 6, 7]] and early.kept == 0 and early.attention_mask is None
    assert resume_from(0, prompt, None, None, None).ids.tolist() == [[5, 6, 7]]


def test_tokens_left_after_a_resume():
    class Config:
        max_new_tokens, min_new_tokens = 20, None

    assert left_tokens({"max_new_tokens": 10, "min_new_tokens": 10}, Config, 4) == {
        "max_new_tokens": 6,
        "min_new_tokens": 6,
    }
    assert left_tokens({}, Config, 4) == {"max_new_tokens": 16}


def test_rows_that_ended_are_padded_as_transformers_pads_them():
    eos, pad = 2, 0
    sequences = torch.tensor([[9, 9, 4, 2, 7, 2, 5], [9, 9, 4, 4, 4, 2, 3]])
    assert pad_after_eos(sequences, 2, [eos], pad).tolist() == [[9, 9, 4, 2, 0, 0], [9, 9, 4, 4, 4, 2]]
    unfinished = torch.tensor([[9, 4, 2, 7], [9, 4, 4, 4]])
    assert pad_after_eos(unfinished, 1, [eos], pad).tolist() == [[9, 4, 2, 0], [9, 4, 4, 4]]
    assert pad_after_eos(unfinished, 1, [], pad).tolist() == unfinished.tolist()


def test_a_server_without_a_verifier_is_warned_about_once_per_client(caplog):
    """Every session of a client that finds no other server of a span says so only the first time (16 API
    requests on a swarm without replicas logged 16 warnings per server)."""
    from types import SimpleNamespace

    from client.shadows import Verifiers
    from client.verdicts import VerifyStats

    class Swarm:
        async def fetch_servers_async(self, prefix, num_blocks):
            return [ServerInfo("a", ServerState.ONLINE, BlockRange(0, 4), 1.0, cache_tokens_left=100)]

    client = SimpleNamespace(routes=RouteManager(Swarm(), "m", 4, ClientConfig()), verification=VerifyStats())
    hop = SimpleNamespace(peer_id="a", hop=SimpleNamespace(span=BlockRange(0, 4)), dtype=torch.float32)

    async def sessions() -> list:
        return [await Verifiers(client, None).open(hop, frozenset({"a"}), 1) for _ in range(3)]

    with caplog.at_level("WARNING", logger="client.shadows"):
        assert asyncio.run(sessions()) == [None, None, None]
    assert caplog.text.count("goes unchecked") == 1 and client.verification.unchecked == {"a"}
