"""Verification on the client against cheating servers made by the tests (``tests.swarm.cheater``).

One swarm of honest servers of a tiny Llama (two float32, one bfloat16, each holding every block) is
shared by the module; each test adds its cheater, steers the client's routing to it (by the client's
measured round trips), and checks that the cheater is flagged and no honest server ever is.
"""

from __future__ import annotations

import random
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from client import AutoDistributedModelForCausalLM
from swarm.tools.localswarm import LocalSwarm
from tests.conftest import make_tiny_model

pytestmark = pytest.mark.timeout(300)
PREFIX = "verify-test"
SPAN = "0:6"
CHEATER = ("tests.swarm.cheater",)
CHEAT_START = 40  # noise cheater of the delay test: honest before this position


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    # weights of std 0.1: bfloat16 stays within its tolerance (see client.verdicts for the calibration)
    folder = make_tiny_model(tmp_path_factory.mktemp("verify") / "tiny-llama", "llama", seed=5, std=0.1)
    with LocalSwarm() as swarm:
        common = ("--dht-prefix", PREFIX, "--num-threads", "1")
        swarm.start(
            folder,
            [(SPAN, common), (SPAN, common), (SPAN, (*common, "--dtype", "bfloat16"))],
        )
        yield swarm, folder, AutoModelForCausalLM.from_pretrained(folder).eval()


def connect(swarm: LocalSwarm, folder, verify: float | None = None, **options):
    if verify is not None:
        options["verify"] = verify
    return AutoDistributedModelForCausalLM.from_pretrained(
        str(folder), initial_peers=swarm.initial_peers, dht_prefix=PREFIX, update_period=0.5, **options
    )


def steer(model, swarm: LocalSwarm, peer_id: str) -> None:
    """Make ``peer_id`` the client's first choice: every other server looks far away (and the records of
    stopped servers, until they expire, farther still)."""
    routes = model.client.routes
    deadline = time.monotonic() + 30
    while {s.peer_id for s in swarm.live()} - {s.peer_id for s in model.client.loop.run(routes.servers(refresh=True))}:
        assert time.monotonic() < deadline, "servers not announced in time"
        time.sleep(0.1)
    live = {server.peer_id for server in swarm.live()}
    for server in routes.view():
        far = 1.0 if server.peer_id in live else 9.0
        routes.record_ping(server.peer_id, 1e-4 if server.peer_id == peer_id else far)


def start_cheater(swarm: LocalSwarm, folder, *cheat: str, extra: tuple[str, ...] = ()):
    entry = (*CHEATER, *cheat, "--") if cheat else ("server",)
    (cheater,) = swarm.start(folder, [(SPAN, ("--dht-prefix", PREFIX, "--num-threads", "1", *extra))], entry=entry)
    return cheater


def stop(swarm: LocalSwarm, server) -> None:
    swarm.servers.remove(server)
    server.kill_group()


def wait_flagged(model, timeout: float = 20.0) -> set[str]:
    """The flagged servers once there are any (a check may still run after ``generate`` returns)."""
    deadline = time.monotonic() + timeout
    while not model.flagged_servers and time.monotonic() < deadline:
        time.sleep(0.05)
    return set(model.flagged_servers)


def generate(model, ids: torch.Tensor, tokens: int, **kwargs) -> torch.Tensor:
    """Greedy, exactly ``tokens`` new tokens (no stop at eos)."""
    return model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, **kwargs)


def prompt(seed: int, length: int = 8) -> torch.Tensor:
    return torch.randint(3, 256, (1, length), generator=torch.Generator().manual_seed(seed))


def test_verify_all_generates_the_local_tokens_with_a_cheater(honest):
    swarm, folder, local = honest
    cheater = start_cheater(swarm, folder, "noise", "0.05", "0")
    model = connect(swarm, folder, verify=1.0)
    try:
        steer(model, swarm, cheater.peer_id)
        ids = prompt(0)
        assert torch.equal(generate(model, ids, 24), generate(local, ids, 24))
        assert model.flagged_servers == {cheater.peer_id}
        detection = model.client.verification.detections[0]
        assert detection.role == "suspect" and detection.evidence.distance > detection.evidence.tolerance
    finally:
        model.shutdown()
        stop(swarm, cheater)


CHEATS = {
    "noise-1%": ("noise", "0.01", "0"),
    "noise-5%": ("noise", "0.05", "0"),
    "noise-20%": ("noise", "0.2", "0"),
    "skipped-block": ("skip", "3"),
    "lower-precision": ("lowprec",),
    "other-model": (),
}


