"""Euler sampling on an EDM sigma schedule, and its inversion with noise extrapolation (Videoshop).

Stable Video Diffusion samples with diffusers' ``EulerDiscreteScheduler`` on Karras sigmas
(Karras et al. 2022, "Elucidating the Design Space...", eq. 5 and Table 1): the network sees
``c_in(sigma) * x`` and the noise level ``t(sigma)``, and the denoised estimate is
``D(x) = c_skip(sigma) * x + c_out(sigma) * F``. One Euler step from ``sigma`` to ``sigma_next`` is
``x + (sigma_next - sigma) * (x - D(x)) / sigma``.

Videoshop (Fan et al. 2024, arXiv 2403.14617, §3.2; methods.md 2.3) inverts that step exactly: from
``x`` at the lower ``sigma_c`` it solves for the ``x_new`` at the higher ``sigma_p`` whose forward
Euler step lands on ``x``, with the network output ``F`` frozen. ``F`` must be evaluated at the
unknown ``x_new``, so it is evaluated at a proxy: above the threshold ``Sigma`` the straight line
through ``x0`` and ``x`` extrapolated to ``sigma_p`` (denoising trajectories are nearly straight), at
or below it ``x0`` plus fixed Gaussian noise at ``sigma_p``. Naive inversion (the ablation) evaluates
``F`` at the current ``x`` instead.

Notation: ``sigma_c`` = the current (lower) noise level, ``sigma_p`` = the next (higher) one,
``x`` = latents at ``sigma_c``, ``x_bar`` = the proxy at ``sigma_p``, ``F`` = the network output,
``Sigma`` = ``threshold``. Latents are ``(T, C, h, w)`` tensors, frames first (``T`` frames, so
that ``F`` stays the network output).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

PREDICTION_TYPES = ("v_prediction", "epsilon")


class Denoiser(Protocol):
    """The network: ``F = model(c_in * x, sigma, timestep)`` on ``(T, C, h, w)`` latents."""

    def __call__(self, sample: torch.Tensor, sigma: float, timestep: float) -> torch.Tensor: ...


OnStep = Callable[[int, float, torch.Tensor], None]
"""``on_step(i, sigma, x)``: step ``i`` (0-based, in the loop's own order) reached ``x`` at ``sigma``."""


def preconditioning(sigma: float, prediction_type: str) -> tuple[float, float, float]:
    """``(c_skip, c_out, c_in)`` at ``sigma``, as diffusers' EulerDiscreteScheduler applies them."""
    c_in = 1.0 / math.sqrt(sigma**2 + 1.0)
    if prediction_type == "v_prediction":
        return 1.0 / (sigma**2 + 1.0), -sigma * c_in, c_in
    if prediction_type == "epsilon":
        return 1.0, -sigma, c_in
    raise ValueError(f"prediction type {prediction_type!r} has no EDM form here; use one of {', '.join(PREDICTION_TYPES)}")


def denoised(x: torch.Tensor, output: torch.Tensor, sigma: float, prediction_type: str) -> torch.Tensor:
    """``D(x) = c_skip * x + c_out * F``: the clean latents the network predicts."""
    c_skip, c_out, _ = preconditioning(sigma, prediction_type)
    return c_skip * x + c_out * output


def euler_step(x: torch.Tensor, output: torch.Tensor, sigma: float, sigma_next: float, prediction_type: str) -> torch.Tensor:
    """One Euler step of the probability-flow ODE from ``sigma`` to ``sigma_next`` (s_churn = 0)."""
    return x + (sigma_next - sigma) * (x - denoised(x, output, sigma, prediction_type)) / sigma


def inverse_euler_step(
    x: torch.Tensor, output: torch.Tensor, sigma_c: float, sigma_p: float, prediction_type: str
) -> torch.Tensor:
    """The ``x_new`` at ``sigma_p`` whose Euler step to ``sigma_c`` with the same ``F`` returns ``x``.

    ``x = x_new + (sigma_c - sigma_p) * (x_new - c_skip x_new - c_out F) / sigma_p`` is linear in
    ``x_new``; coefficients are taken at ``sigma_p``, where the forward step evaluates them.
    """
    c_skip, c_out, _ = preconditioning(sigma_p, prediction_type)
    delta = sigma_c - sigma_p
    return (sigma_p * x + delta * c_out * output) / (sigma_p + delta * (1.0 - c_skip))


@dataclass(frozen=True)
class StepSchedule:
    """A sampler's sigmas (descending, ending with the appended 0) and the network's timestep at each but the last;
    the steps an edit of a given strength takes, as diffusers' img2img and video2video pipelines count them."""

    sigmas: tuple[float, ...]
    timesteps: tuple[float, ...]

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def start_index(self, strength: float) -> int:
        """The first step an edit of ``strength`` takes: ``num_steps - int(num_steps * strength)``."""
        return self.num_steps - min(int(self.num_steps * strength), self.num_steps)

    def steps(self, strength: float) -> int:
        """How many steps an edit of ``strength`` takes: inversion climbs them, generation descends."""
        return self.num_steps - self.start_index(strength)


@dataclass(frozen=True)
class EdmSchedule(StepSchedule):
    """An EDM sampler's schedule, with the network's prediction type."""

    prediction_type: str

    @classmethod
    def from_scheduler(cls, scheduler: Any, num_steps: int) -> EdmSchedule:
        """The schedule diffusers' ``EulerDiscreteScheduler`` samples ``num_steps`` steps with (on a copy of
        ``scheduler``: ``set_timesteps`` changes a scheduler in place, and models are shared)."""
        if scheduler.config.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"scheduler prediction type {scheduler.config.prediction_type!r} is not one of "
                             f"{', '.join(PREDICTION_TYPES)}")  # fmt: skip
        scheduler = type(scheduler).from_config(scheduler.config)
        scheduler.set_timesteps(num_steps)
        sigmas = tuple(float(s) for s in scheduler.sigmas)
        return cls(sigmas, tuple(float(t) for t in scheduler.timesteps), scheduler.config.prediction_type)

    def visited(self, strength: float) -> list[float]:
        """The sigmas generation starts from, in its order: inversion climbs the same ones in reverse."""
        return list(self.sigmas[self.start_index(strength) : self.num_steps])


