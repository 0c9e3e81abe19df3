"""Samplers against the exact Gaussian-mixture oracle: convergence in law, order of convergence, NFE accounting,
common random numbers and the Gaussian moves that the MDP needs."""
import functools
import math

import numpy as np
import pytest
import torch

from diffusion_irl.denoisers.analytic import AnalyticDenoiser
from diffusion_irl.metrics.samples import mmd
from diffusion_irl.sampling import solvers
from diffusion_irl.sampling.noise import NoiseStream
from diffusion_irl.sampling.samplers import IPNDM, Ancestral, DPMpp3M, Euler, Heun, NFECounter, UniPC
from diffusion_irl.sampling.schedules import DiscreteVPSchedule, KarrasSchedule, karras_sigmas

from .conftest import CONF
from .helpers import load_sampler

# every training-free sampler config; dg needs a trained discriminator (tests/test_guidance.py covers it)
SAMPLERS = sorted(p.stem for p in (CONF / "sampler").glob("*.yaml") if p.stem != "dg")


@pytest.fixture(scope="module")
def floor():
    """MMD of exact draws against held-out exact draws: mean and std of the noise floor (2000 vs 3000 points)."""
    from diffusion_irl.data.toy2d import gmm8

    law = gmm8()
    held = law.sample(3000, torch.Generator().manual_seed(99))
    refs = [mmd(law.sample(2000, torch.Generator().manual_seed(s)), held) for s in range(8)]
    return held, float(np.mean(refs)), float(np.std(refs))


@pytest.mark.parametrize("name", SAMPLERS)
def test_converges_to_exact_law(name, oracle, floor):
    held, ref_mean, ref_std = floor
    sampler = load_sampler(name)
    errs = {}
    for budget in (8, 128):
        out = sampler.sample(oracle, (2000, 2), sampler.steps_for_budget(budget), NoiseStream(1))
        assert out.nfe <= budget and torch.isfinite(out.x).all()
        errs[budget] = mmd(out.x, held)
    # measured: every sampler is at 0.0003 or below at NFE ~128 (noise floor ~0.000 +- 0.0007),
    # and between 0.009 (DDPM) and 0.61 (Heun) at NFE ~8
    assert errs[128] < ref_mean + 4 * ref_std + 1e-3, errs
    assert errs[8] > errs[128] + 3 * ref_std, errs


@pytest.mark.parametrize("name", ["heun", "dpmpp_2m", "ipndm", "dpmpp_3m", "unipc"])
def test_high_order_solvers_within_noise_of_reference(name, oracle, floor):
    held, ref_mean, ref_std = floor
    sampler = load_sampler(name)
    vals = [mmd(sampler.sample(oracle, (2000, 2), sampler.steps_for_budget(128), NoiseStream(s)).x, held) for s in range(3)]
    assert abs(np.mean(vals) - ref_mean) < 3 * ref_std + 3e-4, (vals, ref_mean, ref_std)


SMIN, SMAX = 0.05, 10.0


def _solve(fn, D, x0, n):
    """``n`` steps of ``fn`` from ``x0 * SMAX`` down to ``SMIN`` (no final jump to sigma = 0, where the ODE is
    singular)."""
    return fn(D, x0 * SMAX, karras_sigmas(n, SMIN, SMAX, 7.0)[:-1])


def _order(fn, D, x0, ref, ns=(16, 32, 64, 128)):
    """Fit of log pathwise error against log step size, error measured against ``ref``, a fine solution of the same
    ODE from the same initial noise."""
    errs = [(_solve(fn, D, x0, n) - ref).norm(dim=1).mean().item() for n in ns]
    return np.polyfit(np.log(1 / np.array(ns)), np.log(errs), 1)[0]


