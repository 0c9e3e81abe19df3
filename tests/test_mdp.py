"""The sampling MDP (docs/method.md section 3): replayable per-sample noise, exact policy log-densities, the reference
policy reproducing the base sampler, per-sample NFE accounting and the refusal of bad knob / MDP settings."""
from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import (AffineTransform, Beta, Categorical, Normal, SigmoidTransform,
                                 TransformedDistribution)

from diffusion_irl.mdp.actions import Knob
from diffusion_irl.mdp.env import PolicySampler, SamplingMDP
from diffusion_irl.mdp.policies import ConstantKnobPolicy, KnobPolicy, Reference, State, TransitionPolicy
from diffusion_irl.sampling import solvers
from diffusion_irl.sampling.noise import NoiseStream, SampleNoise, Slot, counter_normal
from diffusion_irl.sampling.samplers import Ancestral, DPMpp2M, EDMStochastic, Euler, Heun, Restart

from .helpers import load_sampler

SHAPE = (2,)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: conftest.one_thread


def ddpm() -> Ancestral:
    """The DDPM sampler of conf/sampler/ddpm.yaml (eta 1, discrete VP schedule)."""
    return load_sampler("ddpm")


def perturb(policy: torch.nn.Module, scale: float = 0.5, seed: int = 0) -> None:
    """Move every parameter away from its (reference) initial value, so log-probs are not all at the mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


# --- counter-based per-sample noise --------------------------------------------------------------------------------

def test_counter_normal_is_standard_normal():
    z = counter_normal(torch.arange(4000), key=3, numel=50)
    assert z.shape == (4000, 50) and z.dtype == torch.float32
    assert abs(float(z.mean())) < 0.01          # 200k draws: std of the mean 0.0022
    assert abs(float(z.var()) - 1) < 0.02       # std of the variance ~ 0.003
    assert abs(float((z**3).mean())) < 0.03 and abs(float((z**4).mean()) - 3) < 0.1
    # no correlation between neighbouring columns (the two Box-Muller uniforms come from different counters)
    assert abs(float((z[:, :-1] * z[:, 1:]).mean())) < 0.01


def test_counter_normal_rows_depend_only_on_seed_and_key():
    seeds = torch.tensor([5, 17, 123456789, 0, 2**40 + 3])
    full = counter_normal(seeds, key=9, numel=7)
    # another batch, another order, one at a time: the same rows
    perm = torch.tensor([3, 0, 4, 1])
    assert torch.equal(counter_normal(seeds[perm], key=9, numel=7), full[perm])
    for i, s in enumerate(seeds):
        assert torch.equal(counter_normal(s.reshape(1), key=9, numel=7)[0], full[i])
    # more columns extend the row, they do not change its start
    assert torch.equal(counter_normal(seeds, key=9, numel=11)[:, :7], full)
    # a different key or seed gives different draws
    assert not torch.isclose(counter_normal(seeds, key=10, numel=7), full).any()
    assert not torch.isclose(counter_normal(seeds + 1, key=9, numel=7), full).any()
    # float64 draws are the same numbers, rounded differently
    torch.testing.assert_close(counter_normal(seeds, 9, 7, torch.float64).float(), full)


def test_sample_noise_streams():
    seeds = torch.arange(10, 16)
    noise = SampleNoise(seeds)
    like = torch.empty(6, 1, 2, 2)
    draw = noise.step(3, like, slot=Slot.RENOISE)
    assert draw.shape == like.shape
    assert torch.equal(draw.flatten(1), counter_normal(seeds, SampleNoise.STEP_KEYS * 4 + 2, 4))
    mask = torch.tensor([True, False, True, False, False, True])
    assert torch.equal(noise.subset(mask).step(3, like[mask], slot=Slot.RENOISE), draw[mask])
    assert not torch.equal(noise.step(3, like, slot=Slot.STEP), draw)
    assert not torch.equal(noise.step(4, like, slot=Slot.RENOISE), draw)
    assert torch.equal(noise.initial(like).flatten(1), counter_normal(seeds, 0, 4))
    with pytest.raises(ValueError, match="slot"):
        noise.step(0, like, slot=SampleNoise.STEP_KEYS)


def test_noise_slots_keep_their_values():
    """The slots' integers are part of every stored trajectory's random stream."""
    assert [int(Slot.CHURN), int(Slot.STEP), int(Slot.RENOISE), int(Slot.RENOISE_STEP)] == [0, 1, 2, 3]
    noise, like = SampleNoise(torch.arange(5)), torch.empty(5, 3)
    for slot in Slot:
        assert torch.equal(noise.step(2, like, slot), noise.step(2, like, int(slot)))
        assert torch.equal(noise.step(2, like, slot), counter_normal(torch.arange(5), SampleNoise.STEP_KEYS * 3 + slot, 3))


# --- the base samplers' single steps ---------------------------------------------------------------------------------

@pytest.mark.parametrize("base", [Euler(), Heun(), EDMStochastic(S_churn=20.0), Ancestral(eta=1.0), Ancestral(eta=0.5),
                                  Ancestral(eta=0.0)], ids=repr)
def test_single_step_reproduces_the_samplers_own_loop(base, oracle):
    """``churn`` + ``step`` from the sampler's own states and noise give its ``sample()`` bit for bit, step by step,
    and the per-sample NFE adds up to the counted NFE."""
    steps, shape = 6, (64, 2)
    out = base.sample(oracle, shape, steps, NoiseStream(4), trajectory=True)
    noise, sigmas = NoiseStream(4), base.sigmas(steps)
    gammas = base.churn_schedule(sigmas)
    assert gammas.shape == (steps,) and (bool((gammas > 0).any()) == isinstance(base, EDMStochastic))
    x, nfe = noise.initial(shape) * float(sigmas[0]), torch.zeros(shape[0])
    assert torch.equal(x, out.trajectory[0])
    for i in range(steps):
        sigma = sigmas[i]
        if isinstance(base, EDMStochastic):  # EDM's loop draws the churn noise at every step (gamma may be 0)
            x, sigma, _ = base.churn(x, sigma, gammas[i], noise.step(i, x))
        x, _, step_nfe = base.step(oracle, x, sigma, sigmas[i + 1], lambda like, i=i: noise.step(i, like))
        assert torch.equal(x, out.trajectory[i + 1]), f"step {i}"
        nfe += step_nfe
    assert bool((nfe == out.nfe).all()) and out.nfe == base.planned_nfe(steps)


def test_samplers_say_whether_they_have_a_single_step():
    for sampler in (Euler(), Heun(), EDMStochastic(), Ancestral(eta=0.0)):
        assert sampler.single_step
    assert Ancestral().is_ancestral and not Ancestral().supports_churn and Ancestral().step_draws_noise
    assert not Ancestral(eta=0.0).step_draws_noise and not Heun().is_ancestral and Heun().supports_churn
    for sampler in (DPMpp2M(), Restart()):
        assert not sampler.single_step
        with pytest.raises(ValueError, match="base sampler must be a single-step sampler .*got " + type(sampler).__name__):
            SamplingMDP(sampler, nfe=8)
    with pytest.raises(ValueError, match="pass noise"):
        Ancestral().step(lambda x, s: x, torch.zeros(2, 2), 2.0, 1.0)


def test_setup_policy_sizes_and_returns_every_kind_of_policy():
    mdp = SamplingMDP(Euler(), nfe=6)
    knob = KnobPolicy({"step": Knob("step", -1, 1)})
    const = ConstantKnobPolicy({"step": 0.1})
    assert mdp.setup_policy(knob, SHAPE) is knob and knob.horizon == mdp.steps and knob.kind == "knob"
    assert mdp.setup_policy(const, SHAPE) is const and const.horizon == mdp.steps and const.kind == "knob"
    ancestral = SamplingMDP(ddpm(), nfe=6)
    transition = TransitionPolicy(correction=False)
    assert ancestral.setup_policy(transition, SHAPE) is transition and transition.kind == "transition"
    torch.testing.assert_close(transition.ref_sigmas, ancestral.ref_sigmas.float())
    with pytest.raises(ValueError, match=r"reference values of knobs \['step'\]"):
        KnobPolicy({"step": Knob("step", -1, 1)}).setup(4, SHAPE)
    with pytest.raises(ValueError, match="Reference.sigmas"):
        TransitionPolicy().setup(4, SHAPE, Reference(knobs={}))


def test_each_knob_gets_its_law():
    from diffusion_irl.mdp.laws import BetaLaw, CategoricalLaw, SquashedGaussianLaw
    assert type(Knob("step", -1, 1).law) is SquashedGaussianLaw
    assert type(Knob("step", -1, 1, distribution="beta").law) is BetaLaw
    assert type(Knob("churn", 0, 1, discrete=True, num=3).law) is CategoricalLaw
    assert Knob("churn", 0, 1, discrete=True, num=3).law.num_params == 3 and Knob("step").law.num_params == 2


# --- knob log-probs against torch.distributions --------------------------------------------------------------------

def _state(B: int, k: int, horizon: int, seed: int = 0) -> State:
    g = torch.Generator().manual_seed(seed)
    return State(x=torch.randn(B, *SHAPE, generator=g) * 3, sigma=torch.full((B,), 2.0),
                 k=torch.full((B,), k, dtype=torch.long))


@pytest.mark.parametrize("low, high", [(-3.0, 3.0), (0.0, 1.0), (0.5, 4.0)])
def test_squashed_gaussian_log_prob_matches_torch(low, high):
    knob = Knob("guidance", low, high)
    policy = KnobPolicy({"guidance": knob}).setup(5, SHAPE, Reference(knobs={"guidance": torch.linspace(low, high, 7)[1:6]}))
    perturb(policy)
    torch.manual_seed(1)
    for k in range(5):
        action = policy.act(_state(256, k, 5))
        mu, log_std = policy.tables["guidance"][k].double()
        law = TransformedDistribution(Normal(mu, log_std.clamp(-7, 2).exp()),
                                      [SigmoidTransform(), AffineTransform(low, high - low)])
        value = low + (high - low) * torch.sigmoid(action.raw[:, 0].double())  # the knob value, in float64
        torch.testing.assert_close(action.logp.double(), law.log_prob(value), atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(action.values["guidance"], value.float())
        # from the float32 value the transition used (rounding of the value: looser)
        torch.testing.assert_close(action.logp.double(), law.log_prob(action.values["guidance"].double()),
                                   atol=1e-3, rtol=1e-3)


def test_beta_log_prob_matches_torch():
    low, high = -1.0, 3.0
    knob = Knob("step", low, high, distribution="beta")
    policy = KnobPolicy({"step": knob}).setup(4, SHAPE, Reference(knobs={"step": torch.tensor([0.0, 0.5, -0.5, 2.0])}))
    perturb(policy, scale=0.3)
    torch.manual_seed(2)
    for k in range(4):
        action = policy.act(_state(256, k, 4))
        p = policy.tables["step"][k].double()
        m, conc = torch.sigmoid(p[0]).clamp(1e-4, 1 - 1e-4), p[1].clamp(-3, 9).exp()
        law = TransformedDistribution(Beta(m * conc, (1 - m) * conc), [AffineTransform(low, high - low)])
        value = action.values["step"].double()
        assert bool(((value > low) & (value < high)).all())
        torch.testing.assert_close(action.logp.double(), law.log_prob(value), atol=1e-4, rtol=1e-4)


def test_categorical_log_prob_matches_torch():
    grid = [0.0, 0.1, 0.3, 0.6]
    knob = Knob("churn", 0.0, 1.0, discrete=True, grid=grid, init_std=0.4)
    policy = KnobPolicy({"churn": knob}).setup(3, SHAPE, Reference(knobs={"churn": torch.tensor([0.0, 0.3, 0.6])}))
    # at the start, the reference value holds 1 - init_std of the mass
    probs = policy.tables["churn"].detach().exp()
    torch.testing.assert_close(probs.sum(1), torch.ones(3))
    assert probs[0, 0] == pytest.approx(0.6) and probs[1, 2] == pytest.approx(0.6) and probs[2, 3] == pytest.approx(0.6)
    perturb(policy)
    torch.manual_seed(3)
    for k in range(3):
        action = policy.act(_state(512, k, 3))
        idx = action.raw[:, 0].long()
        law = Categorical(logits=policy.tables["churn"][k])
        torch.testing.assert_close(action.logp, law.log_prob(idx))
        torch.testing.assert_close(action.values["churn"], torch.tensor(grid)[idx])
        assert len(set(idx.tolist())) > 1  # it does sample


# --- re-scoring stored transitions ---------------------------------------------------------------------------------

KNOB_POLICIES = {
    "step": lambda cond: {"step": Knob("step", -3, 3)},
    "churn": lambda cond: {"churn": Knob("churn", 0, 1, discrete=True, grid=[0, 0.1, 0.3, 0.6])},
    "renoise": lambda cond: {"renoise": Knob("renoise", 0, 2, discrete=True, grid=[0, 0.5, 1, 2])},
    "multi": lambda cond: {"step": Knob("step", -2, 2, distribution="beta"),
                           "churn": Knob("churn", 0, 0.5), "renoise": Knob("renoise", 0, 1, discrete=True, num=3)},
}


@pytest.mark.parametrize("conditioning", ["step", "state"])
@pytest.mark.parametrize("kind", list(KNOB_POLICIES))
def test_rescoring_knob_transitions_gives_the_stored_log_probs(kind, conditioning, oracle):
    mdp = SamplingMDP(Heun(), nfe=9)
    state_kw = dict(conditioning="state", x_features=True, hidden=16) if conditioning == "state" else {}
    policy = KnobPolicy(KNOB_POLICIES[kind](conditioning), sigma_data=2.8, **state_kw)
    mdp.setup_policy(policy, SHAPE)
    perturb(policy, scale=0.2)
    torch.manual_seed(0)
    ro = mdp.rollout(oracle, policy, torch.arange(64), SHAPE)
    assert ro.logp.shape == (mdp.steps, 64) and bool(ro.mask.all())
    batch = ro.transitions()
    with torch.no_grad():
        logp, ent = policy.log_prob(batch)
    torch.testing.assert_close(logp, batch["logp"], rtol=0, atol=1e-5)
    assert torch.isfinite(ent).all()
    # the stored raw actions are the knob values the transitions used
    for j, name in enumerate(policy.names):
        torch.testing.assert_close(policy.laws[name].value(batch["raw"][:, j]),
                                   ro.knob_values[name].flatten())


def test_rescoring_transition_policy_transitions(oracle):
    mdp = SamplingMDP(ddpm(), nfe=8)
    policy = TransitionPolicy(hidden=16, sigma_data=2.8)
    mdp.setup_policy(policy, SHAPE)
    perturb(policy, scale=0.1)
    ro = mdp.rollout(oracle, policy, torch.arange(32), SHAPE)
    assert bool(ro.mask[:-1].all()) and not bool(ro.mask[-1].any())  # the last step (to sigma 0) is deterministic
    batch = ro.transitions()
    with torch.no_grad():
        logp, ent = policy.log_prob(batch)
    torch.testing.assert_close(logp, batch["logp"], rtol=0, atol=1e-4)
    assert bool((logp[~batch["mask"]] == 0).all()) and bool((ent[~batch["mask"]] == 0).all())


# --- the reference policy is the base sampler ----------------------------------------------------------------------

REFERENCE_KNOBS = {
    "step": {"step": Knob("step", -3, 3)},
    "beta_step": {"step": Knob("step", -2, 1, distribution="beta", reference=0.0)},
    # churn and renoise have their reference (0) on the boundary of their range: discrete grids hold it exactly
    "multi": {"step": Knob("step", -2, 2, distribution="beta"), "churn": Knob("churn", 0, 1, discrete=True, num=5),
              "renoise": Knob("renoise", 0, 1, discrete=True, num=3)},
}


@pytest.mark.parametrize("base, nfe", [(Euler(), 8), (Heun(), 9), (Euler(), 3)])
@pytest.mark.parametrize("knobs", list(REFERENCE_KNOBS))
def test_reference_policy_reproduces_the_base_sampler(base, nfe, knobs, oracle):
    mdp = SamplingMDP(base, nfe=nfe)
    policy = KnobPolicy(REFERENCE_KNOBS[knobs], conditioning="state", x_features=True, hidden=16)
    mdp.setup_policy(policy, SHAPE)
    sampler = PolicySampler(mdp, policy)
    assert sampler.deterministic and sampler.steps_for_budget(nfe) == mdp.steps == base.steps_for_budget(nfe)
    got = sampler.sample(oracle, (300, 2), mdp.steps, NoiseStream(7))
    want = base.sample(oracle, (300, 2), mdp.steps, NoiseStream(7))
    assert torch.equal(got.x, want.x)
    assert got.nfe == want.nfe == base.planned_nfe(mdp.steps) == mdp.planned_nfe()
    # the per-step schedule of the fresh policy is each knob's reference
    for name, sched in policy.schedule().items():
        torch.testing.assert_close(sched, torch.zeros(mdp.steps), atol=1e-6, rtol=0)


@pytest.mark.xfail(strict=True, reason="known limitation: a continuous knob's initial mode is clamped 1e-3 of the range "
                   "inside its bounds, so a continuous churn / renoise knob (reference 0 = low) starts at 1e-3 * width "
                   "(churn 5e-4 injects noise of std 0.03 sigma at every step), not at the base sampler")
@pytest.mark.parametrize("name", ["churn", "renoise"])
def test_continuous_boundary_knob_starts_at_the_base_sampler(name, oracle):
    mdp = SamplingMDP(Euler(), nfe=8)
    policy = KnobPolicy({name: Knob(name, 0.0, 0.5)})
    mdp.setup_policy(policy, SHAPE)
    got = PolicySampler(mdp, policy).sample(oracle, (100, 2), mdp.steps, NoiseStream(3))
    assert torch.equal(got.x, Euler().sample(oracle, (100, 2), mdp.steps, NoiseStream(3)).x)


def test_reference_churn_reproduces_edm_stochastic(oracle):
    """On EDM's stochastic Heun base, the churn knob's reference is the base's own S_churn rule: with the same
    (per-sample) noise, a constant policy of the reference values is the base's step."""
    base = EDMStochastic(S_churn=20.0, S_tmin=0.05, S_tmax=50.0)
    mdp = SamplingMDP(base, nfe=9)
    ref = mdp.references({"churn": Knob("churn", 0, 1)})["churn"]
    assert bool((ref > 0).any()) and bool((ref == 0).any())
    x = torch.randn(50, 2) * 3
    sigma = torch.full((50,), float(mdp.ref_sigmas[1]))
    state = State(x, sigma, torch.full((50,), 1, dtype=torch.long))
    noise = SampleNoise(torch.arange(50))
    action = ConstantKnobPolicy({"churn": float(ref[1])}).setup(mdp.steps).act(state)
    got, _, nfe = mdp.knob_step(oracle, state, action, noise)
    x_hat, s_hat, _ = solvers.churn(x, sigma, ref[1].float(), noise.step(1, x, Slot.CHURN), base.S_noise)
    want, _ = solvers.heun_step(oracle, x_hat, s_hat, float(mdp.ref_sigmas[2]))
    torch.testing.assert_close(got, want)
    assert bool((nfe == 2).all())


