"""p2p_options: which NAT-traversal features the libp2p daemon runs, decided from the node's config."""

from __future__ import annotations

import pytest

from swarm.net.dht import DHTConfig, is_loopback, p2p_options

pytestmark = pytest.mark.timeout(10)

ALL_OFF = {"nat_port_map": False, "auto_nat": False, "use_relay": False, "use_auto_relay": False}


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.2.1", "::1", "localhost"])
def test_loopback_nodes_run_no_nat_traversal_by_default(host):
    assert is_loopback(host)
    assert p2p_options(DHTConfig(host=host)) == ALL_OFF
    assert p2p_options(DHTConfig(host=host, client_mode=True)) == ALL_OFF


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "203.0.113.7", "example.org"])
def test_other_hosts_keep_nat_traversal_by_default(host):
    assert not is_loopback(host)
    options = p2p_options(DHTConfig(host=host))
    assert options == {"nat_port_map": True, "auto_nat": True, "use_relay": True, "use_auto_relay": False}


def test_explicit_choices_win_over_the_default():
    assert p2p_options(DHTConfig(host="0.0.0.0", nat_traversal=False)) == ALL_OFF
    relayed = p2p_options(DHTConfig(host="0.0.0.0", nat_traversal=True, auto_relay=True))
    assert relayed["use_auto_relay"] and relayed["use_relay"] and relayed["nat_port_map"]


def test_a_client_may_ask_for_relays_but_never_maps_ports():
    options = p2p_options(DHTConfig(host="127.0.0.1", client_mode=True, nat_traversal=True))
    assert options == {**ALL_OFF, "use_relay": True}


def test_contradictions_are_refused():
    with pytest.raises(ValueError, match="loopback"):
        p2p_options(DHTConfig(host="127.0.0.1", nat_traversal=True))
    with pytest.raises(ValueError, match="auto relay"):
        p2p_options(DHTConfig(host="0.0.0.0", nat_traversal=False, auto_relay=True))
    with pytest.raises(ValueError, match="auto relay"):
        p2p_options(DHTConfig(host="127.0.0.1", auto_relay=True))
