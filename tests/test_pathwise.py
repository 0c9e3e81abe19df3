"""The pathwise f-divergence schedule tuner: the gradient identity it rests on (checked on Gaussians with the exact
density ratio), its schedule parametrisations, its cost count and its improvement on gmm8."""
from __future__ import annotations

import json
import math

import pytest
import torch

from diffusion_irl.data.datamodules import ToyDataModule
from diffusion_irl.data.toy2d import gmm8
from diffusion_irl.denoisers.analytic import AnalyticDenoiser
from diffusion_irl.rl.rewards import Reward
from diffusion_irl.sampling.noise import NoiseStream
from diffusion_irl.sampling.samplers import Ancestral, DPMpp3M, Euler, Heun
from diffusion_irl.sampling.schedules import LogSNRUniformSchedule, SigmaSchedule, karras_sigmas
from diffusion_irl.tuning.grid import selection_scorer
from diffusion_irl.tuning.pathwise import FreeLevels, KarrasLevels, PathwiseTuner, generator_loss
from diffusion_irl.tuning.tuners import with_schedule

pytestmark = pytest.mark.usefixtures("one_thread")


def _normal_logpdf(x, std):
    return -0.5 * (x / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)


def _kl(a):
    """KL(N(0, a^2) || N(0, 1))."""
    return (a**2 - 1) / 2 - torch.log(a)


def _chi2(a):
    """chi^2(N(0, a^2) || N(0, 1)) = E_p[(q/p)^2] - 1 (a^2 < 2)."""
    return 1 / (a * torch.sqrt(2 - a**2)) - 1


