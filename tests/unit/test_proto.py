"""The checked-in proto/stamen_pb2.py must be what proto/generate.py makes from proto/stamen.proto."""

from __future__ import annotations

from pathlib import Path

import pytest

from proto import SERVICE, rpc_name
from proto.generate import HERE, generate

pytestmark = pytest.mark.timeout(60)


def test_generated_module_is_up_to_date(tmp_path):
    fresh = generate(tmp_path)
    assert fresh == tmp_path / "stamen_pb2.py"
    checked_in = Path(HERE) / "stamen_pb2.py"
    assert fresh.read_bytes() == checked_in.read_bytes(), "run `python proto/generate.py` and commit the result"


def test_rpc_names_come_from_the_service():
    assert SERVICE.full_name == "stamen.v1.BlockService"
    assert rpc_name("Inference") == "stamen.v1.BlockService.Inference"
    assert rpc_name("Forward") == "stamen.v1.BlockService.Forward"
