"""Flow-matching inversion's reconstruction error, with and without its options, on an exact velocity oracle.

The oracle is the exact velocity field of Gaussian data (``core.inversion.flowmatch.gaussian_velocity``):
its paths curve, as a trained model's do, and the error of a round trip (invert the clean latents up to the
start sigma, then sample back down) is the solver's alone. Printed per schedule (Wan 2.1's UniPC flow sigmas,
shift 3; FlowMatchEuler with shift 3), step count and data spread: the RMS round-trip error of plain reverse
Euler, of Euler with Videoshop's extrapolation and of Heun, and the ratios of plain Euler's error to each
(higher is better), with the network calls each takes.

Run: ``.venv/bin/python benchmarks/flowmatch.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler  # noqa: E402

from reelflow.core.inversion.flowmatch import FlowSchedule, gaussian_velocity, generate, invert  # noqa: E402

DATA = ((0.0, 0.5), (0.5, 0.3), (1.0, 2.0))  # (mean, std) of the data, per element
STRENGTH = 1.0


def round_trip(schedule: FlowSchedule, mean: float, std: float, **options: object) -> float:
    velocity = gaussian_velocity(mean, std)
    x0 = mean + std * torch.randn(65536, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = invert(velocity, x0, schedule, strength=STRENGTH, **options)
    back = generate(velocity, x, schedule, strength=STRENGTH, solver=str(options.get("solver", "euler")))
    return float((back - x0).pow(2).mean().sqrt())


def main() -> None:
    schedulers = {
        "wan-unipc-shift3": UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
        "flowmatch-euler-shift3": FlowMatchEulerDiscreteScheduler(shift=3.0),
    }
    print(f"round trip (invert, then sample) at strength {STRENGTH}, RMS error; ratio = plain Euler's / the method's")
    print(f"{'schedule':<24} {'steps':>5} {'data':>10}  {'euler':>9} {'extrap.':>9} {'heun':>9}  "
          f"{'x extrap.':>9} {'x heun':>8}  calls e/x/h")  # fmt: skip
    for name, scheduler in schedulers.items():
        for steps in (10, 30, 50):
            schedule = FlowSchedule.from_scheduler(scheduler, steps)
            for mean, std in DATA:
                euler = round_trip(schedule, mean, std)
                extrapolated = round_trip(schedule, mean, std, extrapolate=True)
                heun = round_trip(schedule, mean, std, solver="heun")
                print(f"{name:<24} {steps:>5} {f'N({mean},{std}²)':>10}  {euler:>9.2e} {extrapolated:>9.2e} {heun:>9.2e}  "
                      f"{euler / extrapolated:>9.1f} {euler / heun:>8.0f}  {2 * steps}/{2 * steps}/{4 * steps}")  # fmt: skip


if __name__ == "__main__":
    main()