@pytest.mark.parametrize("divergence, exact", [("kl", _kl), ("chi2", _chi2)])
@pytest.mark.parametrize("a", [0.8, 1.25])
def test_pathwise_gradient_of_the_reward_is_minus_the_divergence_gradient(divergence, exact, a):
    """Samples x = a eps of q_a = N(0, a^2); data p = N(0, 1); the exact logit log p - log q_a, frozen at a. Then
    d/da E[r(logit(x_a))] = -d/da D_f(q_a || p), which is what the tuner's gradient step follows."""
    a = torch.tensor(a, dtype=torch.float64, requires_grad=True)
    a_frozen = a.detach()
    one = torch.tensor(1.0, dtype=torch.float64)
    disc = lambda x, sigma: (_normal_logpdf(x, one) - _normal_logpdf(x, a_frozen)).squeeze(-1)  # noqa: E731
    eps = torch.randn(400_000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    loss = generator_loss(disc, a * eps, torch.zeros(len(eps)), Reward(divergence, logit_clip=None))
    (pathwise,) = torch.autograd.grad(-loss, a)
    a_exact = a.detach().clone().requires_grad_(True)
    (true,) = torch.autograd.grad(exact(a_exact), a_exact)
    assert float(pathwise) == pytest.approx(-float(true), rel=0.03, abs=2e-3)


def test_free_levels_start_at_their_schedule_and_stay_decreasing():
    init = karras_sigmas(7, 0.002, 80.0, 7.0)
    levels = FreeLevels(init, 0.5, 80.0)
    assert torch.allclose(levels().detach(), init, rtol=1e-6)
    with torch.no_grad():
        levels.gaps.add_(torch.randn(levels.gaps.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3)
        levels.log_first.fill_(10.0)
    levels.project()
    sigmas = levels().detach()
    assert float(sigmas[0]) == pytest.approx(80.0) and sigmas[-1] == 0 and bool((sigmas.diff() < 0).all())


def test_karras_levels_are_the_grids_family():
    levels = KarrasLevels(6, 0.05, 20.0, 3.0, 0.5, 80.0)
    assert torch.allclose(levels().detach(), karras_sigmas(6, 0.05, 20.0, 3.0), rtol=1e-9)
    sigmas = levels()
    sigmas[2].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in levels.parameters())


@pytest.fixture(scope="module")
def datamodule():
    dm = ToyDataModule(gmm8(), n_train=4000, n_heldout=4000)
    dm.setup()
    return dm


def _train_score(dm, sampler, steps, D):
    _, score = selection_scorer(dm, 2000)
    x = sampler.sample(D, (2000, 2), steps, NoiseStream(seed=7)).x
    return score(x, 7)


def test_pathwise_tuner_improves_euler_and_counts_its_cost(datamodule):
    D = AnalyticDenoiser(datamodule.law)
    tuner = PathwiseTuner(iterations=40, batch=64, disc_warmup=20, starts=[80.0, 10.0], explore=15,
                          select_samples=200, select_train=500, lr=0.05)
    result = tuner.tune(Euler(), D, datamodule, 6, seed=0)
    steps = 6
    assert result.steps == steps and len(result.sigmas) == steps + 1 and result.sigmas[-1] == 0
    # two starts: one warm-up batch each, 15 explore steps each, 25 more for the chosen one; 200 samples per score:
    # two per start (before and after exploring), one for the checkpoint at the end (select_every 30 > 25)
    assert result.cost_nfe == (2 * (1 + 15) + 25) * 64 * 6 + (2 + 2 + 1) * 200 * 6
    checkpoints = result.details["checkpoints"]
    assert [c["iteration"] for c in checkpoints] == [0, 0, 15, 40]  # the starts are candidates too
    assert result.details["selected_score"] == min(c["score"] for c in checkpoints)
    assert len(result.details["starts"]) == 2 and result.details["selected_start"] in (80.0, 10.0)
    assert len(result.details["losses"]) == 40
    tuned = with_schedule(Euler(), SigmaSchedule(result.sigmas.tolist()))
    assert _train_score(datamodule, tuned, steps, D) < 0.6 * _train_score(datamodule, Euler(), steps, D)
    json.dumps(result.record())  # the record is plain JSON (no history arrays)


def test_pathwise_tuner_warm_starts_from_a_schedule_file(datamodule, tmp_path):
    D = AnalyticDenoiser(datamodule.law)
    path = tmp_path / "schedule.json"
    path.write_text(json.dumps({"sigmas": [10.0, 3.0, 1.0, 0.2, 0.0]}))
    tuner = PathwiseTuner(iterations=3, batch=16, disc_warmup=1, starts=None, init=str(path))
    result = tuner.tune(Heun(), D, datamodule, 7, seed=0)
    assert result.details["initial_sigmas"] == pytest.approx([10.0, 3.0, 1.0, 0.2, 0.0])
    assert result.details["checkpoints"][0]["iteration"] == 0  # the warm start itself is a candidate
    with pytest.raises(ValueError, match="4 steps, but heun at 9 NFE takes 5"):
        tuner.tune(Heun(), D, datamodule, 9)


@pytest.mark.parametrize("kwargs, message", [
    (dict(parametrization="spline"), "tuner.parametrization"),
    (dict(starts=[100.0]), "tuner.starts must be first levels in"),
    (dict(starts=["own"]), "could not convert"),
    (dict(disc_sigmas=[]), "tuner.disc_sigmas"),
    (dict(average=0), "tuner.average"),
    (dict(discriminator="mlp"), "tuner.discriminator"),
    (dict(parametrization="karras", init="x.json"), "parametrization=free"),
    (dict(divergence="pr", lam=4.0), "tuner.temperature > 0"),
])
def test_bad_pathwise_settings_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PathwiseTuner(**kwargs)


def test_pathwise_tunes_a_multistep_solver_from_its_own_schedule(datamodule):
    """``starts`` may hold ``sampler``: the solver's own schedule (here DPM-Solver++(3M) on its log-SNR schedule) is
    one start, scored before any step, so the result is never worse on the training split than that schedule."""
    D = AnalyticDenoiser(datamodule.law)
    sampler = DPMpp3M(LogSNRUniformSchedule())
    tuner = PathwiseTuner(iterations=30, batch=64, disc_warmup=20, starts=["sampler", 5.0], explore=10,
                          select_samples=200, select_train=500, lr=0.05)
    torch.testing.assert_close(tuner.levels(sampler, 6, "sampler")(), sampler.sigmas(6).double())
    result = tuner.tune(sampler, D, datamodule, 6, seed=0)
    assert [s["first_level"] for s in result.details["starts"]] == ["sampler", 5.0]
    own = result.details["checkpoints"][0]
    assert own["iteration"] == 0 and own["start"] == "sampler" and result.details["selected_score"] <= own["score"]
    assert result.details["selected_checkpoint_start"] in ("sampler", 5.0)
    tuned = with_schedule(sampler, SigmaSchedule(result.sigmas.tolist()))
    assert _train_score(datamodule, tuned, 6, D) < 0.6 * _train_score(datamodule, sampler, 6, D)


def test_pathwise_needs_a_differentiable_solver(datamodule):
    with pytest.raises(ValueError, match="backpropagates through the solvers"):
        PathwiseTuner().tune(Ancestral(), AnalyticDenoiser(datamodule.law), datamodule, 6)


def test_pathwise_tuning_does_not_depend_on_the_global_generator(datamodule):
    """The same seed gives the same schedule whatever the process drew before (the discriminator's initial weights
    come from the tuning seed)."""
    D = AnalyticDenoiser(datamodule.law)
    tuner = PathwiseTuner(iterations=4, batch=16, disc_warmup=2, starts=[80.0, 5.0], explore=2, select_samples=50,
                          select_train=200)
    torch.manual_seed(1)
    first = tuner.tune(Euler(), D, datamodule, 4, seed=3).sigmas
    torch.manual_seed(2)
    torch.randn(1000)
    second = tuner.tune(Euler(), D, datamodule, 4, seed=3).sigmas
    assert torch.equal(first, second)


def test_feature_discriminator_is_frozen_and_passes_the_gradient_to_its_input():
    from diffusion_irl.discriminator.networks import FeatureDiscriminator

    phi = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5))
    before = [p.detach().clone() for p in phi.parameters()]
    disc = FeatureDiscriminator(phi, torch.zeros(5), torch.ones(5), hidden=16, depth=1, emb_dim=8, num_classes=3)
    disc.train()
    assert not phi.training and all(not p.requires_grad for p in phi.parameters())
    trainable = [p for p in disc.parameters() if p.requires_grad]
    assert trainable and all(any(p is q for q in disc.head.parameters()) for p in trainable)
    x = torch.randn(6, 1, 8, 8, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    logit = disc(x, torch.full((6,), 0.05), labels)
    assert logit.shape == (6,)
    logit.sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    opt = torch.optim.Adam(trainable, lr=0.1)
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, phi.parameters()))
    with pytest.raises(ValueError, match="needs the class labels"):
        disc(x, 0.05)