def test_order_of_convergence(wide_mixture):
    """Measured (float64) on this mixture, steps 16..128: Euler 1.02, Heun 2.10, DPM-Solver++(2M) 2.09;
    iPNDM 1.88 (fixed-step weights on the non-uniform Karras grid: the weights ignore the step ratios, which costs
    a local O(h^3), so 2 asymptotically), variable-step iPNDM 3.23; DPM-Solver++(3M) 2.37 and UniPC-3 (lower order
    final) 2.94, both held towards 2 by their first-order first (or last) step, UniPC-3 without lower_order_final
    3.93."""
    D = AnalyticDenoiser(wide_mixture)
    x0 = torch.randn(256, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = _solve(solvers.sample_heun, D, x0, 4096)  # the slow part: one 4096-step Heun solve shared by the fits
    p_euler = _order(solvers.sample_euler, D, x0, ref)
    p_heun = _order(solvers.sample_heun, D, x0, ref)
    p_dpm = _order(solvers.sample_dpmpp_2m, D, x0, ref)
    assert 0.85 < p_euler < 1.2, p_euler
    assert 1.8 < p_heun < 2.4, p_heun
    assert 1.8 < p_dpm < 2.4, p_dpm
    orders = {name: _order(fn, D, x0, ref) for name, fn in (
        ("ipndm", solvers.sample_ipndm),
        ("ipndm_v", functools.partial(solvers.sample_ipndm, variable_step=True)),
        ("dpmpp_3m", solvers.sample_dpmpp_3m),
        ("unipc", solvers.sample_unipc),
        ("unipc_full", functools.partial(solvers.sample_unipc, lower_order_final=False)))}
    bounds = {"ipndm": (1.6, 2.3), "ipndm_v": (2.8, 4.0), "dpmpp_3m": (2.05, 3.2), "unipc": (2.5, 3.6),
              "unipc_full": (3.4, 4.6)}
    for name, (lo, hi) in bounds.items():
        assert lo < orders[name] < hi, orders


def test_multistep_solvers_gain_on_dpmpp_2m(wide_mixture):
    """At 16 steps, the third-order multistep solvers beat DPM-Solver++(2M) pathwise (measured mean error against a
    1024-step UniPC reference: 2M 2.3e-2; 3M 8.4e-3, UniPC-3 6.8e-3, iPNDM 4.0e-3)."""
    D = AnalyticDenoiser(wide_mixture)
    x0 = torch.randn(256, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = _solve(functools.partial(solvers.sample_unipc, lower_order_final=False), D, x0, 1024)
    err = {fn.__name__: (_solve(fn, D, x0, 16) - ref).norm(dim=1).mean().item()
           for fn in (solvers.sample_dpmpp_2m, solvers.sample_dpmpp_3m, solvers.sample_unipc, solvers.sample_ipndm)}
    assert max(v for k, v in err.items() if k != "sample_dpmpp_2m") < 0.6 * err["sample_dpmpp_2m"], err


@pytest.mark.parametrize("name", SAMPLERS)
def test_counted_nfe_matches_plan_and_budget(name, oracle):
    sampler = load_sampler(name)
    for budget in (3, 4, 5, 9, 10, 17, 33):
        steps = sampler.steps_for_budget(budget)
        if steps is None:
            assert sampler.planned_nfe(sampler.min_steps) > budget
            continue
        out = sampler.sample(oracle, (4, 2), steps, NoiseStream(0))
        assert out.nfe == sampler.planned_nfe(steps) <= budget
        assert sampler.planned_nfe(steps + 1) > budget  # the largest step count that fits


def test_bad_budget_is_refused():
    with pytest.raises(ValueError):
        Euler().steps_for_budget(0)
    with pytest.raises(ValueError):
        Euler().steps_for_budget(-3)


def test_common_random_numbers(oracle):
    """Same seed -> same initial noise for every sampler; DDIM(eta=0) on a Karras schedule is Euler."""
    noise = NoiseStream(7)
    a = Euler().sample(oracle, (16, 2), 10, noise, trajectory=True)
    b = Ancestral(eta=0.0).sample(oracle, (16, 2), 10, NoiseStream(7), trajectory=True)
    torch.testing.assert_close(a.trajectory[0], b.trajectory[0])
    torch.testing.assert_close(a.x, b.x)
    c = Ancestral(eta=1.0).sample(oracle, (16, 2), 10, NoiseStream(7))
    d = Ancestral(eta=1.0).sample(oracle, (16, 2), 10, NoiseStream(7))
    torch.testing.assert_close(c.x, d.x)
    e = Ancestral(eta=1.0).sample(oracle, (16, 2), 10, NoiseStream(8))
    assert not torch.allclose(c.x, e.x)


def test_ancestral_step_is_the_exposed_gaussian(oracle):
    """x_next = mean + sigma_up eps, and the empirical law of x_next matches N(mean, sigma_up^2)."""
    x = torch.full((20000, 2), 1.5)
    eps = torch.randn(20000, 2, generator=torch.Generator().manual_seed(0))
    x_next, den, mean, std = solvers.ancestral_step(oracle, x, 2.0, 1.0, eps, eta=1.0)
    torch.testing.assert_close(x_next, mean + std[:, None] * eps)
    sd, su = solvers.ancestral_sigmas(torch.tensor(2.0), torch.tensor(1.0), 1.0)
    torch.testing.assert_close(std, su.expand(20000).float())
    assert abs(float(sd**2 + su**2) - 1.0) < 1e-6
    assert (x_next.mean(0) - mean[0]).abs().max() < 0.03
    assert abs(x_next.std(0).mean().item() - float(su)) < 0.02


def test_callbacks_see_states_and_gaussian_moves(oracle):
    seen = []
    sampler = load_sampler("edm_sde")
    out = sampler.sample(oracle, (8, 2), 6, NoiseStream(0), callback=seen.append)
    assert [s.step for s in seen] == list(range(6))
    assert all(s.x.shape == (8, 2) and s.sigma.shape == (8,) for s in seen)
    torch.testing.assert_close(seen[-1].x_next, out.x)
    churned = [s for s in seen if float(s.std[0]) > 0]
    assert churned and all(torch.allclose(s.mean, s.x) for s in churned)


def test_restart_jumps_are_counted_and_exposed(oracle):
    seen = []
    sampler = load_sampler("restart")
    out = sampler.sample(oracle, (8, 2), 10, NoiseStream(0), callback=seen.append)
    jumps = [s for s in seen if s.kind == "restart_jump"]
    assert len(jumps) == sampler.K
    assert out.nfe == 2 * 10 - 1 + sampler.K * 2 * sampler.restart_steps


def test_heun_per_sample_sigmas(oracle):
    x = torch.randn(3, 2)
    s = torch.tensor([5.0, 1.0, 0.5])
    s_next = torch.tensor([2.0, 0.0, 0.1])
    batched, _ = solvers.heun_step(oracle, x, s, s_next)
    single = torch.cat([solvers.heun_step(oracle, x[i : i + 1], s[i], s_next[i])[0] for i in range(3)])
    torch.testing.assert_close(batched, single)


def test_memory_does_not_keep_trajectories_unless_asked(oracle):
    out = Heun().sample(oracle, (4, 2), 5, NoiseStream(0))
    assert out.trajectory is None
    out = Heun().sample(oracle, (4, 2), 5, NoiseStream(0), trajectory=True)
    assert len(out.trajectory) == 6


def test_nfe_counter_counts_calls(oracle):
    D = NFECounter(oracle)
    solvers.sample_heun(D, torch.randn(4, 2) * 80, karras_sigmas(5))
    assert D.nfe == 9


def test_ddpm_schedule_starts_at_top_of_table():
    s = DiscreteVPSchedule(spacing="trailing")(10)
    assert 150 < float(s[0]) < 160 and s[-1] == 0
    assert KarrasSchedule()(10)[0] == 80.0


# --- iPNDM, DPM-Solver++(3M), UniPC ---------------------------------------------------------------------------------

def _gaussian_denoiser(c: float = 0.7):
    """Exact denoiser of N(0, c^2 I): ``D(x, s) = x c^2 / (c^2 + s^2)``, so ``d = x s / (c^2 + s^2)``."""
    return lambda x, s: x * (c**2 / (c**2 + s**2))[:, None]


def test_ipndm_is_adams_bashforth_with_a_warm_start():
    """Every step equals docs/method.md section 9's formula on the slopes the sampler saw."""
    D = _gaussian_denoiser()
    sigmas = karras_sigmas(7, 0.05, 10.0)
    seen = []
    x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 10.0
    out = solvers.sample_ipndm(D, x, sigmas, callback=seen.append)
    d = [(s.x - s.denoised) / s.sigma[:, None] for s in seen]
    for i, s in enumerate(seen):
        torch.testing.assert_close(s.denoised, D(s.x, s.sigma))
        h = float(sigmas[i + 1] - sigmas[i])
        if i == 0:
            slope = d[0]
        elif i == 1:
            slope = (3 * d[1] - d[0]) / 2
        elif i == 2:
            slope = (23 * d[2] - 16 * d[1] + 5 * d[0]) / 12
        else:
            slope = (55 * d[i] - 59 * d[i - 1] + 37 * d[i - 2] - 9 * d[i - 3]) / 24
        torch.testing.assert_close(s.x_next, s.x + h * slope, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(seen[-1].x_next, out)
    # max_order caps the order: max_order 1 is Euler
    torch.testing.assert_close(solvers.sample_ipndm(D, x, sigmas, max_order=1), solvers.sample_euler(D, x, sigmas))


def test_variable_step_ipndm_integrates_cubics_exactly():
    """The variable-step weights integrate a cubic slope exactly over any step, and on a uniform grid they are the
    fixed Adams–Bashforth weights."""
    p = lambda s: 0.3 - 1.2 * s + 0.7 * s**2 - 0.25 * s**3  # noqa: E731
    P = lambda s: 0.3 * s - 0.6 * s**2 + 0.7 * s**3 / 3 - 0.25 * s**4 / 4  # noqa: E731
    levels = [3.0, 2.1, 1.7, 1.0, 0.35]  # sigma_{i-3} .. sigma_i, sigma_next: unequal steps
    x = torch.zeros(2, 1, dtype=torch.float64)
    ds = [torch.full_like(x, p(s)) for s in reversed(levels[:4])]
    out = solvers.ipndm_step(x, levels[3], levels[4], ds, old_sigmas=list(reversed(levels[:3])))
    torch.testing.assert_close(out, torch.full_like(x, P(levels[4]) - P(levels[3])), rtol=1e-12, atol=1e-12)
    fixed = solvers.ipndm_step(x, levels[3], levels[4], ds)
    assert abs(float(fixed[0, 0]) - (P(levels[4]) - P(levels[3]))) > 1e-3  # the fixed weights are not exact here
    uniform = [4.0, 3.0, 2.0, 1.0]
    ds = [torch.randn_like(x) for _ in range(4)]
    torch.testing.assert_close(solvers.ipndm_step(x, 1.0, 0.0, ds, old_sigmas=uniform[-2::-1]),
                               solvers.ipndm_step(x, 1.0, 0.0, ds), rtol=1e-12, atol=1e-12)


def test_analytic_first_step_saves_one_nfe(oracle):
    """With afs, the first evaluation is the data mean: identical to iPNDM on a denoiser returning 0 at sigma_max,
    one NFE fewer; the planner counts it."""
    plain, afs = IPNDM(), IPNDM(afs=True)
    assert afs.planned_nfe(10) == 9 == plain.planned_nfe(10) - 1 and afs.steps_for_budget(9) == 10
    assert afs.min_steps == 2 and afs.steps_for_budget(1) == 2  # one step of afs alone would return the mean
    smax = float(plain.sigmas(10)[0])

    def zero_at_top(x, s):
        return torch.where((s == smax)[:, None], torch.zeros_like(x), oracle(x, s))

    a = plain.sample(zero_at_top, (64, 2), 10, NoiseStream(3))
    b = afs.sample(oracle, (64, 2), 10, NoiseStream(3))
    assert (a.nfe, b.nfe) == (10, 9)
    torch.testing.assert_close(a.x, b.x)
    shifted = IPNDM(afs=True, data_mean=0.5).sample(oracle, (64, 2), 10, NoiseStream(3))
    assert not torch.allclose(shifted.x, b.x)


@pytest.mark.parametrize("sampler", [IPNDM(), DPMpp3M(), UniPC(), UniPC(order=2)], ids=repr)
def test_multistep_samplers_are_not_single_step_and_take_per_sample_sigmas(sampler, oracle):
    """Multistep samplers are refused as MDP bases; a batch with per-sample schedules equals the samples run one by
    one (the solvers are batched over sigma [B])."""
    assert not sampler.single_step
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 10
    grids = torch.stack([karras_sigmas(6, 0.01, 10.0), karras_sigmas(6, 0.05, 10.0, 3.0),
                         karras_sigmas(6, 0.002, 10.0)])
    fns = {"ipndm": solvers.sample_ipndm, "dpmpp_3m": solvers.sample_dpmpp_3m, "unipc": solvers.sample_unipc}
    fn = fns[sampler.name]
    kw = {"order": sampler.order} if sampler.name == "unipc" else {}

    def D(x, s):
        return oracle(x.float(), s.float()).double()

    class PerSample:  # the solvers index sigmas[i]: give them the [B] column of step i
        def __init__(self, g):
            self.g = g

        def __len__(self):
            return self.g.shape[1]

        def __getitem__(self, i):
            return self.g[:, i]

    batched = fn(D, x, PerSample(grids), **kw)
    single = torch.cat([fn(D, x[b : b + 1], grids[b], **kw) for b in range(3)])
    torch.testing.assert_close(batched, single)
