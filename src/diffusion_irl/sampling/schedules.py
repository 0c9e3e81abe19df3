"""Noise schedules. Each returns a float64 tensor of ``n + 1`` decreasing sigmas ending with 0.

``n`` is the number of non-zero noise levels (= the number of solver steps).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor


def _check_n(n: int) -> None:
    if int(n) != n or n < 1:
        raise ValueError(f"a schedule needs n >= 1 noise levels, got {n}")


def append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """EDM's schedule ``sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho``, then 0."""
    _check_n(n)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if rho <= 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return append_zero((hi + ramp * (lo - hi)) ** rho)


def vp_sigma(t: Tensor, beta_d: float = 19.9, beta_min: float = 0.1) -> Tensor:
    """Continuous VP: ``sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)``."""
    return torch.sqrt(torch.expm1(0.5 * beta_d * t**2 + beta_min * t))


def vp_sigmas(n: int, beta_d: float = 19.9, beta_min: float = 0.1, eps_s: float = 1e-3) -> Tensor:
    """EDM's VP discretisation: ``t_i = 1 + i/(n-1) (eps_s - 1)``, ``sigma_i = sigma(t_i)``, then 0."""
    _check_n(n)
    t = torch.linspace(1, eps_s, n, dtype=torch.float64) if n > 1 else torch.ones(1, dtype=torch.float64)
    return append_zero(vp_sigma(t, beta_d, beta_min))


def ddpm_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                        beta_schedule: str = "linear") -> Tensor:
    """``alpha_bar_t`` of a discrete DDPM, computed exactly as diffusers does (float32 betas)."""
    T = int(num_train_timesteps)
    if beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=torch.float32)
    else:
        raise ValueError(f"unknown beta_schedule {beta_schedule!r}: use linear, scaled_linear or squaredcos_cap_v2")
    return torch.cumprod(1.0 - betas, dim=0)


def ddpm_timesteps(n: int, num_train_timesteps: int = 1000, spacing: str = "trailing", steps_offset: int = 0) -> Tensor:
    """The ``n`` integer timesteps (decreasing) that diffusers' DDPM/DDIM schedulers visit for each spacing."""
    _check_n(n)
    T = int(num_train_timesteps)
    if n > T:
        raise ValueError(f"a discrete schedule of {T} training timesteps has at most {T} steps, asked for {n}")
    if spacing == "leading":
        ts = (torch.arange(n) * (T // n)).flip(0) + steps_offset
    elif spacing == "trailing":
        ts = torch.round(torch.arange(T, 0, -T / n, dtype=torch.float64)).long() - 1
    elif spacing == "linspace":
        ts = torch.linspace(0, T - 1, n, dtype=torch.float64).round().long().flip(0)
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}: use leading, trailing or linspace")
    return ts.long()


def discrete_sigmas(n: int, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                    beta_schedule: str = "linear", spacing: str = "trailing", steps_offset: int = 0) -> Tensor:
    """The DDPM / DDIM discretisation in sigma-space: ``sigma_t = sqrt((1 - abar_t) / abar_t)`` at diffusers'
    timesteps, then 0 (diffusers' ``set_alpha_to_one=True`` final step)."""
    abar = ddpm_alphas_cumprod(num_train_timesteps, beta_start, beta_end, beta_schedule).double()
    ts = ddpm_timesteps(n, num_train_timesteps, spacing, steps_offset)
    return append_zero(((1 - abar[ts]) / abar[ts]).sqrt())


class Schedule:
    """A configurable schedule: ``schedule(n) -> sigmas[n + 1]`` (float64, last entry 0)."""

    def __call__(self, n: int) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class KarrasSchedule(Schedule):
    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
        karras_sigmas(2, sigma_min, sigma_max, rho)  # validate now, before any compute
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)

    def __call__(self, n: int) -> Tensor:
        return karras_sigmas(n, self.sigma_min, self.sigma_max, self.rho)

    def __repr__(self) -> str:
        return f"KarrasSchedule(sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, rho={self.rho})"