def test_pathwise_label_conditional_feature_discriminator_on_images(tmp_path, monkeypatch):
    """``conditional=true`` with ``discriminator=features`` on a class-conditional image denoiser: every real partner
    the discriminator sees is of its sample's class (``seed mod num_classes``), the feature network stays as the
    classifier the evaluator trains (frozen), and the MLP head learns."""
    import diffusion_irl.discriminator.module as dmod
    from diffusion_irl.data.shapes import ShapesDataModule
    from diffusion_irl.evaluation import feature_classifier_for

    dm = ShapesDataModule(n_train=400, n_heldout=200, resolution=8)
    dm.setup()

    class Conditional(torch.nn.Module):
        num_classes = 4

        def forward(self, x, sigma, labels=None):
            assert labels is not None
            s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
            return x / (1 + s**2) + 0.01 * labels.to(x.dtype).reshape(-1, 1, 1, 1)

    pairs = []
    original = dmod.same_label_indices

    def spy(data_labels, labels, generator=None):
        idx = original(data_labels, labels, generator)
        pairs.append((data_labels[idx].clone(), labels.clone()))
        return idx

    monkeypatch.setattr(dmod, "same_label_indices", spy)
    nets = []
    build = PathwiseTuner.seeded_network

    def keep(self, *args, **kwargs):
        nets.append(build(self, *args, **kwargs))
        nets.append({k: v.detach().clone() for k, v in nets[-1].head.state_dict().items()})
        return nets[-2]

    monkeypatch.setattr(PathwiseTuner, "seeded_network", keep)
    tuner = PathwiseTuner(discriminator="features", conditional=True, iterations=3, batch=8, disc_warmup=2,
                          starts=None, select_every=0, feature_cache=str(tmp_path))
    result = tuner.tune(Euler(), Conditional(), dm, 4, seed=0)
    assert result.details["history"]["disc_acc"] and result.record()["settings"]["conditional"] is True
    assert len(pairs) == 2 + 3 * 2  # warm-up and two discriminator steps per iteration
    for real_labels, labels in pairs:
        assert torch.equal(real_labels.cpu(), labels.cpu())
    assert {int(v) for _, labels in pairs for v in labels} == {0, 1, 2, 3}
    disc, head_before = nets
    classifier = feature_classifier_for(dm, tmp_path)  # the evaluator's network, from the same cache
    assert all(torch.equal(a, b) for a, b in zip(classifier.state_dict().values(),
                                                 disc.features.classifier.state_dict().values()))
    assert any(not torch.equal(v, disc.head.state_dict()[k]) for k, v in head_before.items())
    with pytest.raises(ValueError, match="needs a class-conditional denoiser"):
        tuner.tune(Euler(), lambda x, sigma: x, dm, 4)


