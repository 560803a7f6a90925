"""A stage's peak memory is its own: sampled while it runs, so a later, smaller stage does not inherit an earlier
stage's peak (as the process's ru_maxrss would make it)."""

from __future__ import annotations

import time

import numpy as np

from reelflow.core.cost import PeakMemory

MIB = 1 << 20


def test_the_peak_is_each_block_s_own() -> None:
    with PeakMemory(interval=0.005) as big:
        block = np.ones(300 * MIB // 8)  # touched, so resident
        time.sleep(0.05)
        del block
    with PeakMemory(interval=0.005) as small:
        time.sleep(0.05)
    assert big.rss - small.rss > 200 * MIB
    assert small.rss > 0 and big.gpu is None is small.gpu  # no CUDA here