def test_transition_policy_at_init_is_the_ddpm_step(oracle):
    base = ddpm()
    mdp = SamplingMDP(base, nfe=10)
    policy = TransitionPolicy(sigma_data=2.8)
    mdp.setup_policy(policy, SHAPE)
    torch.testing.assert_close(policy.ref_sigmas, base.sigmas(10).float())
    g = torch.Generator().manual_seed(0)
    for k in range(mdp.steps):
        sigma = float(mdp.ref_sigmas[k])
        x = torch.randn(64, 2, generator=g) * math.sqrt(sigma**2 + 2.8**2)
        sig = torch.full((64,), sigma)
        den = oracle(x, sig)
        mean, std, s_next = policy.gaussian(x, sig, torch.full((64,), k), den)
        eps = torch.randn(64, 2, generator=g)
        x_next, _, want_mean, want_std = solvers.ancestral_step(oracle, x, sig, float(mdp.ref_sigmas[k + 1]), eps, 1.0)
        torch.testing.assert_close(s_next, torch.full((64,), float(mdp.ref_sigmas[k + 1])), rtol=2e-4, atol=0)
        torch.testing.assert_close(std, want_std, rtol=2e-4, atol=1e-6)
        torch.testing.assert_close(mean, want_mean, rtol=1e-4, atol=1e-4)
        if k < mdp.steps - 1:
            assert bool((std > 0).all())
            want_lp = Normal(mean.double(), std.double().unsqueeze(1)).log_prob(x_next.double()).sum(-1)
            torch.testing.assert_close(policy.gaussian_log_prob(x_next, mean, std).double(), want_lp, rtol=1e-5, atol=1e-4)
        else:  # to sigma 0: deterministic, mean = D(x), no log-prob
            assert bool((std == 0).all()) and bool((policy.gaussian_log_prob(x_next, mean, std) == 0).all())
            torch.testing.assert_close(mean, den, rtol=1e-5, atol=1e-4)