def test_pathwise_optimizer_and_discriminator_choices(datamodule):
    D = AnalyticDenoiser(datamodule.law)
    result = PathwiseTuner(iterations=2, batch=16, disc_warmup=1, starts=None, select_every=0, optimizer="sgd",
                           lr=0.01).tune(Euler(), D, datamodule, 4, seed=0)
    assert result.record()["settings"]["optimizer"] == "sgd" and len(result.details["losses"]) == 2
    history = result.details["history"]  # the gradient, one column per parameter (first level and 3 gaps)
    grads = torch.tensor([history[f"grad_{i}"] for i in range(4)], dtype=torch.float64)
    norms = torch.tensor(history["grad_norm"], dtype=torch.float64)
    torch.testing.assert_close(grads.norm(dim=0), norms, rtol=1e-5, atol=0)
    expected = (grads.mean(1).abs() / grads.std(1)).tolist()
    assert result.details["grad_snr"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="tuner.optimizer must be one of"):
        PathwiseTuner(optimizer="rmsprop")
    with pytest.raises(ValueError, match="tuner.conditional must be true or false"):
        PathwiseTuner(conditional="yes")
    with pytest.raises(ValueError, match="discriminator=features is for images"):
        PathwiseTuner(discriminator="features", iterations=1, starts=None).tune(Euler(), D, datamodule, 4)


def test_pathwise_selection_margin_returns_a_step_only_when_its_gain_is_beyond_the_noise(datamodule):
    tuner = PathwiseTuner(select_seeds=3, select_margin=2.0)
    a, b, c, other = (torch.full((3,), float(i)) for i in range(4))
    per_seed = {id(a): [1.0, 1.0, 1.0], id(other): [1.1, 1.1, 1.1], id(b): [0.9, 0.92, 0.88],
                id(c): [0.5, 1.2, 0.7]}
    checkpoints = [(0, a, 1.0, 80.0), (0, other, 1.1, 5.0), (20, b, 0.9, 80.0), (40, c, 0.8, 80.0)]
    # b: gain 0.1 +- 0.01 (admitted); c: gain 0.2 +- 0.21 standard error (not: 2 standard errors are 0.42)
    assert tuner.admitted(checkpoints, per_seed) == [True, False, True, False]
    assert PathwiseTuner(select_seeds=3).admitted(checkpoints, per_seed) == [True] * 4
    with pytest.raises(ValueError, match="select_seeds >= 2"):
        PathwiseTuner(select_margin=1.0)

    D = AnalyticDenoiser(datamodule.law)
    strict = PathwiseTuner(iterations=4, batch=16, disc_warmup=1, starts=None, select_every=2, select_samples=50,
                           select_train=200, select_seeds=2, select_margin=1e6)
    result = strict.tune(Euler(), D, datamodule, 4, seed=0)
    assert result.details["selected_iteration"] == 0
    assert result.sigmas.tolist() == pytest.approx(result.details["initial_sigmas"])
    checkpoints = result.details["checkpoints"]
    assert [c["admitted"] for c in checkpoints] == [True, False, False]
    assert all(len(c["scores"]) == 2 for c in checkpoints)
    # one warm-up batch and 4 steps of 16 samples; 3 checkpoints x 2 seeds x 50 samples; Euler at 4 NFE
    assert result.cost_nfe == (1 + 4) * 16 * 4 + 3 * 2 * 50 * 4