@pytest.mark.parametrize("kind", list(CHEATS))
def test_default_verify_flags_each_kind_of_cheat(honest, kind, tmp_path):
    """With the default verify, each cheat is flagged within a 30-token generation (one check window
    with a margin)."""
    swarm, folder, _ = honest
    served = make_tiny_model(tmp_path / "other", "llama", seed=99, std=0.1) if kind == "other-model" else folder
    cheater = start_cheater(swarm, served, *CHEATS[kind])
    model = connect(swarm, folder)
    try:
        steer(model, swarm, cheater.peer_id)
        generate(model, prompt(1), 30)
        assert wait_flagged(model) == {cheater.peer_id}
        assert all(d.peer_id == cheater.peer_id for d in model.client.verification.detections)
    finally:
        model.shutdown()
        stop(swarm, cheater)


def test_default_verify_detection_delay(honest):
    """The cheat starts at a random step of the generation (the prompt's length varies around the
    position where the cheater starts); it is caught within 20 steps every time."""
    swarm, folder, _ = honest
    cheater = start_cheater(swarm, folder, "noise", "0.05", str(CHEAT_START))
    rng = random.Random(2024)
    delays = []
    try:
        for run in range(20):
            length = rng.randint(4, CHEAT_START - 2)
            model = connect(swarm, folder)
            try:
                steer(model, swarm, cheater.peer_id)
                ids = prompt(100 + run, length)
                with model.inference_session(max_length=CHEAT_START + 40) as session:
                    generate(model, ids, CHEAT_START - length + 25, session=session)
                assert wait_flagged(model) == {cheater.peer_id}, f"run {run}: not caught"
                delays.append(model.client.verification.detections[0].position - CHEAT_START)
            finally:
                model.shutdown()
    finally:
        stop(swarm, cheater)
    print(f"detection delays (steps after the cheat began): {sorted(delays)}")
    assert max(delays) <= 20, delays


def test_no_honest_server_flagged_over_mixed_dtype_checks(honest):
    swarm, folder, _ = honest
    bf16 = next(s for s in swarm.live() if "bfloat16" in s.extra)
    f32 = [s for s in swarm.live() if "bfloat16" not in s.extra and s.args[2] == "server"]
    model = connect(swarm, folder, verify=1.0)
    stats = model.client.verification
    try:
        for seed in range(40):
            if seed % 2 == 0:
                steer(model, swarm, bf16.peer_id)  # a bfloat16 server checked by float32 ones
            else:
                steer(model, swarm, f32[seed // 2 % len(f32)].peer_id)  # float32 checked by float32
            ids = torch.cat([prompt(200 + seed), prompt(300 + seed)])
            generate(model, ids, 32)
            if stats.checks >= 1000:
                break
        assert stats.checks >= 1000
        assert stats.mismatches == 0 and not model.flagged_servers
        print(f"{stats.checks} checks; largest distances by dtype pair: {stats.largest}")
    finally:
        model.shutdown()


def test_a_cheating_verifier_is_flagged(honest):
    """The cheater checks an honest server: the referee sides with the honest one."""
    swarm, folder, local = honest
    cheater = start_cheater(swarm, folder, "noise", "0.05", "0")
    model = connect(swarm, folder, verify=1.0)
    try:
        serving = next(s for s in swarm.live() if "bfloat16" not in s.extra and s is not cheater)
        steer(model, swarm, serving.peer_id)
        model.client.routes.record_ping(cheater.peer_id, 2e-4)  # the first choice as a verifier
        ids = prompt(2)
        assert torch.equal(generate(model, ids, 12), generate(local, ids, 12))
        assert model.flagged_servers == {cheater.peer_id}
        assert [d.role for d in model.client.verification.detections] == ["shadow"]
    finally:
        model.shutdown()
        stop(swarm, cheater)


def test_a_third_server_referees_when_the_client_cannot(honest, caplog):
    swarm, folder, _ = honest
    cheater = start_cheater(swarm, folder, "skip", "2")
    model = connect(swarm, folder, verify=1.0)
    model.client.referee = None  # as a client without the blocks' weights
    try:
        steer(model, swarm, cheater.peer_id)
        with caplog.at_level("WARNING", logger="client.verify"):
            generate(model, prompt(3), 6)
        assert model.flagged_servers == {cheater.peer_id}
        assert any("Flagged server" in r.message and "and with server" in r.message for r in caplog.records)
    finally:
        model.shutdown()
        stop(swarm, cheater)
