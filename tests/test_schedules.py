import math

import pytest
import torch

from diffusion_irl.sampling.schedules import (DiscreteVPSchedule, KarrasSchedule, LogSNRUniformSchedule,
                                              TimeUniformSchedule, ddpm_alphas_cumprod, ddpm_timesteps, karras_sigmas,
                                              logsnr_uniform_sigmas, time_uniform_sigmas, vp_sigma, vp_sigmas, vp_t)


def test_karras_endpoints_and_monotone():
    s = karras_sigmas(10, 0.002, 80.0, 7.0)
    assert len(s) == 11 and s[-1] == 0
    torch.testing.assert_close(s[0], torch.tensor(80.0, dtype=torch.float64))
    torch.testing.assert_close(s[-2], torch.tensor(0.002, dtype=torch.float64))
    assert (s[:-1].diff() < 0).all()


def test_vp_schedule_monotone():
    s = vp_sigmas(18)
    assert s[-1] == 0 and (s[:-1].diff() < 0).all()


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_discrete_timesteps_match_diffusers(spacing):
    from diffusers import DDIMScheduler

    for n in (1, 4, 10, 50):
        sched = DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing)
        sched.set_timesteps(n)
        torch.testing.assert_close(ddpm_timesteps(n, 1000, spacing), sched.timesteps.long())
        torch.testing.assert_close(ddpm_alphas_cumprod().double(), sched.alphas_cumprod.double())


def test_bad_schedules_fail_early():
    with pytest.raises(ValueError):
        KarrasSchedule(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError):
        DiscreteVPSchedule(spacing="sideways")
    with pytest.raises(ValueError):
        karras_sigmas(0)


def test_a_schedule_is_data(tmp_path):
    from diffusion_irl.sampling.schedules import SigmaSchedule, read_sigmas, write_sigmas

    inline = SigmaSchedule([10.0, 2.0, 0.5, 0.05])
    assert inline.steps == 4 and inline(4).tolist() == [10.0, 2.0, 0.5, 0.05, 0.0]
    with pytest.raises(ValueError, match="holds a 4-step schedule, but the sampler asked for 3 steps"):
        inline(3)
    write_sigmas(inline(4), tmp_path / "s.json", {"tuner": "test"})
    assert SigmaSchedule(path=str(tmp_path / "s.json"))(4).tolist() == inline(4).tolist()
    (tmp_path / "s.txt").write_text("# tuned\n10\n2\n0.5\n0.05\n0\n")
    assert read_sigmas(str(tmp_path / "s.txt")) == [10.0, 2.0, 0.5, 0.05, 0.0]
    for bad, message in (([1.0, 2.0, 0.0], "strictly decreasing"), ([2.0, -1.0, 0.0], "must be finite and > 0"),
                         ([2.0, 0.0, 0.0], "must be finite and > 0"), ([], "at least one")):
        with pytest.raises(ValueError, match=message):
            SigmaSchedule(bad)
    with pytest.raises(ValueError, match="no such file"):
        SigmaSchedule(path=str(tmp_path / "missing.txt"))


def test_logsnr_uniform_is_uniform_in_log_sigma():
    s = LogSNRUniformSchedule(0.002, 80.0)(10)
    assert len(s) == 11 and s[-1] == 0 and float(s[0]) == 80.0 and float(s[-2]) == 0.002
    steps = s[:-1].log().diff()
    torch.testing.assert_close(steps, torch.full_like(steps, (math.log(0.002) - math.log(80.0)) / 9))
    assert logsnr_uniform_sigmas(1).tolist() == [80.0, 0.0]


def test_time_uniform_is_edm_vp_discretisation():
    """Uniform in VP time between t(sigma_max) and t(sigma_min); with the end points of EDM's VP (t = 1 and eps_s)
    it is vp_sigmas."""
    t = torch.tensor([1e-3, 0.2, 1.0], dtype=torch.float64)
    torch.testing.assert_close(vp_t(vp_sigma(t)), t)
    s = TimeUniformSchedule(0.002, 80.0)(8)
    assert len(s) == 9 and s[-1] == 0 and float(s[0]) == 80.0 and float(s[-2]) == 0.002
    assert (s[:-1].diff() < 0).all()
    dt = vp_t(s[:-1]).diff()
    torch.testing.assert_close(dt, torch.full_like(dt, float(dt.mean())))
    smin, smax = (float(vp_sigma(torch.tensor(t, dtype=torch.float64))) for t in (1e-3, 1.0))
    torch.testing.assert_close(time_uniform_sigmas(18, smin, smax), vp_sigmas(18))


def test_bad_new_schedules_fail_early():
    for bad in (dict(sigma_min=1.0, sigma_max=0.5), dict(sigma_min=0.0)):
        with pytest.raises(ValueError):
            LogSNRUniformSchedule(**bad)
        with pytest.raises(ValueError):
            TimeUniformSchedule(**bad)
    with pytest.raises(ValueError):
        TimeUniformSchedule(beta_d=0.0)