def test_selection_reference_blocks_are_disjoint_training_points(datamodule, monkeypatch):
    from diffusion_irl.evaluation import scorer_for
    from diffusion_irl.metrics.samples import mmd

    train = datamodule.train_samples()
    assert torch.equal(scorer_for(datamodule, 100, split="train", offset=300).heldout, train[300:400])
    x = datamodule.exact_samples(200, generator=torch.Generator().manual_seed(1))
    _, score = selection_scorer(datamodule, 100, offset=100)
    assert score(x, 0) == pytest.approx(float(mmd(x.double(), train[100:200].double())))
    for offset in (-1, len(train)):
        with pytest.raises(ValueError, match="offset="):
            selection_scorer(datamodule, 100, offset=offset)
    with pytest.raises(ValueError, match="tuner.select_reference must be one of"):
        PathwiseTuner(select_reference="random")

    # disjoint: selection seed k scores against training points [k n, (k + 1) n); shared: all against [0, n)
    import diffusion_irl.tuning.pathwise as pathwise

    offsets = []

    def spy(dm, num_train, feature_cache=None, offset=0):
        offsets.append((num_train, offset))
        return selection_scorer(dm, num_train, feature_cache, offset=offset)

    monkeypatch.setattr(pathwise, "selection_scorer", spy)
    D = AnalyticDenoiser(datamodule.law)
    kwargs = dict(iterations=2, batch=16, disc_warmup=1, starts=None, select_every=2, select_samples=50,
                  select_train=1000, select_seeds=3)
    shared = PathwiseTuner(**kwargs).tune(Euler(), D, datamodule, 4, seed=0)
    assert offsets == [(1000, 0)]
    offsets.clear()
    disjoint = PathwiseTuner(select_reference="disjoint", **kwargs).tune(Euler(), D, datamodule, 4, seed=0)
    assert offsets == [(1000, 0), (1000, 1000), (1000, 2000)]
    assert PathwiseTuner(select_reference="disjoint").settings()["select_reference"] == "disjoint"
    for a, b in zip(shared.details["checkpoints"], disjoint.details["checkpoints"]):
        assert a["scores"][0] == pytest.approx(b["scores"][0])  # the same noise and the same first block
        assert a["scores"][1:] != pytest.approx(b["scores"][1:])
    assert disjoint.cost_nfe == shared.cost_nfe
    with pytest.raises(ValueError, match="needs select_seeds x select_train = 5 x 1000 training points"):
        PathwiseTuner(select_reference="disjoint", **{**kwargs, "select_seeds": 5}).tune(Euler(), D, datamodule, 4)


def _shrink(x, sigma):
    s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return x / (1 + s**2)


def test_a_classifier_reserve_keeps_selection_images_from_the_feature_classifier(tmp_path, monkeypatch):
    """``data.classifier_reserve = N``: the evaluator's feature classifier trains on the training images after the
    first N; image model selection scores against those N, and the feature discriminator draws its real images
    from them (a classifier's features of its own training images are tighter than of unseen ones)."""
    import diffusion_irl.metrics.features as features
    from diffusion_irl.data.shapes import ShapesDataModule
    from diffusion_irl.evaluation import feature_classifier_for

    dm = ShapesDataModule(n_train=400, n_heldout=200, resolution=8, classifier_reserve=100)
    dm.setup()
    seen = []
    original = features.train_feature_classifier

    def spy(images, labels, *args, **kwargs):
        seen.append((images, kwargs.get("cache_path")))
        return original(images, labels, *args, **kwargs)

    monkeypatch.setattr(features, "train_feature_classifier", spy)
    feature_classifier_for(dm, tmp_path)
    assert torch.equal(seen[0][0], dm.train_samples()[100:]) and seen[0][1].name.endswith("_reserve100.pt")
    metric, score = selection_scorer(dm, 100, str(tmp_path))
    assert metric == "fd" and math.isfinite(score(dm.heldout(50), 0))
    with pytest.raises(ValueError, match="classifier_reserve=100 keeps only the first 100"):
        selection_scorer(dm, 60, str(tmp_path), offset=60)

    reals = []
    build = PathwiseTuner.feature_network

    def keep(self, datamodule, train):
        reals.append(train)
        return build(self, datamodule, train)

    monkeypatch.setattr(PathwiseTuner, "feature_network", keep)
    tuner = PathwiseTuner(discriminator="features", iterations=1, batch=8, disc_warmup=1, starts=None, select_every=0,
                          feature_cache=str(tmp_path))
    tuner.tune(Euler(), _shrink, dm, 4, seed=0)
    assert torch.equal(reals[0].cpu(), dm.train_samples()[:100])
    # disc_holdout: the discriminator's real images start after the selection's reference images
    reals.clear()
    held = PathwiseTuner(discriminator="features", iterations=2, batch=8, disc_warmup=1, starts=None, select_every=1,
                         select_samples=20, select_train=40, disc_holdout=True, feature_cache=str(tmp_path))
    result = held.tune(Euler(), _shrink, dm, 4, seed=0)
    assert torch.equal(reals[0].cpu(), dm.train_samples()[40:100]) and result.settings["disc_holdout"] is True
    with pytest.raises(ValueError, match="leaves 0 of 100 for the discriminator"):
        PathwiseTuner(discriminator="features", iterations=1, starts=None, select_every=1, select_train=100,
                      disc_holdout=True, feature_cache=str(tmp_path)).tune(Euler(), _shrink, dm, 4)
    with pytest.raises(ValueError, match="tuner.disc_holdout must be true or false"):
        PathwiseTuner(disc_holdout=1)
