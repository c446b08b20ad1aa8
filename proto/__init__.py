"""Wire schema of Stamen: ``stamen.proto`` and its generated module ``stamen_pb2`` (no logic here).

- ``stamen_pb2``: the generated module (``pb``), checked in
- ``generate``: regenerates it with protoc (``python -m proto.generate``); a unit test checks the checked-in
  copy is current

RPC names come from the ``BlockService`` descriptor, so clients never import server code.
"""

from proto import stamen_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["BlockService"]


def rpc_name(method: str) -> str:
    """Full RPC name used on libp2p, e.g. ``stamen.v1.BlockService.Inference``."""
    return SERVICE.methods_by_name[method].full_name


__all__ = ["pb", "rpc_name", "SERVICE"]
