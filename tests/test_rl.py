"""Rewards against finite differences of f; the PPO loss's defining properties."""
import math

import pytest
import torch

from diffusion_irl.rl.ppo import PPO, explained_variance, gae, per_step_advantages, ppo_loss
from diffusion_irl.rl.rewards import (Reward, f_divergence_generator, returns_to_go, reward_from_logit,
                                      step_weights)

LOGITS = torch.linspace(-3, 3, 25, dtype=torch.float64)


@pytest.mark.parametrize("name", ["kl", "reverse_kl", "js", "chi2"])
def test_reward_is_minus_f_prime_of_the_ratio(name):
    u = (-LOGITS).exp()
    h = 1e-6
    f_prime = (f_divergence_generator(name, u + h) - f_divergence_generator(name, u - h)) / (2 * h)
    torch.testing.assert_close(reward_from_logit(name, LOGITS), -f_prime, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("lam", [0.5, 1.0, 2.0])
def test_pr_reward_is_minus_f_prime_away_from_the_kink(lam):
    logits = LOGITS[(LOGITS - math.log(lam)).abs() > 0.05]
    u = (-logits).exp()
    h = 1e-7
    f_prime = (f_divergence_generator("pr", u + h, lam) - f_divergence_generator("pr", u - h, lam)) / (2 * h)
    torch.testing.assert_close(reward_from_logit("pr", logits, lam), -f_prime, atol=1e-6, rtol=0)
    smooth = reward_from_logit("pr", logits, lam, temperature=1e-3)
    torch.testing.assert_close(smooth, -f_prime, atol=1e-6, rtol=0)


def test_reward_config_clips_and_validates():
    r = Reward("reverse_kl", logit_clip=2.0)
    assert float(r(torch.tensor(10.0))) == pytest.approx(math.exp(2.0))
    for bad in [dict(divergence="tv"), dict(logit_clip=-1.0), dict(divergence="pr", lam=0.0)]:
        with pytest.raises(ValueError):
            Reward(**bad)


def test_returns_to_go_and_weights():
    r = torch.tensor([[1.0, 2.0, 3.0]])
    torch.testing.assert_close(returns_to_go(r, step_weights("dense", 3)), torch.tensor([[6.0, 5.0, 3.0]]))
    torch.testing.assert_close(returns_to_go(r, step_weights("terminal", 3)), torch.tensor([[3.0, 3.0, 3.0]]))
    torch.testing.assert_close(step_weights("ramp", 4), torch.tensor([0.25, 0.5, 0.75, 1.0]))
    with pytest.raises(ValueError):
        step_weights("sideways", 3)


def test_ratio_one_gives_no_clipping_and_zero_kl():
    logp = torch.randn(64)
    adv = torch.randn(64)
    loss, d = ppo_loss(logp, logp.clone(), adv)
    assert float(d["ppo/clipfrac"]) == 0 and float(d["ppo/approx_kl"]) == 0
    torch.testing.assert_close(loss, -adv.mean())


def test_gradient_is_zero_outside_the_clip_range():
    """A > 0 and rho > 1 + eps (or A < 0 and rho < 1 - eps): the clipped term is active, no gradient."""
    logp_old = torch.zeros(4)
    logp_new = torch.log(torch.tensor([1.5, 0.5, 1.5, 1.1])).requires_grad_()
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    loss, d = ppo_loss(logp_new, logp_old, adv, clip_eps=0.2)
    (grad,) = torch.autograd.grad(loss, logp_new)
    assert grad[0] == 0 and grad[1] == 0  # clipped
    # unclipped: d/dlogp of -rho A / n = -rho A / n
    torch.testing.assert_close(grad[2], torch.tensor(1.5 / 4))
    torch.testing.assert_close(grad[3], torch.tensor(-1.1 / 4))
    assert float(d["ppo/clipfrac"]) == pytest.approx(0.75)


def test_kl_to_reference_and_entropy_terms():
    logp = torch.randn(32)
    adv = torch.zeros(32)
    loss, d = ppo_loss(logp, logp, adv, logp_ref=logp, kl_coef=1.0, entropy=torch.full((32,), 0.7), ent_coef=0.1)
    assert float(d["ppo/kl_ref"]) == 0
    torch.testing.assert_close(loss, torch.tensor(-0.07))
    _, d = ppo_loss(logp, logp, adv, logp_ref=logp + 0.3 * torch.randn(32), kl_coef=1.0)
    assert float(d["ppo/kl_ref"]) > 0


def test_per_step_advantages_are_normalised_per_step():
    g = torch.randn(256, 5) * torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]) + 10
    adv = per_step_advantages(g)
    torch.testing.assert_close(adv.mean(0), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(adv.std(0), torch.ones(5), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["kl", "reverse_kl", "js", "chi2"])
def test_reward_gives_the_f_divergence_policy_gradient(name):
    """d/dtheta D_f(p_theta || q) = -E_p[r(x) d/dtheta log p_theta(x)] with r from the exact logit log q - log p
    (f-PG): checked by quadrature on a 1D grid, p_theta = N(theta, 1), q a two-component mixture."""
    from diffusion_irl.data.toy2d import GaussianMixture

    q = GaussianMixture([[-1.0], [2.0]], [0.5, 1.0], [0.5, 0.5])
    x = torch.linspace(-9, 11, 40001, dtype=torch.float64)[:, None]
    dx = float(x[1, 0] - x[0, 0])
    log_q = q.log_prob(x)

    def log_p(theta):
        return -0.5 * (x[:, 0] - theta) ** 2 - 0.5 * math.log(2 * math.pi)

    def divergence(theta):
        return float((log_q.exp() * f_divergence_generator(name, (log_p(theta) - log_q).exp())).sum() * dx)

    theta, h = 0.3, 1e-4
    numeric = (divergence(theta + h) - divergence(theta - h)) / (2 * h)
    r = reward_from_logit(name, log_q - log_p(theta))
    estimate = -float((log_p(theta).exp() * r * (x[:, 0] - theta)).sum() * dx)
    assert estimate == pytest.approx(numeric, rel=1e-4, abs=1e-6)


def test_gae_limits_and_value_targets():
    """lambda = 1: advantages are returns-to-go minus V; lambda = 0: one-step TD errors; targets = A + V."""
    torch.manual_seed(0)
    r, v = torch.randn(7, 5), torch.randn(7, 5)
    adv1, target1 = gae(r, v, lam=1.0)
    torch.testing.assert_close(adv1, returns_to_go(r, torch.ones(5)) - v)
    torch.testing.assert_close(target1, returns_to_go(r, torch.ones(5)))
    adv0, _ = gae(r, v, lam=0.0)
    v_next = torch.cat([v[:, 1:], torch.zeros(7, 1)], 1)
    torch.testing.assert_close(adv0, r + v_next - v)
    with pytest.raises(ValueError, match="lambda"):
        gae(r, v, lam=1.5)


def test_explained_variance_and_ppo_config():
    y = torch.randn(100)
    assert float(explained_variance(y, y)) == pytest.approx(1.0)
    assert float(explained_variance(torch.zeros(100), y)) == pytest.approx(0.0, abs=0.05)
    for bad in ({"baseline": "median"}, {"clip_eps": 0}, {"epochs": 0}, {"lr": -1.0}, {"gae_lambda": 2.0}):
        with pytest.raises(ValueError):
            PPO(**bad)


def test_reward_weighting_and_nfe_cost_validation():
    assert Reward(weighting="terminal").weights(4).tolist() == [0, 0, 0, 1]
    with pytest.raises(ValueError, match="weighting"):
        Reward(weighting="sometimes")
    with pytest.raises(ValueError, match="nfe_cost"):
        Reward(nfe_cost=-1.0)


class _Bernoulli(torch.nn.Module):
    """A one-parameter policy over a binary action: enough to see the PPO update move it the right way."""

    def __init__(self):
        super().__init__()
        self.logit = torch.nn.Parameter(torch.zeros(()))

    def log_prob(self, batch):
        dist = torch.distributions.Bernoulli(logits=self.logit.expand(len(batch["raw"])))
        return dist.log_prob(batch["raw"]), dist.entropy()


def test_ppo_update_is_a_pure_function_that_follows_the_advantage():
    from diffusion_irl.rl.ppo import ppo_update

    policy = _Bernoulli()
    raw = torch.tensor([1.0, 0.0] * 32)
    transitions = {"raw": raw, "logp": torch.full_like(raw, math.log(0.5)), "adv": raw * 2 - 1,  # action 1 is better
                   "mask": torch.ones_like(raw, dtype=torch.bool)}
    algo = PPO(lr=0.05, epochs=3, minibatches=4)
    opt = torch.optim.Adam(policy.parameters(), lr=algo.lr)
    diag = ppo_update(policy, transitions, algo, opt, torch.Generator().manual_seed(0))
    assert float(policy.logit) > 0.1  # the probability of the better action went up
    assert {"ppo/approx_kl", "ppo/clipfrac", "ppo/entropy", "ppo/grad_norm"} <= set(diag)
    assert diag["ppo/approx_kl"] >= 0
    masked = dict(transitions, mask=torch.zeros_like(raw, dtype=torch.bool))
    before = float(policy.logit)
    assert ppo_update(policy, masked, algo, opt, torch.Generator().manual_seed(0)) == {}
    assert float(policy.logit) == before  # no transition carries a log-prob: nothing to update