def test_transition_policy_at_init_samples_like_ddpm(oracle):
    """The fresh transition policy's rollout has the DDPM sampler's law; its deterministic mode is DDIM-like."""
    mdp = SamplingMDP(ddpm(), nfe=10)
    policy = TransitionPolicy(sigma_data=2.8)
    mdp.setup_policy(policy, SHAPE)
    ro = mdp.rollout(oracle, policy, torch.arange(2000), SHAPE)
    assert bool((ro.nfe == 1).all()) and ro.final.shape == (2000, 2)
    radius = ro.final.norm(dim=1)
    assert 3.0 < float(radius.median()) < 5.0  # gmm8: a circle of radius 4
    assert PolicySampler(mdp, policy).deterministic is False  # eval_mode: sample (the learned law)


# --- renoise: per-sample NFE and replayable trajectories -----------------------------------------------------------

def _renoise_policy(mdp: SamplingMDP, seed: int = 0) -> KnobPolicy:
    """A deterministic, state-dependent renoise policy: some samples jump, some do not, at each step."""
    policy = KnobPolicy({"renoise": Knob("renoise", 0, 1, discrete=True, grid=[0, 0.5, 1])}, conditioning="state",
                        x_features=True, hidden=16, sigma_data=2.8)
    mdp.setup_policy(policy, SHAPE)
    with torch.no_grad():
        policy.net[-1].weight.normal_(0, 3.0, generator=torch.Generator().manual_seed(seed))
    return policy