def inverse_init_sigma(schedule: EdmSchedule, timestep_spacing: str) -> float:
    """What the reference's inverse scheduler multiplies the clean latents by before inverting.

    Its ``init_noise_sigma`` is diffusers' formula on the inverse pass's first sigma (the appended
    0): ``sigma`` itself for "linspace"/"trailing" spacing, ``sqrt(sigma^2 + 1)`` otherwise, so only
    "leading" (Stable Video Diffusion's config) starts from the latents rather than from zeros
    (methods.md 2.6).
    """
    sigma = min(schedule.sigmas)
    return sigma if timestep_spacing in ("linspace", "trailing") else math.sqrt(sigma**2 + 1.0)


@dataclass
class InversionState:
    """Where an inversion stands: ``done`` steps taken and the latents after them."""

    done: int
    x: torch.Tensor


def invert(
    model: Denoiser,
    x0: torch.Tensor,
    schedule: EdmSchedule,
    *,
    strength: float,
    noise: torch.Tensor,
    threshold: float = 1.0,
    naive: bool = False,
    resume: InversionState | None = None,
    on_step: OnStep | None = None,
) -> torch.Tensor:
    """Invert clean latents ``x0`` up to the sigma an edit of ``strength`` starts from.

    Args:
        model: The network, with the inversion's conditioning (no guidance in Videoshop).
        x0: Clean latents ``(T, C, h, w)``, float32.
        schedule: The sampler's schedule; the steps are its last ``num_steps - start_index`` sigmas
            climbed from the appended 0.
        strength: The edit's strength; inversion ends at ``sigmas[start_index]``, where generation starts.
        noise: ``n`` of the random proxy, drawn once for all steps (``x0.shape``).
        threshold: ``Sigma``: above it (``sigma_c > Sigma``) the proxy is the line extrapolation.
        naive: Evaluate ``F`` at the current latents (the ablation without extrapolation).
        resume: Continue an interrupted inversion from its last stored step.
        on_step: Called after every step with its index, ``sigma_p`` and the new latents.

    Returns:
        The inverted latents ``(T, C, h, w)`` at ``sigmas[start_index]``.
    """
    # 1. the steps: sigma index k from the last (lowest nonzero) down to the edit's start
    start = schedule.start_index(strength)
    steps = list(range(schedule.num_steps - 1, start - 1, -1))
    state = resume or InversionState(0, x0)
    x, spread = state.x, x0.std()
    for i, k in enumerate(steps[state.done :], start=state.done):
        sigma_p, sigma_c = schedule.sigmas[k], schedule.sigmas[k + 1]
        # 2. the proxy for the unknown latents at sigma_p
        if naive:
            x_bar = x
        elif sigma_c > threshold:
            x_bar = x0 + (x - x0) * (sigma_p / sigma_c)
        else:
            x_bar = x0 + sigma_p * spread * noise
        # 3. the network at the proxy, then 4. the exact inverse of the Euler step it drives
        _, _, c_in = preconditioning(sigma_p, schedule.prediction_type)
        output = model(c_in * x_bar, sigma_p, schedule.timesteps[k]).float()
        x = inverse_euler_step(x, output, sigma_c, sigma_p, schedule.prediction_type)
        if on_step is not None:
            on_step(i, sigma_p, x)
    return x


def generate(
    model: Denoiser, x: torch.Tensor, schedule: EdmSchedule, *, strength: float, on_step: OnStep | None = None
) -> torch.Tensor:
    """Euler sampling from ``x`` at ``sigmas[start_index]`` to 0: the steps an img2img edit takes."""
    for i, k in enumerate(range(schedule.start_index(strength), schedule.num_steps)):
        sigma, sigma_next = schedule.sigmas[k], schedule.sigmas[k + 1]
        _, _, c_in = preconditioning(sigma, schedule.prediction_type)
        output = model(c_in * x, sigma, schedule.timesteps[k]).float()
        x = euler_step(x, output, sigma, sigma_next, schedule.prediction_type)
        if on_step is not None:
            on_step(i, sigma_next, x)
    return x


