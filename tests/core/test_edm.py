"""The EDM Euler sampler and Videoshop's inversion (methods.md 2.9): exact identities and an oracle model."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import EulerDiscreteScheduler

from reelflow.core.inversion.edm import (
    EdmSchedule,
    InversionState,
    euler_step,
    generate,
    inverse_euler_step,
    inverse_init_sigma,
    invert,
    preconditioning,
)

SVD_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction",
    timestep_type="continuous", use_karras_sigmas=True, sigma_min=0.002, sigma_max=700.0, timestep_spacing="leading",
    steps_offset=1, interpolation_type="linear",
)  # fmt: skip


def svd_schedule(steps: int = 25, **overrides) -> EdmSchedule:
    return EdmSchedule.from_scheduler(EulerDiscreteScheduler(**{**SVD_SCHEDULER, **overrides}), steps)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
@pytest.mark.parametrize(("sigma_c", "sigma_p"), [(0.0, 0.002), (0.339, 0.678), (1.273, 2.269), (10.1, 15.59), (350.0, 700.0)])
def test_the_inverse_step_undone_by_the_forward_step_returns_its_input(prediction_type, sigma_c, sigma_p) -> None:
    generator = torch.Generator().manual_seed(0)
    x, output = torch.randn(3, 4, 5, 6, generator=generator, dtype=torch.float64), torch.randn(3, 4, 5, 6, generator=generator, dtype=torch.float64)
    x_new = inverse_euler_step(x, output, sigma_c, sigma_p, prediction_type)
    torch.testing.assert_close(euler_step(x_new, output, sigma_p, sigma_c, prediction_type), x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
@pytest.mark.parametrize("k", [0, 12, 20, 24])
def test_our_euler_steps_are_diffusers_euler_steps(prediction_type: str, k: int) -> None:
    scheduler = EulerDiscreteScheduler(**{**SVD_SCHEDULER, "prediction_type": prediction_type})
    schedule = EdmSchedule.from_scheduler(EulerDiscreteScheduler.from_config(scheduler.config), 25)
    scheduler.set_timesteps(25)
    scheduler.set_begin_index(k)  # an img2img edit enters the schedule at k
    generator = torch.Generator().manual_seed(k)
    x = torch.randn(2, 4, 6, 6, generator=generator) * schedule.sigmas[k]
    output = torch.randn(x.shape, generator=generator)
    c_in = preconditioning(schedule.sigmas[k], prediction_type)[2]
    torch.testing.assert_close(scheduler.scale_model_input(x, scheduler.timesteps[k]), c_in * x)
    theirs = scheduler.step(output, scheduler.timesteps[k], x, return_dict=False)[0]
    ours = euler_step(x, output, schedule.sigmas[k], schedule.sigmas[k + 1], prediction_type)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * schedule.sigmas[k])


def test_svd_defaults_visit_thirteen_sigmas_and_inversion_ends_where_generation_starts() -> None:
    schedule = svd_schedule()
    assert schedule.start_index(0.55) == 12
    visited = schedule.visited(0.55)
    assert len(visited) == 13 and visited[0] == pytest.approx(15.59, abs=0.01) and visited[-1] == pytest.approx(0.002)
    calls: list[tuple[float, float]] = []

    def model(sample: torch.Tensor, sigma: float, timestep: float) -> torch.Tensor:
        calls.append((sigma, timestep))
        return torch.zeros_like(sample)

    x0 = torch.randn(2, 4, 3, 3)
    reached: list[float] = []
    invert(model, x0, schedule, strength=0.55, noise=torch.randn_like(x0), on_step=lambda i, s, x: reached.append(s))
    assert [sigma for sigma, _ in calls] == visited[::-1] and reached[-1] == visited[0]
    assert [t for _, t in calls] == pytest.approx([0.25 * math.log(s) for s in visited[::-1]], abs=1e-5)
    calls.clear()
    generate(model, x0, schedule, strength=0.55)
    assert [sigma for sigma, _ in calls] == visited


def oracle(x0: torch.Tensor, prediction_type: str):
    """The straight-line model: D(x; sigma) == x0 for every x, so every trajectory is x0 + sigma * eps."""

    def model(sample: torch.Tensor, sigma: float, timestep: float) -> torch.Tensor:
        c_skip, c_out, c_in = preconditioning(sigma, prediction_type)
        return (x0 - c_skip * sample / c_in) / c_out

    return model


def test_extrapolated_inversion_stays_on_the_line_and_naive_inversion_drifts() -> None:
    schedule = svd_schedule()
    generator = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(4, 4, 8, 8, generator=generator), torch.randn(4, 4, 8, 8, generator=generator)
    model = oracle(x0, schedule.prediction_type)
    # Enter at the first extrapolation step (sigma_c = 1.273 > Sigma) on the line x0 + sigma * eps.
    start = 8
    on_line = InversionState(start, x0 + schedule.sigmas[24 - start + 1] * eps)
    errors: dict[bool, list[float]] = {False: [], True: []}
    for naive in (False, True):
        def record(i: int, sigma: float, x: torch.Tensor, naive: bool = naive) -> None:
            errors[naive].append(float((x - (x0 + sigma * eps)).abs().max()))

        invert(model, x0, schedule, strength=0.55, noise=eps, naive=naive, resume=on_line, on_step=record)
    assert len(errors[False]) == 5 and max(errors[False]) < 1e-4  # float32 round-off only
    assert errors[True] == sorted(errors[True]) and errors[True][0] > 0.01 and errors[True][-1] > 0.3


def test_branches_switch_at_the_threshold() -> None:
    schedule = svd_schedule()
    x0, noise = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    seen: list[torch.Tensor] = []
    model = lambda sample, sigma, t: torch.tanh(sample) * 0.3  # noqa: E731  (off the line: the branches differ)

    def spy(sample: torch.Tensor, sigma: float, timestep: float) -> torch.Tensor:
        seen.append(sample / preconditioning(sigma, schedule.prediction_type)[2])
        return model(sample, sigma, timestep)

    invert(spy, x0, schedule, strength=0.55, noise=noise, threshold=1.0)
    currents = [schedule.sigmas[k + 1] for k in range(24, 11, -1)]
    random = [bool(torch.allclose(x_bar, x0 + s * x0.std() * noise, atol=1e-5))
              for x_bar, s in zip(seen, [schedule.sigmas[k] for k in range(24, 11, -1)])]  # fmt: skip
    assert random == [c <= 1.0 for c in currents] and sum(random) == 8


def test_a_resumed_inversion_ends_where_an_uninterrupted_one_does() -> None:
    schedule = svd_schedule()
    x0, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    model = lambda sample, sigma, t: torch.tanh(sample) * 0.3  # noqa: E731
    stored: list[torch.Tensor] = []
    whole = invert(model, x0, schedule, strength=0.55, noise=noise, on_step=lambda i, s, x: stored.append(x))
    resumed = invert(model, x0, schedule, strength=0.55, noise=noise, resume=InversionState(5, stored[4]))
    torch.testing.assert_close(resumed, whole, rtol=0, atol=0)


@pytest.mark.parametrize(("spacing", "expected"), [("leading", 1.0), ("linspace", 0.0), ("trailing", 0.0)])
def test_only_leading_spacing_starts_the_reference_inversion_from_the_latents(spacing: str, expected: float) -> None:
    assert inverse_init_sigma(svd_schedule(timestep_spacing=spacing), spacing) == expected
