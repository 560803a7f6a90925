"""Flow-matching sampling and its inversion: the ODE of rectified-flow models (Wan 2.x, VACE).

Convention (diffusers' ``FlowMatchEulerDiscreteScheduler`` and Wan's ``flow_prediction``): the latents at
time ``sigma`` in [0, 1] are ``x = (1 - sigma) * x0 + sigma * eps`` and the network predicts the
velocity ``v = dx/dsigma = eps - x0``. Sampling integrates from the start sigma down to 0; inversion
climbs the same sigmas from the clean latents at 0 up to the start sigma of an edit of a given strength,
so inversion ends exactly where sampling starts. diffusers has no inverse flow-matching scheduler
(peers-2026.md §1): both directions are written here, on the checkpoint's own schedule (its sigmas and
timesteps, from its scheduler config; Wan ships UniPC with flow sigmas, whose multistep updates are not
inverted step by step, so both directions take Euler or Heun steps on its sigmas).

Solvers, for the step from ``sigma_c`` (current) to ``sigma_n`` (next), ``h = sigma_n - sigma_c``:

* ``euler``: ``x + h * v(x, sigma_c)``; in inversion this is the "naive" reverse step (DDIM inversion's
  analogue), which evaluates the velocity at the current point while the forward step it should undo
  evaluates it at the unknown higher point;
* ``heun``: the trapezoid of ``v`` at both ends, the end estimated by an Euler step (two network calls
  a step), second order in ``h``.

Videoshop's extrapolation (``extrapolate=True``, Euler inversion only): evaluate the velocity at
``sigma_p`` on the line through ``x0`` and the current latents, ``x0 + (x - x0) * sigma_p / sigma_c``,
which makes each step the exact algebraic inverse of the forward Euler step when the trajectory is
straight. Measured on an exact velocity oracle with curved trajectories (Gaussian data; the round trip
invert then generate, ``benchmarks/flowmatch.py``), it lowers the round-trip error of Euler inversion 3x to
32x at 30 to 50 steps on Wan's and FlowMatchEuler's schedules (1.1x to 11x at 10 steps), so it is kept, as
an option (off by default: plain reverse Euler). Heun, at two network calls a step, does better on
FlowMatchEuler's schedule; on Wan's, whose last sigma before 0 is comparatively high, its final Euler step
(below) can leave it behind the extrapolation.

The network is only asked at the schedule's own times: a trained model never sees timestep 0 (Wan's
sampler stops near 60 of 1000), so the first inversion step, from the clean latents, takes the velocity at
the clean latents and the step's upper sigma and timestep (the only point it has; on a straight path the
velocity is the same everywhere), and Heun's last sampling step, into sigma 0, is an Euler step (as in
Karras et al.'s sampler).

Latents are any tensor shape; the velocity function closes over the conditioning.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from reelflow.core.inversion.edm import InversionState, OnStep, StepSchedule

SOLVERS = ("euler", "heun")
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler", "DPMSolverMultistepScheduler")


class Velocity(Protocol):
    """The network as a velocity field: ``v = velocity(x, sigma, timestep)``."""

    def __call__(self, x: torch.Tensor, sigma: float, timestep: float) -> torch.Tensor: ...


@dataclass(frozen=True)
class FlowSchedule(StepSchedule):
    """A flow-matching sampler's sigmas (descending from at most 1, ending with the appended 0) and timesteps."""

    @classmethod
    def from_scheduler(cls, scheduler: Any, num_steps: int) -> FlowSchedule:
        """The schedule the checkpoint's scheduler samples ``num_steps`` steps with (on a copy of ``scheduler``:
        ``set_timesteps`` changes it in place, and models are shared).

        Raises:
            ValueError: The scheduler is not a flow-matching one (a DDIM or EDM scheduler, or UniPC without flow
                sigmas), so its sigmas are not times on the straight path.
        """
        name = type(scheduler).__name__
        flow = name == "FlowMatchEulerDiscreteScheduler" or (
            name in FLOW_SCHEDULERS and scheduler.config.get("use_flow_sigmas", False)
            and scheduler.config.get("prediction_type") == "flow_prediction")  # fmt: skip
        if not flow:
            raise ValueError(
                f"{name} (prediction_type {scheduler.config.get('prediction_type')!r}) is not a flow-matching scheduler; "
                "flow-matching inversion needs the checkpoint's FlowMatchEulerDiscreteScheduler, or UniPC/DPM-Solver "
                "with use_flow_sigmas and prediction_type 'flow_prediction' (Wan's scheduler config)"
            )
        scheduler = type(scheduler).from_config(scheduler.config)
        scheduler.set_timesteps(num_steps)
        sigmas = tuple(float(s) for s in scheduler.sigmas)
        timesteps = tuple(float(t) for t in scheduler.timesteps)
        if len(sigmas) != len(timesteps) + 1 or sigmas[-1] != 0.0 or not 0.0 < sigmas[0] <= 1.0:
            raise ValueError(f"{name} gave {len(timesteps)} timesteps and sigmas {sigmas[0]:.3g}..{sigmas[-1]:.3g}; a "
                             "flow-matching schedule has one sigma more than timesteps, at most 1, ending with 0")  # fmt: skip
        return cls(sigmas, timesteps)

    def timestep(self, index: int) -> float:
        """The network's timestep at ``sigmas[index]`` (0 at the appended clean end)."""
        return self.timesteps[index] if index < self.num_steps else 0.0


