"""The network: how peers find each other and talk.

- ``dht``: SwarmDHT, hivemind's DHT node run in-process on its own loop thread (announce, fetch records,
  sync and async), and ``p2p_options`` (NAT traversal off on loopback)
- ``records``: ServerInfo (what a server announces) <-> signed DHT bytes
- ``rpc``: calls to one server (inference stream, forward, backward, info, receipt, ping), for clients and servers
- ``tensors``: torch <-> ``pb.Tensor`` (with activation compression)
- ``membership``: private swarms: the swarm key and the proofs that a peer holds it
- ``identity``: a peer's libp2p key pair, signatures and their checks
- ``receipts``: points for volunteers: signed cumulative receipts and vouchers
- ``control``: hivemind's control connection hardened against answers that come after their call was cancelled
- ``lifetime``: child processes (the libp2p daemon, local-swarm nodes) that end with their parent

Concurrency: ``dht`` runs hivemind's node on its own loop thread; everything else is called from the
caller's event loop or thread and keeps no shared state.
"""