class VPSchedule(Schedule):
    def __init__(self, beta_d: float = 19.9, beta_min: float = 0.1, eps_s: float = 1e-3):
        if not 0 < eps_s < 1:
            raise ValueError(f"eps_s must be in (0, 1), got {eps_s}")
        self.beta_d, self.beta_min, self.eps_s = float(beta_d), float(beta_min), float(eps_s)

    def __call__(self, n: int) -> Tensor:
        return vp_sigmas(n, self.beta_d, self.beta_min, self.eps_s)

    def __repr__(self) -> str:
        return f"VPSchedule(beta_d={self.beta_d}, beta_min={self.beta_min}, eps_s={self.eps_s})"


class DiscreteVPSchedule(Schedule):
    """The DDPM / DDIM timestep discretisation (diffusers' spacings), in sigma-space."""

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 beta_schedule: str = "linear", spacing: str = "trailing", steps_offset: int = 0):
        self.kw = dict(num_train_timesteps=int(num_train_timesteps), beta_start=float(beta_start),
                       beta_end=float(beta_end), beta_schedule=beta_schedule, spacing=spacing,
                       steps_offset=int(steps_offset))
        discrete_sigmas(1, **self.kw)  # validate now

    def __call__(self, n: int) -> Tensor:
        return discrete_sigmas(n, **self.kw)

    def timesteps(self, n: int) -> Tensor:
        return ddpm_timesteps(n, self.kw["num_train_timesteps"], self.kw["spacing"], self.kw["steps_offset"])

    def __repr__(self) -> str:
        return f"DiscreteVPSchedule({', '.join(f'{k}={v}' for k, v in self.kw.items())})"


def logsnr_uniform_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0) -> Tensor:
    """Uniform in ``lambda = -log sigma`` (half the log-SNR): ``sigma_i = exp(log smax + i/(n-1) (log smin -
    log smax))``, then 0 (the spacing DPM-Solver and UniPC recommend)."""
    _check_n(n)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    sigmas = torch.exp(hi + ramp * (lo - hi))
    sigmas[0] = sigma_max  # exact end points, free of exp(log(.)) rounding
    if n > 1:
        sigmas[-1] = sigma_min
    return append_zero(sigmas)


def vp_t(sigma, beta_d: float = 19.9, beta_min: float = 0.1) -> Tensor:
    """The inverse of :func:`vp_sigma`: ``t = (sqrt(beta_min^2 + 2 beta_d log(1 + sigma^2)) - beta_min) / beta_d``."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return ((beta_min**2 + 2 * beta_d * torch.log1p(sigma**2)).sqrt() - beta_min) / beta_d


def time_uniform_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, beta_d: float = 19.9,
                        beta_min: float = 0.1) -> Tensor:
    """Uniform in the time t of EDM's VP parametrisation (EDM's VP discretisation, :func:`vp_sigmas`), with the end
    times ``t(sigma_max)`` and ``t(sigma_min)`` (:func:`vp_t`) instead of 1 and eps_s: ``t_i = t_max + i/(n-1)
    (t_min - t_max)``, ``sigma_i = vp_sigma(t_i)``, then 0."""
    _check_n(n)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if beta_d <= 0 or beta_min < 0:
        raise ValueError(f"need beta_d > 0 and beta_min >= 0, got {beta_d}, {beta_min}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    t_lo, t_hi = vp_t(sigma_min, beta_d, beta_min), vp_t(sigma_max, beta_d, beta_min)
    sigmas = vp_sigma(t_hi + ramp * (t_lo - t_hi), beta_d, beta_min)
    sigmas[0] = sigma_max  # exact end points, free of the round trip through t
    if n > 1:
        sigmas[-1] = sigma_min
    return append_zero(sigmas)


class LogSNRUniformSchedule(Schedule):
    """:func:`logsnr_uniform_sigmas`: uniform in log sigma between sigma_min and sigma_max, then 0."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        logsnr_uniform_sigmas(2, sigma_min, sigma_max)  # validate now
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def __call__(self, n: int) -> Tensor:
        return logsnr_uniform_sigmas(n, self.sigma_min, self.sigma_max)

    def __repr__(self) -> str:
        return f"LogSNRUniformSchedule(sigma_min={self.sigma_min}, sigma_max={self.sigma_max})"