def test_renoise_counts_nfe_per_sample(oracle):
    mdp = SamplingMDP(Euler(), nfe=6)
    policy = _renoise_policy(mdp)
    seeds = torch.arange(200)
    ro = mdp.rollout(oracle, policy, seeds, SHAPE, deterministic=True)
    r = ro.knob_values["renoise"]
    jumps = r[:-1] > 0
    assert 0.05 < float(jumps.float().mean()) < 0.95, "the test policy should renoise some samples, not all"
    # Euler: one evaluation per step, one more per renoised step; the last step (to sigma 0) never renoises
    torch.testing.assert_close(ro.nfe[:-1], 1 + jumps.float())
    assert bool((ro.nfe[-1] == 1).all())
    # the evaluator's NFE is the mean per-sample count, rounded up
    out = PolicySampler(mdp, policy).sample(oracle, (200, 2), mdp.steps, NoiseStream(0))
    assert out.nfe == math.ceil(float(ro.nfe.sum(0).mean()) - 1e-9) and out.nfe > mdp.planned_nfe()
    # renoising moves a sample: a constant zero renoise gives another final state for the jumpers only
    plain = mdp.rollout(oracle, ConstantKnobPolicy({"renoise": 0.0}).setup(mdp.steps), seeds, SHAPE)
    jumped = jumps.any(0)
    assert bool((ro.final[~jumped] == plain.final[~jumped]).all())
    assert not bool((ro.final[jumped] == plain.final[jumped]).all(1).any())


