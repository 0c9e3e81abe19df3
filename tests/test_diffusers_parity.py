"""Parity with diffusers' scheduler loops: our sigma-space DDIM(eta), Euler, Euler-ancestral, DPM-Solver++(3M) and
UniPC reproduce ``DDIMScheduler``, ``EulerDiscreteScheduler``, ``EulerAncestralDiscreteScheduler``,
``DPMSolverMultistepScheduler`` and ``UniPCMultistepScheduler`` on the same epsilon network, with the same initial
noise and the same injected standard normal draws.

Two tiny, randomly initialised epsilon models (nothing is downloaded): a diffusers ``UNet2DModel`` on 1x8x8 images
and an MLP on 2D points. Our side sees them through :class:`VPEpsDenoiser`,
``D(x, s) = x - s eps(x / sqrt(1+s^2), t(s))``.

Change of variables: ``x_sigma = x_vp / sqrt(abar) = x_vp sqrt(1 + sigma^2)``; at the end ``sigma = 0`` and
``abar = 1`` (diffusers' ``set_alpha_to_one=True``), so the two final samples are directly comparable.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

diffusers = pytest.importorskip("diffusers")
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,  # noqa: E402
                       EulerDiscreteScheduler, UNet2DModel, UniPCMultistepScheduler)
from diffusers.schedulers import scheduling_euler_ancestral_discrete  # noqa: E402

from diffusion_irl.denoisers.precond import VPEpsDenoiser  # noqa: E402
from diffusion_irl.sampling import solvers  # noqa: E402
from diffusion_irl.sampling.samplers import Ancestral, DPMpp3M, UniPC  # noqa: E402
from diffusion_irl.sampling.schedules import DiscreteVPSchedule, SigmaSchedule, ddpm_alphas_cumprod  # noqa: E402

T = 1000
# float32 tolerance, relative to the size of the compared states. Measured max |ours - diffusers| / max |x|:
# Euler and Euler-ancestral on diffusers' sigmas: 0 (bitwise equal: the same float32 operations in the same order);
# DDIM(eta): 1.1e-6 at worst (n=50), 2e-7..5e-7 at n<=10 (diffusers works in VP space with float32 alphas, we work in
# sigma space: a few ulp per step). States reach |x| ~500: a random eps network's x0-prediction at t=999 is
# amplified by 1/sqrt(abar) ~ 157. The bound leaves ~20x headroom.
RTOL = 2e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: conftest.one_thread


class EpsMLP(nn.Module):
    """A tiny epsilon model for 2D data: ``eps(x_vp [B, 2], t [B] or []) -> [B, 2]`` (sinusoidal embedding of t)."""

    def __init__(self, dim: int = 2, hidden: int = 32, emb: int = 16):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(math.log(1e-3), math.log(1.0), emb // 2)))
        self.net = nn.Sequential(nn.Linear(dim + emb, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, dim))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, device=x.device).to(x.dtype).reshape(-1).expand(x.shape[0])
        arg = t[:, None] * self.freqs[None]
        return self.net(torch.cat([x, arg.cos(), arg.sin()], dim=1))


@dataclass
class Net:
    name: str
    model: nn.Module  # eps(x_vp, t); diffusers models return an object with ``.sample``
    shape: tuple[int, ...]
    batch: int

    def eps(self, x: Tensor, t: Tensor) -> Tensor:
        out = self.model(x, t)
        return getattr(out, "sample", out)

    def denoiser(self, cls=VPEpsDenoiser) -> VPEpsDenoiser:
        return cls(self.model, ddpm_alphas_cumprod(T), self.shape).eval()


def _unet() -> Net:
    torch.manual_seed(0)
    model = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                        norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "UpBlock2D"))
    return Net("unet", model.eval().requires_grad_(False), (1, 8, 8), 4)


def _mlp() -> Net:
    torch.manual_seed(0)
    return Net("mlp", EpsMLP().eval().requires_grad_(False), (2,), 64)


@pytest.fixture(scope="module", params=["unet", "mlp"])
def net(request) -> Net:
    return {"unet": _unet, "mlp": _mlp}[request.param]()


class Draws:
    """Noise stub for our solvers: ``step(i, like)`` is the i-th pre-drawn standard normal tensor."""

    def __init__(self, draws: list[Tensor]):
        self.draws = draws

    def step(self, i: int, like: Tensor) -> Tensor:
        assert self.draws[i].shape == like.shape
        return self.draws[i]


def _draws(net: Net, n: int, seed: int) -> tuple[Tensor, list[Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(net.batch, *net.shape, generator=g)
    return x0, [torch.randn(net.batch, *net.shape, generator=g) for _ in range(n)]


def assert_states_close(ours: Tensor, theirs: Tensor, what: str) -> None:
    scale = max(float(theirs.abs().max()), 1.0)
    err = float((ours - theirs).abs().max())
    assert torch.isfinite(ours).all() and torch.isfinite(theirs).all(), f"{what}: non-finite values"
    assert err <= RTOL * scale, f"{what}: max |ours - diffusers| = {err:.3g} > {RTOL:g} * {scale:.3g}"


def _collect(states: list[Tensor]):
    return lambda info: states.append(info.x_next)


# --- DDIM(eta) -------------------------------------------------------------------------------------------------------

# diffusers' DDIM steps from t to ``t - T // n``; for "trailing" this is the next visited timestep only when n
# divides T (n = 3 visits 999, 666, 332 but steps 666 -> 333), so trailing is tested at such n. "leading" is
# always consistent. Our DiscreteVPSchedule always steps to the next visited timestep.
DDIM_CASES = [("leading", 0, 10), ("leading", 1, 7), ("trailing", 0, 10), ("trailing", 0, 50)]


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("spacing,offset,n", DDIM_CASES)
def test_ddim_matches_diffusers(net, spacing, offset, n, eta):
    sched = DDIMScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample=False, set_alpha_to_one=True,
                          timestep_spacing=spacing, steps_offset=offset)
    sched.set_timesteps(n)
    schedule = DiscreteVPSchedule(T, spacing=spacing, steps_offset=offset)
    assert torch.equal(schedule.timesteps(n), sched.timesteps), (schedule.timesteps(n), sched.timesteps)
    sigmas = schedule(n)
    x_vp, draws = _draws(net, n, seed=n)

    theirs = []
    x = x_vp
    for i, t in enumerate(sched.timesteps):
        x = sched.step(net.eps(x, t), t, x, eta=eta, variance_noise=draws[i] if eta > 0 else None).prev_sample
        theirs.append(x)

    D = net.denoiser()
    ours = []
    x_sigma = x_vp * math.sqrt(1 + float(sigmas[0]) ** 2)
    final = solvers.sample_ancestral(D, x_sigma, sigmas, Draws(draws), eta=eta, callback=_collect(ours))
    assert len(ours) == len(theirs) == n
    for i in range(n):  # step by step, in VP space: x_vp = x_sigma / sqrt(1 + sigma^2)
        t = int(sched.timesteps[i])
        assert_states_close(ours[i] / math.sqrt(1 + float(sigmas[i + 1]) ** 2), theirs[i],
                            f"{net.name} DDIM(eta={eta}, {spacing}, n={n}) step {i} from t={t}")
    assert_states_close(final, theirs[-1], f"{net.name} DDIM(eta={eta}, {spacing}, n={n}) final sample")

    # the config-facing sampler on the same schedule gives the same samples
    out = Ancestral(schedule, eta=eta).sample(D, (net.batch, *net.shape), n, Draws(draws), x_init=x_sigma)
    assert out.nfe == n
    assert_states_close(out.x, theirs[-1], f"{net.name} Ancestral(eta={eta}).sample vs DDIM loop")


# --- Euler / Euler-ancestral on diffusers' own sigmas ---------------------------------------------------------------

def _euler_loop(net: Net, sched, x: Tensor) -> list[Tensor]:
    states = []
    for t in sched.timesteps:
        x = sched.step(net.eps(sched.scale_model_input(x, t), t), t, x).prev_sample
        states.append(x)
    return states


@pytest.fixture
def patched_randn(monkeypatch):
    """Make EulerAncestralDiscreteScheduler take its noise from a list, in order (one draw per step)."""
    queue: list[Tensor] = []

    def fake_randn(shape, generator=None, device=None, dtype=None, **kw):
        z = queue.pop(0)
        assert tuple(z.shape) == tuple(shape)
        return z.to(device=device, dtype=dtype)

    monkeypatch.setattr(scheduling_euler_ancestral_discrete, "randn_tensor", fake_randn)
    return queue


EULER_CASES = [("leading", 10), ("trailing", 10), ("trailing", 25)]


@pytest.mark.parametrize("spacing,n", EULER_CASES)
def test_euler_matches_diffusers(net, spacing, n):
    sched = EulerDiscreteScheduler(num_train_timesteps=T, beta_schedule="linear", timestep_spacing=spacing)
    sched.set_timesteps(n)
    x0, _ = _draws(net, 0, seed=n)
    x = x0 * sched.init_noise_sigma
    theirs = _euler_loop(net, sched, x)
    ours = []
    final = solvers.sample_euler(net.denoiser(), x, sched.sigmas, callback=_collect(ours))
    for i in range(n):
        s, s_next = float(sched.sigmas[i]), float(sched.sigmas[i + 1])
        assert_states_close(ours[i], theirs[i],
                            f"{net.name} Euler({spacing}, n={n}) step {i} (sigma {s:.4g} -> {s_next:.4g})")
    assert_states_close(final, theirs[-1], f"{net.name} Euler({spacing}, n={n}) final sample")


@pytest.mark.parametrize("spacing,n", EULER_CASES)
def test_euler_ancestral_matches_diffusers(net, spacing, n, patched_randn):
    sched = EulerAncestralDiscreteScheduler(num_train_timesteps=T, beta_schedule="linear", timestep_spacing=spacing)
    sched.set_timesteps(n)
    x0, draws = _draws(net, n, seed=n)
    patched_randn.extend(draws)
    x = x0 * sched.init_noise_sigma
    theirs = _euler_loop(net, sched, x)
    assert not patched_randn, "diffusers drew a different number of noise tensors than steps"
    ours = []
    final = solvers.sample_ancestral(net.denoiser(), x, sched.sigmas, Draws(draws), eta=1.0, callback=_collect(ours))
    for i in range(n):
        s, s_next = float(sched.sigmas[i]), float(sched.sigmas[i + 1])
        assert_states_close(ours[i], theirs[i],
                            f"{net.name} Euler-ancestral({spacing}, n={n}) step {i} (sigma {s:.4g} -> {s_next:.4g})")
    assert_states_close(final, theirs[-1], f"{net.name} Euler-ancestral({spacing}, n={n}) final sample")


def test_single_steps_match_diffusers(net, patched_randn):
    """One step of each scheduler from the same state, against our single-step functions."""
    n = 10
    for cls in (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler):
        sched = cls(num_train_timesteps=T, timestep_spacing="trailing")
        sched.set_timesteps(n)
        x0, (z,) = _draws(net, 1, seed=7)
        x = x0 * sched.init_noise_sigma
        t, s, s_next = sched.timesteps[0], sched.sigmas[0], sched.sigmas[1]
        patched_randn.append(z)
        theirs = sched.step(net.eps(sched.scale_model_input(x, t), t), t, x)
        if cls is EulerDiscreteScheduler:
            ours, denoised = solvers.euler_step(net.denoiser(), x, s, s_next)
        else:
            ours, denoised, _, _ = solvers.ancestral_step(net.denoiser(), x, s, s_next, z, eta=1.0)
        assert_states_close(denoised, theirs.pred_original_sample, f"{net.name} {cls.__name__} denoised at step 0")
        assert_states_close(ours, theirs.prev_sample, f"{net.name} {cls.__name__} state after step 0")

    sched = DDIMScheduler(num_train_timesteps=T, clip_sample=False, timestep_spacing="trailing")
    sched.set_timesteps(n)
    sigmas = DiscreteVPSchedule(T, spacing="trailing")(n)
    x_vp, (z,) = _draws(net, 1, seed=8)
    t = sched.timesteps[3]
    sigma, sigma_next = float(sigmas[3]), float(sigmas[4])
    theirs = sched.step(net.eps(x_vp, t), t, x_vp, eta=1.0, variance_noise=z)
    ours, denoised, _, _ = solvers.ancestral_step(net.denoiser(), x_vp * math.sqrt(1 + sigma**2), sigma, sigma_next, z)
    assert_states_close(denoised, theirs.pred_original_sample, f"{net.name} DDIM denoised at t={int(t)}")
    assert_states_close(ours / math.sqrt(1 + sigma_next**2), theirs.prev_sample,
                        f"{net.name} DDIM step from t={int(t)}")


# --- "linspace" spacing: fractional timesteps ------------------------------------------------------------------------

class LinearSigmaVPEpsDenoiser(VPEpsDenoiser):
    """``t(sigma)`` inverting diffusers' Euler interpolation, ``sigma(t) = np.interp(t, arange(T), sigma_table)``
    (linear in sigma), instead of our log-linear one."""

    def sigma_to_t(self, sigma):
        s = torch.as_tensor(sigma, dtype=self.sigmas.dtype, device=self.sigmas.device)
        hi = torch.searchsorted(self.sigmas, s.reshape(-1).contiguous()).clamp(1, self.num_timesteps - 1)
        hi = hi.reshape(s.shape)
        lo = hi - 1
        w = ((s - self.sigmas[lo]) / (self.sigmas[hi] - self.sigmas[lo])).clamp(0, 1)
        return lo.to(s.dtype) + w


def test_euler_linspace_fractional_timesteps(net):
    """EulerDiscreteScheduler's default "linspace" spacing visits fractional t (999, 957.375, ...) and sets sigma(t) by
    interpolating the table *linearly in sigma*; our VPEpsDenoiser (like k-diffusion, and like diffusers' own
    ``_sigma_to_t`` for Karras sigmas) maps sigma back to t *log-linearly*, so the network sees a t off by up to
    0.0025 at n=25 (0.0009 at n=8, 0.0047 at n=50). That is the whole gap: with a t(sigma) that inverts diffusers'
    linear interpolation, the samples agree to float rounding (measured 0 to 5e-7 abs at n=25). With our log-linear
    map, measured max |ours - diffusers| at n=25: UNet 3.5e-3, MLP 7.6e-4 on states of size ~530 (6.5e-6 relative);
    it is the network's sensitivity to t, so a trained network can show more."""
    n = 25
    sched = EulerDiscreteScheduler(num_train_timesteps=T, timestep_spacing="linspace")
    sched.set_timesteps(n)
    assert (sched.timesteps != sched.timesteps.round()).any()
    D = net.denoiser()
    dt = float((D.sigma_to_t(sched.sigmas[:-1]) - sched.timesteps.double()).abs().max())
    assert 0 < dt < 0.01, f"log-linear vs diffusers' linear t(sigma) differ by {dt:.3g} timesteps"
    x0, _ = _draws(net, 0, seed=3)
    x = x0 * sched.init_noise_sigma
    theirs = _euler_loop(net, sched, x)[-1]
    exact = solvers.sample_euler(net.denoiser(LinearSigmaVPEpsDenoiser), x, sched.sigmas)
    assert_states_close(exact, theirs, f"{net.name} Euler(linspace) with diffusers' linear t(sigma)")
    ours = solvers.sample_euler(D, x, sched.sigmas)
    err, scale = float((ours - theirs).abs().max()), float(theirs.abs().max())
    assert err < 1e-4 * scale, \
        f"{net.name} Euler(linspace), our log-linear t(sigma): max abs err {err:.3g} (|x| {scale:.3g})"


