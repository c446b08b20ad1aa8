"""``python -m swarm monitor`` arguments: which models it watches, under which prefixes and depths."""

from __future__ import annotations

import pytest

from swarm.__main__ import build_parser, main, watched_models
from swarm.tools.monitor.app import WatchedModel

pytestmark = pytest.mark.timeout(30)


PEERS = ["--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/Qm"]


def parse(*argv: str):
    return build_parser().parse_args(["monitor", *PEERS, *argv])


def test_prefixes_and_depths_given_per_model():
    args = parse("--model", "org/A", "B", "--dht-prefix", "a", "b", "--num-blocks", "30", "24")
    assert watched_models(args) == [WatchedModel("org/A", "a", 30), WatchedModel("B", "b", 24)]


def test_prefix_defaults_to_the_model_name():
    assert watched_models(parse("--model", "org/Some Model", "--num-blocks", "12")) == [
        WatchedModel("org/Some Model", "Some-Model", 12)
    ]


def test_one_value_per_model_or_a_clear_error(caplog):
    with pytest.raises(ValueError, match="one value per --model"):
        watched_models(parse("--model", "A", "B", "--num-blocks", "12"))
    assert main(["monitor", *PEERS, "--model", "A", "--dht-prefix", "a", "b"]) == 2
    assert "one value per --model" in caplog.text
