"""Servers that drop out mid-generation: the client reroutes, replays, and the tokens do not change.

Real server processes are killed with SIGKILL at chosen moments (first, middle and last span; prefill
and decode; inside a multi-turn session; during beam search; in the middle of a backward pass). Each
killed server is replaced afterwards, so every test starts from a swarm with two replicas of each span.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from client import AutoDistributedModelForCausalLM
from swarm.tools.localswarm import LocalSwarm

pytestmark = pytest.mark.timeout(300)
SPANS = ["0:2", "2:4", "4:6"]


class KillAtToken:
    """A generate() streamer that SIGKILLs the server serving hop ``hop`` when token ``at`` arrives
    (``put`` gets the prompt first, then one call per generated token)."""

    def __init__(self, swarm: LocalSwarm, session, hop: int, at: int, sig: int = signal.SIGKILL):
        self.swarm, self.session, self.hop, self.at, self.sig = swarm, session, hop, at, sig
        self.calls, self.victim = 0, None
        self.verifiers: list[str] = []  # the servers that checked the victim's steps (lazy verification)

    def put(self, value) -> None:
        if self.calls == self.at and self.victim is None:
            self.victim = self.swarm.by_peer(self.session.route[self.hop].peer_id)
            shadow = self.session.verifier.shadows.get(self.session.hops[self.hop])
            self.verifiers = [hop.peer_id for hop in shadow.hops] if shadow is not None else []
            os.kill(self.victim.proc.pid, self.sig)
        elif self.victim is not None and self.sig == signal.SIGTERM:
            self.await_handover()
        self.calls += 1

    def await_handover(self, timeout: float = 30.0) -> None:
        """Hold generation while the replacement of a leaving server is being built (a busy machine can
        take longer than the remaining tokens), so the swap at the next step is what the test sees."""
        deadline = time.monotonic() + timeout
        while self.session.moving and time.monotonic() < deadline:
            time.sleep(0.01)

    def end(self) -> None:
        pass


@pytest.fixture(scope="module")
def replicated(tiny_models):
    folder = tiny_models["llama"]
    with LocalSwarm() as swarm:
        swarm.start(folder, [(span, ()) for span in SPANS for _ in range(2)])
        model = AutoDistributedModelForCausalLM.from_pretrained(
            str(folder), initial_peers=swarm.initial_peers, update_period=0.5
        )
        try:
            yield swarm, model, AutoModelForCausalLM.from_pretrained(folder).eval()
        finally:
            model.shutdown()


def restore(swarm: LocalSwarm) -> None:
    """Bring every span back to two live replicas."""
    for span in SPANS:
        for dead in [s for s in swarm.servers if s.blocks == span and s.proc.poll() is not None]:
            if len(swarm.live(span)) < 2:
                swarm.replace(dead)
            swarm.servers.remove(dead)
            dead.kill_group()


def prompt(seed: int, length: int = 10) -> torch.Tensor:
    return torch.randint(3, 256, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("hop", [0, 1, 2], ids=["first", "middle", "last"])
@pytest.mark.parametrize("at", [0, 5], ids=["prefill", "decode"])
def test_killed_server_does_not_change_tokens(replicated, hop, at):
    swarm, model, local = replicated
    ids = prompt(10 * hop + at)
    expected = local.generate(ids, max_new_tokens=14, do_sample=False)
    try:
        with model.inference_session(max_length=32) as session:
            session.open(batch_size=1)
            killer = KillAtToken(swarm, session, hop, at)
            actual = model.generate(ids, max_new_tokens=14, do_sample=False, streamer=killer)
            assert killer.victim is not None and killer.victim.proc.wait(timeout=10) == -signal.SIGKILL
            assert killer.victim.peer_id not in [h.peer_id for h in session.route]
        assert actual.tolist() == expected.tolist()
    finally:
        restore(swarm)


def test_the_verifier_of_a_killed_server_takes_its_place(replicated, caplog):
    """With lazy verification (the default) the killed server's shadow, which holds its history, becomes the
    replacement: it catches up on the steps since its last check, and nothing is replayed."""
    swarm, model, local = replicated
    ids = prompt(77)
    expected = local.generate(ids, max_new_tokens=14, do_sample=False)
    try:
        with caplog.at_level(logging.INFO, logger="client"), model.inference_session(max_length=32) as session:
            session.open(batch_size=1)
            killer = KillAtToken(swarm, session, 1, 6)
            actual = model.generate(ids, max_new_tokens=14, do_sample=False, streamer=killer)
            assert killer.victim.proc.wait(timeout=10) == -signal.SIGKILL
            assert killer.verifiers, "the killed server had no verifier"
            assert session.route[1].peer_id in killer.verifiers
        assert actual.tolist() == expected.tolist()
        assert "takes its place" in caplog.text and "Replayed" not in caplog.text
    finally:
        restore(swarm)


def test_killed_server_inside_multi_turn_session(replicated):
    swarm, model, local = replicated
    turn1, turn2 = prompt(40, 6), prompt(41, 5)
    expected1 = local.generate(turn1, max_new_tokens=8, do_sample=False)
    expected2 = local.generate(torch.cat([expected1, turn2], dim=1), max_new_tokens=8, do_sample=False)
    try:
        with model.inference_session(max_length=64) as session:
            reply1 = model.generate(turn1, max_new_tokens=8, do_sample=False)
            killer = KillAtToken(swarm, session, hop=1, at=3)
            reply2 = model.generate(torch.cat([reply1, turn2], dim=1), max_new_tokens=8, streamer=killer)
            assert killer.victim is not None
        assert reply1.tolist() == expected1.tolist()
        assert reply2.tolist() == expected2.tolist()
    finally:
        restore(swarm)


def test_graceful_shutdown_moves_clients_without_error(replicated):
    swarm, model, local = replicated
    ids = prompt(50)
    expected = local.generate(ids, max_new_tokens=14, do_sample=False)
    try:
        with model.inference_session(max_length=32) as session:
            session.open(batch_size=1)
            killer = KillAtToken(swarm, session, hop=1, at=4, sig=signal.SIGTERM)
            actual = model.generate(ids, max_new_tokens=14, do_sample=False, streamer=killer)
            assert killer.victim.peer_id not in [hop.peer_id for hop in session.route]  # moved off it...
        assert killer.victim.peer_id not in model.client.routes.banned()  # ...as told, not after a failure
        assert actual.tolist() == expected.tolist()
        assert killer.victim.proc.wait(timeout=30) == 0  # it stopped cleanly
        assert "Server stopped" in "".join(killer.victim.output)
    finally:
        restore(swarm)


def test_full_server_is_skipped(tiny_models):
    folder = tiny_models["llama"]
    with LocalSwarm() as swarm:
        small, big = swarm.start(folder, [("0:6", ("--cache-tokens", "16")), ("0:6", ("--cache-tokens", "4096"))])
        model = AutoDistributedModelForCausalLM.from_pretrained(str(folder), initial_peers=swarm.initial_peers)
        try:
            for _ in range(3):
                with model.inference_session(max_length=64) as session:
                    session.open(batch_size=1)
                    assert [hop.peer_id for hop in session.route] == [big.peer_id]
        finally:
            model.shutdown()


@pytest.mark.parametrize("hop,at", [(1, 5), (0, 0)], ids=["middle-decode", "first-prefill"])
def test_killed_server_with_push_does_not_change_tokens(replicated, tiny_models, hop, at):
    swarm, _, local = replicated
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(tiny_models["llama"]), initial_peers=swarm.initial_peers, push=True, update_period=0.5
    )
    ids = prompt(60 + hop)
    expected = local.generate(ids, max_new_tokens=14, do_sample=False)
    try:
        with model.inference_session(max_length=32) as session:
            session.open(batch_size=1)
            killer = KillAtToken(swarm, session, hop, at)
            actual = model.generate(ids, max_new_tokens=14, do_sample=False, streamer=killer)
            assert killer.victim is not None
        assert actual.tolist() == expected.tolist()
    finally:
        model.shutdown()
        restore(swarm)


def test_failed_pushes_fall_back_to_client_relay(tiny_models):
    folder = tiny_models["llama"]
    local = AutoModelForCausalLM.from_pretrained(folder).eval()
    with LocalSwarm() as swarm:
        swarm.start(folder, [(span, ("--test-drop-pushes",)) for span in SPANS])
        model = AutoDistributedModelForCausalLM.from_pretrained(
            str(folder), initial_peers=swarm.initial_peers, push=True
        )
        ids = prompt(70)
        try:
            with model.inference_session(max_length=32) as session:
                actual = model.generate(ids, max_new_tokens=10, do_sample=False)
                assert session.relayed == 2 * 10  # two pushes per step (3 servers), all relayed by the client
        finally:
            model.shutdown()
    assert actual.tolist() == local.generate(ids, max_new_tokens=10, do_sample=False).tolist()


def test_killed_server_during_backward_does_not_change_gradients(replicated, caplog):
    """The server of the first span dies after the forward pass, while loss.backward() runs (it is reached
    last): its backward request goes to the other replica and the gradients are those of local transformers."""
    swarm, model, local = replicated
    ids = prompt(80, 12).expand(2, 12)
    embeds = local.model.embed_tokens(ids).detach()
    x_remote, x_local = (embeds.clone().requires_grad_() for _ in range(2))
    local(inputs_embeds=x_local, labels=ids).loss.backward()

    outputs = []
    handle = model.model.layers.register_forward_hook(lambda module, args, output: outputs.append(output))
    try:
        loss = model(inputs_embeds=x_remote, labels=ids).loss
        (blocks_output,) = outputs
        first_piece = blocks_output.grad_fn.record.chunks[0][1][0]  # the pieces this forward pass went through
        assert first_piece.span.start == 0
        victim = swarm.by_peer(first_piece.peer_id)

        def kill(grad: torch.Tensor) -> None:  # the gradient reached the remote blocks: their backward starts now
            os.kill(victim.proc.pid, signal.SIGKILL)

        blocks_output.register_hook(kill)
        with caplog.at_level(logging.WARNING, logger="client.retry"):
            loss.backward()
        assert victim.proc.wait(timeout=10) == -signal.SIGKILL
        assert f"Server {victim.peer_id} failed" in caplog.text  # its backward request failed over
        torch.testing.assert_close(x_remote.grad, x_local.grad, rtol=1e-5, atol=1e-5)
    finally:
        handle.remove()
        restore(swarm)


def test_killed_server_during_beam_search_does_not_change_tokens(replicated):
    """The replacement replays the session's steps with the beam reorders they carried."""
    swarm, model, local = replicated
    ids = prompt(81, 8)
    expected = local.generate(ids, max_new_tokens=10, num_beams=3, do_sample=False)
    try:
        with model.inference_session(max_length=32) as session:
            session.open(batch_size=3)
            calls, victims = [], []

            def kill_at_sixth_step(module, args, kwargs):
                calls.append(1)
                if len(calls) == 6:
                    victims.append(swarm.by_peer(session.route[1].peer_id))
                    os.kill(victims[0].proc.pid, signal.SIGKILL)

            handle = model.register_forward_pre_hook(kill_at_sixth_step, with_kwargs=True)
            try:
                actual = model.generate(ids, max_new_tokens=10, num_beams=3, do_sample=False)
            finally:
                handle.remove()
            assert victims and victims[0].peer_id not in [hop.peer_id for hop in session.route]
        assert actual.tolist() == expected.tolist()
    finally:
        restore(swarm)