# --- DPM-Solver++(3M) and UniPC (bh2) on diffusers' own sigmas -------------------------------------------------------

# Both schedulers visit integer timesteps ("linspace" spacing) whose sigmas are table entries, so our VPEpsDenoiser
# sees the same t. Our sigma-space state is x_vp sqrt(1 + sigma^2); their lambda = log(alpha / sigma_vp) is our
# -log sigma. Measured max |ours - diffusers| / max |x| over these cases, every state: DPM-Solver++(3M)
# 3.4e-7..1.4e-6, UniPC 2.7e-7..2.5e-6 (the largest with final_sigmas_type="sigma_min"): their
# log-lambdas and alphas are float32. RTOL leaves 8x headroom at worst.
DPM_CASES = [(4, {}), (10, {}), (20, {}), (10, {"lower_order_final": False}), (20, {"final_sigmas_type": "sigma_min"})]
# diffusers' UniPC without lower_order_final solves a singular system on a final step to sigma 0 (r_k = 0 there), so
# that setting is compared with final_sigmas_type="sigma_min" (we take any step to 0 at first order: x = D).
UNIPC_CASES = [(2, 4, {}), (2, 10, {}), (3, 5, {}), (3, 10, {}), (3, 20, {}),
               (3, 10, {"lower_order_final": False, "final_sigmas_type": "sigma_min"})]