@pytest.mark.parametrize("base", [Euler(), Heun()])
def test_renoise_trajectories_are_replayable(base, oracle):
    mdp = SamplingMDP(base, nfe=7)
    policy = _renoise_policy(mdp, seed=1)
    seeds = torch.arange(1000, 1100)
    full = mdp.rollout(oracle, policy, seeds, SHAPE, deterministic=True)
    assert bool((full.nfe > 1).any())
    sub = torch.tensor([97, 3, 50, 51, 0, 12])
    part = mdp.rollout(oracle, policy, seeds[sub], SHAPE, deterministic=True)
    torch.testing.assert_close(part.x_next, full.x_next[:, sub], rtol=0, atol=1e-6)
    torch.testing.assert_close(part.nfe, full.nfe[:, sub], rtol=0, atol=0)
    # stochastic actions: the same seeds and the same generator state replay the whole batch exactly
    perturb(policy, 0.3)
    torch.manual_seed(5)
    a = mdp.rollout(oracle, policy, seeds, SHAPE)
    torch.manual_seed(5)
    b = mdp.rollout(oracle, policy, seeds, SHAPE)
    assert torch.equal(a.x_next, b.x_next) and torch.equal(a.logp, b.logp) and torch.equal(a.nfe, b.nfe)


# --- classifier-free guidance: the budget counts both denoiser calls ----------------------------------------------

