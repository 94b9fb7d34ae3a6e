"""The accelerator an actor uses is the one Ray assigned, by its index among the visible devices."""

from __future__ import annotations

import doctest

import pytest

from tspin_ray.workers import devices


def test_doctests():
    assert doctest.testmod(devices).failed == 0


@pytest.mark.parametrize("assigned, visible, index", [
    ([], "0,1", 0),               # no GPU assigned (a CPU actor, or outside Ray)
    (["5"], "5", 0),              # Ray narrowed the visible devices to the actor's own
    (["5", "6"], "5,6", 0),       # several: the first is this rank's (tensor-parallel engines take the rest)
    (["2"], "0,1,2,3", 2),        # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES: all visible, look it up
    (["2"], "3, 2", 1),           # any order
    (["1"], None, 1),             # nothing set: every device, in id order
])
def test_the_assigned_device_is_found_among_the_visible_ones(assigned, visible, index):
    assert devices.visible_index(assigned, visible) == index


def test_an_assigned_device_this_process_cannot_see_is_an_error():
    with pytest.raises(RuntimeError, match="Ray assigned GPU 4 but CUDA_VISIBLE_DEVICES is '0,1'"):
        devices.visible_index(["4"], "0,1")


def test_without_cuda_the_device_is_the_cpu():
    assert devices.local_device().type == "cpu"