def invert(
    velocity: Velocity,
    x0: torch.Tensor,
    schedule: FlowSchedule,
    *,
    strength: float,
    solver: str = "euler",
    extrapolate: bool = False,
    resume: InversionState | None = None,
    on_step: OnStep | None = None,
) -> torch.Tensor:
    """Climb from the clean latents ``x0`` (sigma 0) to ``sigmas[start_index]``, where an edit of ``strength`` starts.

    Args:
        velocity: The network as a velocity field, with the inversion's conditioning.
        x0: Clean latents, float32.
        schedule: The sampler's schedule; inversion visits its last ``steps(strength)`` sigmas in reverse.
        strength: The edit's strength.
        solver: ``euler`` or ``heun`` (see the module docstring).
        extrapolate: Euler only: evaluate the velocity on the line through ``x0`` at the higher sigma.
        resume: Continue an interrupted inversion from its last stored step.
        on_step: Called after every step with its index, the sigma reached and the latents there.

    Returns:
        The latents at ``sigmas[start_index]``.
    """
    _check(solver, extrapolate)
    start = schedule.start_index(strength)
    steps = list(range(schedule.num_steps - 1, start - 1, -1))  # k: from sigmas[k + 1] up to sigmas[k]
    state = resume or InversionState(0, x0)
    x = state.x
    for i, k in enumerate(steps[state.done :], start=state.done):
        sigma_c, sigma_p = schedule.sigmas[k + 1], schedule.sigmas[k]
        if sigma_c == 0.0:  # from the clean latents: the network asked at the step's upper time, never at 0
            x = x + (sigma_p - sigma_c) * velocity(x, sigma_p, schedule.timestep(k)).to(x.dtype)
        elif extrapolate:
            x_bar = x0 + (x - x0) * (sigma_p / sigma_c)
            x = x + (sigma_p - sigma_c) * velocity(x_bar, sigma_p, schedule.timestep(k)).to(x.dtype)
        else:
            x = _step(velocity, x, sigma_c, schedule.timestep(k + 1), sigma_p, schedule.timestep(k), solver)
        if on_step is not None:
            on_step(i, sigma_p, x)
    return x


def generate(
    velocity: Velocity,
    x: torch.Tensor,
    schedule: FlowSchedule,
    *,
    strength: float,
    solver: str = "euler",
    on_step: OnStep | None = None,
) -> torch.Tensor:
    """Sample from ``x`` at ``sigmas[start_index]`` down to 0: the steps an edit of ``strength`` takes."""
    _check(solver, False)
    for i, k in enumerate(range(schedule.start_index(strength), schedule.num_steps)):
        x = _step(velocity, x, schedule.sigmas[k], schedule.timestep(k), schedule.sigmas[k + 1], schedule.timestep(k + 1), solver)
        if on_step is not None:
            on_step(i, schedule.sigmas[k + 1], x)
    return x


def generate_scheduled(
    velocity: Velocity, x: torch.Tensor, scheduler: Any, num_steps: int, *, strength: float, on_step: OnStep | None = None
) -> torch.Tensor:
    """Sample as :func:`generate`, with the scheduler's own update instead of Euler or Heun: UniPC's multistep
    predictor-corrector on Wan's flow sigmas, exactly as diffusers' Wan pipelines step (on a copy of ``scheduler``).
    For generation only: its multistep updates have no step-by-step inverse, so an inversion cannot be undone by it."""
    schedule = FlowSchedule.from_scheduler(scheduler, num_steps)  # refuses a scheduler that is not flow matching
    scheduler = type(scheduler).from_config(scheduler.config)
    scheduler.set_timesteps(num_steps)
    start = schedule.start_index(strength)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    for i, k in enumerate(range(start, schedule.num_steps)):
        t = scheduler.timesteps[k]
        v = velocity(x, schedule.sigmas[k], schedule.timestep(k)).to(x.dtype)
        x = scheduler.step(v, t, x, return_dict=False)[0]
        if on_step is not None:
            on_step(i, schedule.sigmas[k + 1], x)
    return x


def _step(velocity: Velocity, x: torch.Tensor, sigma: float, t: float, sigma_next: float, t_next: float, solver: str) -> torch.Tensor:
    h = sigma_next - sigma
    v = velocity(x, sigma, t).to(x.dtype)
    if solver == "euler" or sigma_next == 0.0:  # Heun's last step to 0 is Euler's: no network call at timestep 0
        return x + h * v
    end = velocity(x + h * v, sigma_next, t_next).to(x.dtype)
    return x + h * 0.5 * (v + end)


def _check(solver: str, extrapolate: bool) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"solver {solver!r} is not one of {', '.join(SOLVERS)}")
    if extrapolate and solver != "euler":
        raise ValueError("extrapolate is Videoshop's proxy for the Euler step; Heun evaluates both ends itself")


def straight_velocity(x0: torch.Tensor, noise: torch.Tensor) -> Callable[[torch.Tensor, float, float], torch.Tensor]:
    """The exact velocity field of one clean sample and one noise (every path straight, ``v = noise - x0``): an
    oracle on which Euler steps are exact in both directions."""
    return lambda x, sigma, timestep: noise - x0


def gaussian_velocity(mean: float, std: float) -> Callable[[torch.Tensor, float, float], torch.Tensor]:
    """The exact velocity field of data ``N(mean, std^2)`` per element under standard Gaussian noise:
    ``E[eps - x0 | x_sigma]``, affine in ``x``; its paths curve (they are straight only for point-mass data,
    ``std == 0``, which :func:`straight_velocity` is)."""

    def velocity(x: torch.Tensor, sigma: float, timestep: float) -> torch.Tensor:
        a = 1.0 - sigma  # x = a * x0 + sigma * eps
        variance = a * a * std * std + sigma * sigma
        centred = x - a * mean
        expected_x0 = mean + a * std * std / variance * centred
        expected_eps = sigma / variance * centred
        return expected_eps - expected_x0

    return velocity