class CountingConditional(torch.nn.Module):
    """A class-conditional denoiser (labels ignored: the exact gmm8 one) that counts its batched calls."""

    def __init__(self, oracle):
        super().__init__()
        self.oracle, self.calls, self.rows = oracle, 0, 0

    def forward(self, x, sigma, class_labels=None):
        self.calls += 1
        self.rows += x.shape[0]
        return self.oracle(x, sigma)


def test_cfg_budget_counts_both_evaluations(oracle):
    mdp = SamplingMDP(Euler(), nfe=16, guidance="cfg", num_classes=10)
    assert mdp.steps == 8 and mdp.planned_nfe() == 16
    assert SamplingMDP(Heun(), nfe=10, guidance="cfg", num_classes=10).planned_nfe() <= 10
    with pytest.raises(ValueError, match="too small"):
        SamplingMDP(Euler(), nfe=1, guidance="cfg", num_classes=10)
    policy = KnobPolicy({"guidance": Knob("guidance", 0, 4)})
    mdp.setup_policy(policy, SHAPE)
    torch.testing.assert_close(policy.schedule()["guidance"], torch.ones(8), atol=1e-5, rtol=0)  # w = 1: conditional
    D = CountingConditional(oracle)
    out = PolicySampler(mdp, policy).sample(D, (40, 2), mdp.steps, NoiseStream(0))
    assert out.nfe == 16 and D.calls == 8 and D.rows == 8 * 80  # one call on 2B rows per step
    labels = mdp.labels_for(torch.arange(40))
    assert labels.tolist() == [i % 10 for i in range(40)]