class TimeUniformSchedule(Schedule):
    """:func:`time_uniform_sigmas`: uniform in EDM's VP time between t(sigma_max) and t(sigma_min), then 0."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, beta_d: float = 19.9, beta_min: float = 0.1):
        time_uniform_sigmas(2, sigma_min, sigma_max, beta_d, beta_min)  # validate now
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.beta_d, self.beta_min = float(beta_d), float(beta_min)

    def __call__(self, n: int) -> Tensor:
        return time_uniform_sigmas(n, self.sigma_min, self.sigma_max, self.beta_d, self.beta_min)

    def __repr__(self) -> str:
        return (f"TimeUniformSchedule(sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, beta_d={self.beta_d}, "
                f"beta_min={self.beta_min})")


def check_sigmas(sigmas: Tensor, where: str = "schedule") -> Tensor:
    """A schedule as data must be strictly decreasing, positive before a final 0: returns it (float64, 0 appended
    when missing) or raises ``ValueError`` naming ``where``."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    if len(sigmas) and float(sigmas[-1]) != 0.0:
        sigmas = append_zero(sigmas)
    if len(sigmas) < 2:
        raise ValueError(f"{where}: needs at least one non-zero noise level, got {sigmas.tolist()}")
    levels = sigmas[:-1]
    if not bool(torch.isfinite(levels).all()) or not bool((levels > 0).all()):
        raise ValueError(f"{where}: every level before the final 0 must be finite and > 0, got {levels.tolist()}")
    if not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError(f"{where}: the levels must be strictly decreasing, got {sigmas.tolist()}")
    return sigmas


class SigmaSchedule(Schedule):
    """A schedule as data: a fixed list of noise levels (a tuned schedule), given inline or read from a file (one
    number per line, or a JSON list, or a JSON object with a ``sigmas`` list). It serves exactly ``len(levels)``
    steps; asking for another count is an error naming both.

    A JSON file whose ``correction`` names a file beside it (a tuning with ``correction=true``) brings that learned
    correction of the denoiser along (``self.correction``): a sampler on this schedule samples with ``D + g``.

    Args:
        sigmas: the levels (the final 0 may be omitted). path: a file holding them instead.
    """

    correction = None

    def __init__(self, sigmas=None, path: str | None = None):
        if (sigmas is None) == (path is None):
            raise ValueError("schedule: give exactly one of sigmas (a list) and path (a file)")
        where = "schedule.sigmas" if path is None else f"schedule.path={path}"
        levels, name = read_schedule_file(path) if path is not None else (list(sigmas), None)
        self.sigmas, self.path = check_sigmas(levels, where), path
        if name:
            from diffusion_irl.sampling.correction import load_correction

            self.correction = load_correction(Path(path).parent / name)

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def __call__(self, n: int) -> Tensor:
        if int(n) != self.steps:
            source = f"the file {self.path}" if self.path else "schedule.sigmas"
            raise ValueError(f"{source} holds a {self.steps}-step schedule, but the sampler asked for {n} steps: "
                             "tune the schedule for this NFE budget (or pick the budget it was tuned for)")
        return self.sigmas.clone()

    def __repr__(self) -> str:
        return f"SigmaSchedule({[round(float(s), 6) for s in self.sigmas]})"


def read_sigmas(path: str) -> list[float]:
    """Noise levels from a text file (one per line, ``#`` comments), a JSON list or a JSON object's ``sigmas``."""
    return read_schedule_file(path)[0]


def read_schedule_file(path: str) -> tuple[list[float], str | None]:
    """``(levels, correction)``: :func:`read_sigmas`'s levels, and the ``correction`` file a JSON object names
    (None for any other file), from one read of the file."""
    import json

    file = Path(path)
    if not file.is_file():
        raise ValueError(f"schedule.path={path}: no such file")
    text = file.read_text().strip()
    try:
        if text.startswith(("[", "{")):
            data = json.loads(text)
            if isinstance(data, dict):
                return [float(s) for s in data["sigmas"]], data.get("correction") or None
            return [float(s) for s in data], None
        return [float(line.split("#")[0]) for line in text.splitlines() if line.split("#")[0].strip()], None
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"schedule.path={path}: not a list of noise levels ({exc})") from None


def write_sigmas(sigmas: Tensor, path, extra: dict | None = None) -> None:
    """Write a schedule as JSON (``{"sigmas": [...], **extra}``), readable by :class:`SigmaSchedule`."""
    import json
    from pathlib import Path

    payload = {"sigmas": [float(s) for s in check_sigmas(sigmas)], **(extra or {})}
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")
