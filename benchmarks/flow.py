"""Optical flow on the CPU, measured: seconds per frame pair of OpenCV's Farneback (no weights) against
torchvision's RAFT-small and RAFT-large (random weights: the architecture, not the weights, sets the time),
side by side in one process, at Soundini's frame size.

Run: ``.venv/bin/python benchmarks/flow.py [--size 256 --pairs 4 --updates 12]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main() -> None:
    from torchvision.models.optical_flow import raft_large, raft_small

    from reelflow.core.flow.estimate import Farneback, pair_flows, raft_flow

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="square frame side in pixels")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--updates", type=int, default=12, help="RAFT refinements (torchvision's default)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    base = (rng.random((args.size // 8, args.size // 8, 3)) * 255).astype(np.uint8).repeat(8, 0).repeat(8, 1)
    frames = np.stack([np.roll(base, shift=(i, 2 * i), axis=(0, 1)) for i in range(args.pairs + 1)])

    def seconds_per_pair(flow) -> float:  # noqa: ANN001
        best = float("inf")
        for _ in range(args.repeats):
            started = time.perf_counter()
            pair_flows(flow, frames)  # both directions of every pair
            best = min(best, (time.perf_counter() - started) / args.pairs)
        return best

    cases = {"OpenCV Farneback": Farneback(), "RAFT-small": raft_flow(raft_small(weights=None).eval(), args.updates),
             "RAFT-large": raft_flow(raft_large(weights=None).eval(), args.updates)}  # fmt: skip
    timings = {name: seconds_per_pair(flow) for name, flow in cases.items()}
    print(f"{args.size}x{args.size} frames, {args.pairs} pairs both ways, RAFT {args.updates} updates, "
          f"{torch.get_num_threads()} threads (best of {args.repeats})")  # fmt: skip
    for name, seconds in timings.items():
        print(f"  {name:<18} {seconds:8.3f} s per pair")
    print(f"  RAFT-small / Farneback:  {timings['RAFT-small'] / timings['OpenCV Farneback']:8.1f}x")
    print(f"  RAFT-large / RAFT-small: {timings['RAFT-large'] / timings['RAFT-small']:8.1f}x")


if __name__ == "__main__":
    main()