# --- bad settings ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(name="step", low=1.0, high=1.0), "range is empty"),
    (dict(name="step", low=3.0, high=-3.0), r"range is empty \(low=3.0 >= high=-3.0\)"),
    (dict(name="temperature"), "unknown knob 'temperature'"),
    (dict(name="churn", low=-0.5, high=1.0), "churn: values must be >= 0"),
    (dict(name="renoise", low=-1.0, high=1.0), "renoise: values must be >= 0"),
    (dict(name="step", distribution="laplace"), "distribution must be one of"),
    (dict(name="step", init_std=0.0), "init_std must be > 0"),
    (dict(name="step", grid=[0.0]), "at least 2 values"),
    (dict(name="step", low=-1, high=1, discrete=True, grid=[0.5, 1.0]), "must contain the reference 0"),
])
def test_bad_knobs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Knob(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(nfe=0), "mdp.nfe must be a positive integer, got 0"),
    (dict(nfe=-4), "mdp.nfe must be a positive integer, got -4"),
    (dict(nfe=2.5), "positive integer"),
    (dict(), "exactly one of nfe"),
    (dict(nfe=4, steps=4), "exactly one of nfe"),
    (dict(nfe=8, guidance="cfg"), "guidance=cfg needs a class-conditional denoiser"),
    (dict(nfe=8, guidance="auto"), "mdp.guidance must be null, 'cfg' or 'dg'"),
])
def test_bad_mdps_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingMDP(Euler(), **kwargs)


def test_bad_policy_mdp_pairs_are_refused():
    with pytest.raises(ValueError, match="churn knob needs an ODE / EDM base sampler"):
        SamplingMDP(ddpm(), nfe=8).setup_policy(KnobPolicy({"churn": Knob("churn", 0, 1)}), SHAPE)
    with pytest.raises(ValueError, match="transition policy needs an ancestral base sampler"):
        SamplingMDP(Euler(), nfe=8).setup_policy(TransitionPolicy(), SHAPE)
    with pytest.raises(ValueError, match="guidance knob needs mdp.guidance"):
        SamplingMDP(Euler(), nfe=8).setup_policy(KnobPolicy({"guidance": Knob("guidance", 0, 4)}), SHAPE)
    with pytest.raises(ValueError, match="key and the name must agree"):
        KnobPolicy({"step": Knob("churn")})
    with pytest.raises(ValueError, match="policy.knobs is empty"):
        KnobPolicy({})
    with pytest.raises(ValueError, match="x_features needs policy.conditioning=state"):
        KnobPolicy({"step": Knob("step", -1, 1)}, x_features=True)
    with pytest.raises(RuntimeError, match="setup"):
        KnobPolicy({"step": Knob("step", -1, 1)}).act(_state(2, 0, 1))
