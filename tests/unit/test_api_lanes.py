"""The API engine's lanes stay even: ``surplus`` says how many requests a lane hands to the least loaded one."""

from __future__ import annotations

import asyncio

import pytest

from client.api.lanes import Lane, surplus

pytestmark = pytest.mark.timeout(30)


def _lanes(*loads: int) -> list[Lane]:
    async def make() -> list[Lane]:  # a Lane holds an asyncio.Event: made on a loop, as the engine does
        return [Lane(index) for index in range(len(loads))]

    lanes = asyncio.run(make())
    for lane, load in zip(lanes, loads, strict=True):
        lane.active.extend(object() for _ in range(load))
    return lanes


@pytest.mark.parametrize(
    ("loads", "index", "expected"),
    [
        ((6, 2), 0, 2),  # 6 and 2 become 4 and 4
        ((5, 4), 0, 0),  # off by one: not worth a move
        ((2, 6), 0, 0),  # the least loaded lane gives nothing
        ((8, 0), 0, 4),  # all requests of a lane whose others ended: half move
        ((3, 3, 0), 1, 1),
        ((1,), 0, 0),  # one lane: nowhere to go
    ],
)
def test_a_lane_hands_its_surplus_to_the_least_loaded_lane(loads, index, expected):
    lanes = _lanes(*loads)
    assert surplus(lanes, lanes[index]) == expected


def test_requests_joining_count_towards_a_lanes_load():
    lanes = _lanes(4, 1)
    lanes[1].joining.extend(object() for _ in range(3))
    assert surplus(lanes, lanes[0]) == 0
