"""Flow-matching inversion on exact velocity oracles and the checkpoints' own schedules."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from reelflow.core.inversion.edm import InversionState
from reelflow.core.inversion.flowmatch import FlowSchedule, gaussian_velocity, generate, invert, straight_velocity

WAN_SCHEDULER = {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0}  # Wan 2.1 480p's config


def schedules() -> list[FlowSchedule]:
    return [FlowSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0), 12),
            FlowSchedule.from_scheduler(UniPCMultistepScheduler(**WAN_SCHEDULER), 12)]  # fmt: skip


@pytest.mark.parametrize(("solver", "extrapolate"), [("euler", False), ("euler", True), ("heun", False)])
def test_inversion_then_sampling_on_straight_paths_returns_the_input(solver: str, extrapolate: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 3, 8, 8, generator=generator, dtype=torch.float64)
    velocity = straight_velocity(x0, noise)
    for schedule in schedules():
        for strength in (0.5, 1.0):
            x = invert(velocity, x0, schedule, strength=strength, solver=solver, extrapolate=extrapolate)
            start = schedule.sigmas[schedule.start_index(strength)]
            torch.testing.assert_close(x, (1 - start) * x0 + start * noise, rtol=0, atol=1e-12)  # on the path
            back = generate(velocity, x, schedule, strength=strength, solver=solver)
            torch.testing.assert_close(back, x0, rtol=0, atol=1e-12)


def test_inversion_visits_the_schedulers_times_and_ends_where_sampling_starts() -> None:
    for scheduler in (FlowMatchEulerDiscreteScheduler(shift=3.0), UniPCMultistepScheduler(**WAN_SCHEDULER)):
        schedule = FlowSchedule.from_scheduler(scheduler, 10)
        scheduler.set_timesteps(10)
        assert schedule.timesteps == tuple(float(t) for t in scheduler.timesteps)
        assert schedule.sigmas == tuple(float(s) for s in scheduler.sigmas)
        seen_up, seen_down = [], []
        calls = lambda seen: lambda x, sigma, t: seen.append((sigma, t)) or torch.zeros_like(x)  # noqa: E731
        reached = []
        invert(calls(seen_up), torch.zeros(3), schedule, strength=0.6, on_step=lambda i, sigma, x: reached.append(sigma))
        generate(calls(seen_down), torch.zeros(3), schedule, strength=0.6)
        start = schedule.start_index(0.6)
        assert start == 4 and reached[-1] == schedule.sigmas[start], "inversion ends where sampling starts"
        assert seen_down[0] == (schedule.sigmas[start], schedule.timesteps[start])
        assert [t for _, t in seen_down] == list(schedule.timesteps[start:]), "sampling calls the scheduler's timesteps"
        up = [schedule.timesteps[-1], *reversed(schedule.timesteps[start + 1 :])]  # from the clean end: the first step's own
        assert [t for _, t in seen_up] == up, "inversion climbs them back, never asking at timestep 0"


def test_euler_sampling_is_diffusers_flow_match_euler_scheduler_step_for_step() -> None:
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    schedule = FlowSchedule.from_scheduler(scheduler, 8)
    velocity = gaussian_velocity(0.4, 0.8)
    x = torch.randn(256, generator=torch.Generator().manual_seed(3))
    ours = generate(velocity, x, schedule, strength=1.0)
    scheduler.set_timesteps(8)
    theirs = x
    for t, sigma in zip(scheduler.timesteps, scheduler.sigmas):
        theirs = scheduler.step(velocity(theirs, float(sigma), float(t)), t, theirs).prev_sample
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_extrapolation_and_heun_each_beat_plain_reverse_euler_on_curved_paths() -> None:  # benchmarks/flowmatch.py
    mean, std = 1.0, 2.0  # data far from the noise: curved paths
    velocity = gaussian_velocity(mean, std)
    x0 = mean + std * torch.randn(4096, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    schedule = FlowSchedule.from_scheduler(UniPCMultistepScheduler(**WAN_SCHEDULER), 30)

    def round_trip(**options) -> float:  # noqa: ANN003
        x = invert(velocity, x0, schedule, strength=1.0, **options)
        return float((generate(velocity, x, schedule, strength=1.0, solver=options.get("solver", "euler")) - x0).pow(2).mean().sqrt())

    naive, extrapolated, heun = round_trip(), round_trip(extrapolate=True), round_trip(solver="heun")
    assert extrapolated < naive / 5 and heun < naive / 5, (naive, extrapolated, heun)


def test_a_resumed_inversion_equals_an_uninterrupted_one() -> None:
    velocity = gaussian_velocity(0.3, 0.7)
    x0 = torch.randn(64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    schedule = schedules()[1]
    kept = {}
    whole = invert(velocity, x0, schedule, strength=0.8, extrapolate=True, on_step=lambda i, s, x: kept.setdefault(i, x))
    resumed = invert(velocity, x0, schedule, strength=0.8, extrapolate=True, resume=InversionState(3, kept[2]))
    torch.testing.assert_close(resumed, whole, rtol=0, atol=0)


def test_schedulers_that_are_not_flow_matching_are_refused_with_the_fix() -> None:
    for scheduler in (DDIMScheduler(), UniPCMultistepScheduler()):
        with pytest.raises(ValueError, match="not a flow-matching scheduler.*use_flow_sigmas"):
            FlowSchedule.from_scheduler(scheduler, 10)
    with pytest.raises(ValueError, match="Heun evaluates both ends"):
        invert(straight_velocity(torch.zeros(1), torch.ones(1)), torch.zeros(1), schedules()[0], strength=1.0, solver="heun",
               extrapolate=True)  # fmt: skip
    with pytest.raises(ValueError, match="solver 'rk4'"):
        invert(straight_velocity(torch.zeros(1), torch.ones(1)), torch.zeros(1), schedules()[0], strength=1.0, solver="rk4")