def _to_vp(x: Tensor, sigma: float) -> Tensor:
    return x / math.sqrt(1 + sigma**2)


def _multistep_parity(net: Net, sched, n: int, ours_fn, what: str, corrected: bool = False) -> Tensor:
    """Run diffusers' loop and ``ours_fn(D, x_sigma, sigmas, callback)`` from the same noise; compare every state in
    VP space. UniPC (``corrected``): diffusers' ``prev_sample`` is the uncorrected prediction and the corrected state
    is its ``last_sample`` after the next step, which is the state our step starts from."""
    sched.set_timesteps(n)
    sigmas = sched.sigmas.double()
    x0, _ = _draws(net, 0, seed=n)
    theirs, starts, x = [], [], x0
    for t in sched.timesteps:
        x = sched.step(net.eps(x, t), t, x).prev_sample
        theirs.append(x)
        starts.append(sched.last_sample if corrected else None)
    seen = []
    final = ours_fn(net.denoiser(), x0 * math.sqrt(1 + float(sigmas[0]) ** 2), sigmas, seen.append)
    assert len(seen) == len(theirs) == n
    for i, info in enumerate(seen):
        if corrected:  # the corrected start of step i (diffusers corrects in step i, before its predictor)
            assert_states_close(_to_vp(info.x, float(sigmas[i])), starts[i], f"{what} corrected state {i}")
        elif i + 1 < n:
            assert_states_close(_to_vp(info.x_next, float(sigmas[i + 1])), theirs[i], f"{what} step {i}")
    final_vp = _to_vp(final, float(sigmas[-1]))
    assert_states_close(final_vp, theirs[-1], f"{what} final sample")
    return final_vp, theirs[-1], sigmas


