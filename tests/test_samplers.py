"""Samplers against the exact Gaussian-mixture oracle: convergence in law, order of convergence, NFE accounting,
common random numbers and the Gaussian moves that the MDP needs."""
import math

import numpy as np
import pytest
import torch

from diffusion_irl.denoisers.analytic import AnalyticDenoiser
from diffusion_irl.metrics.samples import mmd
from diffusion_irl.sampling import solvers
from diffusion_irl.sampling.noise import NoiseStream
from diffusion_irl.sampling.samplers import Ancestral, Euler, Heun, NFECounter
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


@pytest.mark.parametrize("name", ["heun", "dpmpp_2m"])
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
    """Measured (float64): Euler 1.02, Heun 2.10, DPM-Solver++(2M) 2.09 on this mixture."""
    D = AnalyticDenoiser(wide_mixture)
    x0 = torch.randn(256, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = _solve(solvers.sample_heun, D, x0, 4096)  # the slow part: one 4096-step Heun solve shared by the three fits
    p_euler = _order(solvers.sample_euler, D, x0, ref)
    p_heun = _order(solvers.sample_heun, D, x0, ref)
    p_dpm = _order(solvers.sample_dpmpp_2m, D, x0, ref)
    assert 0.85 < p_euler < 1.2, p_euler
    assert 1.8 < p_heun < 2.4, p_heun
    assert 1.8 < p_dpm < 2.4, p_dpm


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