@pytest.mark.parametrize("n,kw", DPM_CASES)
def test_dpmpp_3m_matches_diffusers(net, n, kw):
    sched = DPMSolverMultistepScheduler(num_train_timesteps=T, beta_schedule="linear", solver_order=3,
                                        algorithm_type="dpmsolver++", **kw)
    lof = kw.get("lower_order_final", True)
    what = f"{net.name} DPM-Solver++(3M) n={n} {kw}"

    def ours(D, x, sigmas, callback):
        return solvers.sample_dpmpp_3m(D, x, sigmas, lower_order_final=lof, callback=callback)

    final, theirs, sigmas = _multistep_parity(net, sched, n, ours, what)
    if float(sigmas[-1]) != 0:  # a schedule as data ends with 0
        return
    # the config-facing sampler on the same sigmas gives the same samples, with NFE = steps
    x_sigma = _draws(net, 0, seed=n)[0] * math.sqrt(1 + float(sigmas[0]) ** 2)
    out = DPMpp3M(SigmaSchedule(sigmas), lower_order_final=lof).sample(net.denoiser(), (net.batch, *net.shape), n,
                                                                        Draws([]), x_init=x_sigma)
    assert out.nfe == n
    assert_states_close(_to_vp(out.x, float(sigmas[-1])), theirs, f"{what}: DPMpp3M.sample")
    if n == 10 and not kw:  # the comparison is sharp enough to tell 3M from 2M
        two = _to_vp(solvers.sample_dpmpp_2m(net.denoiser(), x_sigma, sigmas), float(sigmas[-1]))
        assert float((two - theirs).abs().max()) > 10 * RTOL * float(theirs.abs().max())


@pytest.mark.parametrize("order,n,kw", UNIPC_CASES)
def test_unipc_matches_diffusers(net, order, n, kw):
    sched = UniPCMultistepScheduler(num_train_timesteps=T, beta_schedule="linear", solver_order=order,
                                    solver_type="bh2", predict_x0=True, **kw)
    lof = kw.get("lower_order_final", True)
    what = f"{net.name} UniPC(bh2, order {order}) n={n} {kw}"

    def ours(D, x, sigmas, callback):
        return solvers.sample_unipc(D, x, sigmas, order=order, lower_order_final=lof, callback=callback)

    final, theirs, sigmas = _multistep_parity(net, sched, n, ours, what, corrected=True)
    if float(sigmas[-1]) != 0:  # a schedule as data ends with 0
        return
    x_sigma = _draws(net, 0, seed=n)[0] * math.sqrt(1 + float(sigmas[0]) ** 2)
    out = UniPC(SigmaSchedule(sigmas), order=order, lower_order_final=lof).sample(
        net.denoiser(), (net.batch, *net.shape), n, Draws([]), x_init=x_sigma)
    assert out.nfe == n
    assert_states_close(_to_vp(out.x, float(sigmas[-1])), theirs, f"{what}: UniPC.sample")
