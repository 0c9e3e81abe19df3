"""Schedule tuners (docs/method.md section 9): the full Karras grid, GITS and LD3, and the `tune` entry point.

Every tuner is run on gmm8 with the exact denoiser; its schedule must be valid, have N + 1 entries for the budget,
cost exactly the denoiser evaluations counted around it, and beat the default Karras schedule on held-out data.
"""
import itertools
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from diffusion_irl.config import ConfigError
from diffusion_irl.data.datamodules import ToyDataModule
from diffusion_irl.data.toy2d import gmm8
from diffusion_irl.denoisers.analytic import AnalyticDenoiser
from diffusion_irl.evaluation import generate, scorer_for
from diffusion_irl.sampling.samplers import Euler, Heun, differentiable_samplers
from diffusion_irl.sampling.schedules import KarrasSchedule, SigmaSchedule, check_sigmas
from diffusion_irl.tuning.gits import GITSTuner, best_path
from diffusion_irl.tuning.grid import GridTuner
from diffusion_irl.tuning.ld3 import LD3Tuner, LogSigmaLevels, solve
from diffusion_irl.tuning.tuners import load_tuned_sampler, with_schedule

from .conftest import ROOT
from .helpers import compose_config, load_sampler

pytestmark = pytest.mark.usefixtures("one_thread")

# small settings: a few seconds per tuner on one core
FAST = {
    "grid": dict(sigma_max=[2, 5, 80], rho=[1, 3, 7], sigma_min=[0.002, 0.05, 0.3], num_samples=400, num_train=1000),
    "gits": dict(levels=60, num_warmup=128, coeff=1.0),
    "ld3": dict(num_pairs=64, teacher_steps=50, iterations=150),
}
TUNERS = {"grid": GridTuner, "gits": GITSTuner, "ld3": LD3Tuner}


class BatchCounter(nn.Module):
    """An independent count of per-sample denoiser evaluations (the sum of the batch sizes)."""

    def __init__(self, denoiser):
        super().__init__()
        self.denoiser, self.evaluations = denoiser, 0

    def forward(self, x, sigma, *args, **kwargs):
        self.evaluations += x.shape[0]
        return self.denoiser(x, sigma, *args, **kwargs)


@pytest.fixture(scope="module")
def datamodule():
    dm = ToyDataModule(gmm8(), n_train=4000, n_heldout=4000)
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def tuned(datamodule):
    """Each tuner at NFE 6 for Euler (counted), shared by the tests below."""
    out = {}
    for name, cls in TUNERS.items():
        counter = BatchCounter(AnalyticDenoiser(datamodule.law))
        out[name] = (cls(**FAST[name]).tune(Euler(), counter, datamodule, 6, seed=0), counter.evaluations)
    return out


@pytest.mark.parametrize("name", sorted(TUNERS))
def test_schedule_is_valid_and_cost_is_counted(name, tuned):
    result, counted = tuned[name]
    sigmas = check_sigmas(result.sigmas)
    assert len(sigmas) == 7 and result.steps == 6 and float(sigmas[-1]) == 0.0
    assert (result.tuner, result.solver, result.nfe) == (name, "euler", 6)
    assert result.cost_nfe == counted > 0 and result.wall_seconds > 0
    s = FAST[name]
    if name == "grid":  # points x samples x NFE
        expected = 3 * 3 * 3 * s["num_samples"] * 6
    elif name == "gits":  # the teacher alone: Heun on the fine grid, 2M - 1 evaluations per trajectory
        expected = s["num_warmup"] * (2 * s["levels"] - 1)
    else:  # the teacher, then every iteration's student (forward evaluations)
        expected = s["num_pairs"] * (2 * s["teacher_steps"] - 1) + s["iterations"] * s["num_pairs"] * 6
    assert counted == expected
    record = result.record()
    assert record["cost_nfe"] == counted and record["settings"] and len(record["sigmas"]) == 7
    json.dumps(record)  # tuning.json is plain JSON


def test_tuned_schedules_beat_the_default_on_heldout_data(tuned, datamodule):
    """Euler at 6 NFE on exact gmm8: measured held-out MMD^2 (2000 samples, seed 0) were about default 0.06,
    grid 0.01, gits 0.02, ld3 0.01; each tuner must at least halve the default's."""
    D = AnalyticDenoiser(datamodule.law)
    score = scorer_for(datamodule, 4000)
    rows = {"default": Euler(KarrasSchedule(0.002, 80.0, 7.0))}
    rows.update({name: with_schedule(Euler(), SigmaSchedule(r.sigmas.tolist())) for name, (r, _) in tuned.items()})
    mmd = {}
    for name, sampler in rows.items():
        x, nfe = generate(sampler, D, (2,), 6, 2000, seed=0, batch_size=4096)
        assert nfe == 6
        mmd[name] = score(x, 0)["mmd"]
    print("held-out MMD^2 at 6 NFE (Euler):", {k: round(v, 4) for k, v in mmd.items()})
    assert mmd["default"] > 0.04
    for name in TUNERS:
        assert mmd[name] < 0.5 * mmd["default"], (name, mmd)


def test_grid_selects_on_the_training_split(tuned):
    result, _ = tuned["grid"]
    details = result.details
    assert details["split"] == "train" and details["metric"] == "mmd" and details["num_points"] == 27
    scores = [score for _, score in details["points"]]
    assert details["best_score"] == min(scores)
    best = details["best"]
    torch.testing.assert_close(result.sigmas, KarrasSchedule(best["sigma_min"], best["sigma_max"], best["rho"])(6))


def test_grid_score_is_the_evaluators_mmd_on_the_training_split(datamodule):
    from diffusion_irl.tuning.grid import selection_scorer

    x = datamodule.law.sample(500, torch.Generator().manual_seed(5))
    metric, score = selection_scorer(datamodule, 1000)
    assert metric == "mmd"
    assert score(x, 3) == pytest.approx(scorer_for(datamodule, 1000, split="train")(x, 3)["mmd"], rel=1e-9, abs=1e-12)
    x[0, 0] = float("nan")
    assert score(x, 3) == float("inf")


@pytest.mark.parametrize("coeff", [1.0, 1.2, 0.8])
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 6])
def test_gits_dynamic_programming_is_optimal(steps, coeff):
    """Against brute force over every path 0 = i_0 < i_1 < ... < i_N = L - 1 on a random upper-triangular matrix,
    with step m's cost weighted by coeff^m."""
    L = 7
    g = torch.Generator().manual_seed(steps)
    C = torch.rand(L, L, generator=g, dtype=torch.float64)
    C[torch.tril(torch.ones(L, L, dtype=torch.bool))] = float("inf")
    path = best_path(C, steps, coeff)
    cost = lambda p: float(sum(coeff ** m * C[a, b] for m, (a, b) in enumerate(zip(p[:-1], p[1:]))))  # noqa: E731
    brute = min(([0, *mid, L - 1] for mid in itertools.combinations(range(1, L - 1), steps - 1)), key=cost)
    assert path[0] == 0 and path[-1] == L - 1 and len(path) == steps + 1
    assert all(a < b for a, b in zip(path[:-1], path[1:]))
    assert cost(path) == pytest.approx(cost(brute), abs=1e-12)
    with pytest.raises(ValueError, match="no 7-step path"):
        best_path(C, 7)


def test_gits_path_uses_the_fine_levels(tuned):
    """The path runs on the fine levels from sigma_max down to sigma_min (index M - 1), which stands for 0."""
    result, _ = tuned["gits"]
    fine = GITSTuner(**FAST["gits"]).fine_sigmas()
    path = result.details["path"]
    assert path[0] == 0 and path[-1] == len(fine) - 2 and len(path) == 7
    torch.testing.assert_close(result.sigmas[:-1], fine[path[:-1]])
    assert float(result.sigmas[-1]) == 0.0 and float(fine[path[-1]]) == pytest.approx(0.002)


def test_gits_without_the_sigma_min_end_may_jump_to_zero(datamodule):
    """end_at_sigma_min=false: the DP's path ends at the fine grid's 0 itself (its last non-zero level is the DP's
    choice)."""
    D = AnalyticDenoiser(datamodule.law)
    free = GITSTuner(**FAST["gits"], end_at_sigma_min=False).tune(Euler(), D, datamodule, 6, seed=0)
    held = GITSTuner(**FAST["gits"]).tune(Euler(), D, datamodule, 6, seed=0)
    fine = GITSTuner(**FAST["gits"]).fine_sigmas()
    assert free.details["path"][-1] == len(fine) - 1
    torch.testing.assert_close(free.sigmas, fine[free.details["path"]])
    assert held.details["path"][-1] == len(fine) - 2


def test_ld3_levels_are_monotone_and_span_the_range():
    levels = LogSigmaLevels(5, 0.002, 80.0, init_rho=7.0)
    torch.testing.assert_close(levels.levels().detach(), KarrasSchedule(0.002, 80.0, 7.0)(6)[:-1])
    with torch.no_grad():
        levels.logits.copy_(torch.randn(5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3)
    s = levels.levels().detach()
    assert len(s) == 6 and bool((s[1:] < s[:-1]).all())
    assert float(s[0]) == pytest.approx(80.0) and float(s[-1]) == pytest.approx(0.002)
    schedule = levels().detach()
    check_sigmas(schedule)
    assert len(schedule) == 6 and float(schedule[-1]) == 0.0 and float(schedule[-2]) > 0.002


def test_ld3_loss_decreases(tuned):
    details = tuned["ld3"][0].details
    losses = details["losses"]
    assert len(losses) == FAST["ld3"]["iterations"] and all(map(torch.isfinite, torch.tensor(losses)))
    assert details["best_loss"] < 0.3 * details["initial_loss"]
    assert sum(losses[-10:]) < sum(losses[:10])


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m", "ipndm", "dpmpp_3m", "unipc"])
def test_differentiable_solver_matches_the_sampler_and_finite_differences(name, oracle):
    """The autograd loop of LD3 and the pathwise tuner is the sampler's own (same output on the same schedule), and
    its gradient in the schedule matches central finite differences (float64, exact denoiser)."""
    sampler = load_sampler(name)
    assert sampler.differentiable and name in differentiable_samplers()
    sigmas = KarrasSchedule(0.002, 80.0, 7.0)(6)
    sampler = with_schedule(sampler, SigmaSchedule(sigmas.tolist()))
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 80
    want = sampler._solve(oracle, x.clone(), sigmas, None, None)
    assert not want.requires_grad
    s = sigmas.clone().requires_grad_(True)
    w = torch.randn(16, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = solve(sampler, oracle, x, s)
    torch.testing.assert_close(got.detach(), want, rtol=1e-9, atol=1e-9)
    (got * w).sum().backward()
    fd = torch.zeros(len(sigmas) - 1, dtype=torch.float64)
    for k in range(len(fd)):  # every level but the final 0
        e = 1e-4 * sigmas[k]
        up, down = sigmas.clone(), sigmas.clone()
        up[k], down[k] = up[k] + e, down[k] - e
        fd[k] = ((sampler._solve(oracle, x.clone(), up, None, None) -
                  sampler._solve(oracle, x.clone(), down, None, None)) * w).sum() / (2 * e)
    torch.testing.assert_close(s.grad[:-1], fd, rtol=1e-3, atol=1e-5 * fd.abs().max().item())


def test_tuners_for_another_solver_and_budget(datamodule):
    """Heun at 9 NFE: 5 steps; GITS and LD3 work on its step count too."""
    D = AnalyticDenoiser(datamodule.law)
    for tuner in (GITSTuner(levels=30, num_warmup=32), LD3Tuner(num_pairs=16, teacher_steps=20, iterations=5)):
        result = tuner.tune(Heun(), D, datamodule, 9)
        assert result.steps == 5 and len(check_sigmas(result.sigmas)) == 6


# ---- the entry point ---------------------------------------------------------------------------------------------

TUNE_FAST = {
    "grid": ["tuner.sigma_max=[5,80]", "tuner.rho=[2,7]", "tuner.sigma_min=[0.002,0.1]", "tuner.num_samples=200",
             "tuner.num_train=500"],
    "gits": ["tuner.levels=40", "tuner.num_warmup=64", "tuner.select_samples=200", "tuner.num_train=500"],
    "ld3": ["tuner.num_pairs=32", "tuner.teacher_steps=30", "tuner.iterations=30"],
}
SMALL_DATA = ["data.n_train=2000", "data.n_heldout=1000"]


@pytest.mark.parametrize("tuner", ["grid", "gits", "ld3"])
def test_tune_writes_a_schedule_the_evaluator_runs(tuner, tmp_path, monkeypatch):
    from diffusion_irl.evaluate import run as evaluate
    from diffusion_irl.tune import run as tune

    monkeypatch.chdir(tmp_path)
    cfg = compose_config("tune", [f"tuner={tuner}", "nfe=6", *SMALL_DATA, *TUNE_FAST[tuner]],
                         output_dir=tmp_path / "tune")
    result = tune(cfg)
    schedule = tmp_path / "tune" / "schedule.json"
    saved = json.loads(schedule.read_text())
    assert (saved["tuner"], saved["solver"], saved["nfe"], saved["steps"]) == (tuner, "euler", 6, 6)
    assert saved["sigmas"] == result.sigmas.tolist()
    record = json.loads((tmp_path / "tune" / "tuning.json").read_text())
    assert {"tuner", "solver", "nfe", "steps", "cost_nfe", "wall_seconds", "settings"} <= set(record)
    assert record["cost_nfe"] == result.cost_nfe > 0
    assert (tmp_path / "tune" / "grid.csv").is_file() == (tuner == "grid")
    history = tmp_path / "tune" / "history.csv"
    assert history.is_file() == (tuner == "ld3")  # the per-iteration curves of the gradient tuners
    if tuner == "ld3":
        lines = history.read_text().splitlines()
        assert lines[0] == "iteration,loss" and len(lines) == 1 + len(result.details["losses"])
        assert float(lines[1].split(",")[1]) == pytest.approx(result.details["losses"][0], rel=1e-5)
    if tuner == "grid":
        assert "best" in record and record["best_score"] == result.details["best_score"]
        assert len((tmp_path / "tune" / "grid.csv").read_text().splitlines()) == 1 + 8
    # the evaluator runs it as a row, composed from the command-line form documented in conf/schedule/sigmas.yaml
    row = f"euler_{tuner}"
    overrides = [f"+sampler@samplers.{row}=euler", f"schedule@samplers.{row}.schedule=sigmas",
                 f"samplers.{row}.schedule.path={schedule}", "evaluate.nfe=[6]", f"evaluate.samplers=[euler,{row}]",
                 "evaluate.num_samples=200", "evaluate.seeds=[0]", "evaluate.progress=false",
                 "evaluate.reference=false", *SMALL_DATA]
    rows = evaluate(compose_config("evaluate", overrides, output_dir=tmp_path / "ev"))
    assert {(r.sampler, r.nfe) for r in rows} == {("euler", 6), (row, 6)}
    # and in Python
    sampler = load_tuned_sampler(Euler(), schedule)
    assert sampler.sigmas(6).tolist() == result.sigmas.tolist() and Euler().sigmas(6)[0] == 80.0


@pytest.mark.parametrize("override, message", [
    (["nfe=0"], "nfe must be a positive integer"),
    (["sampler=restart", "nfe=4"], "cannot meet an NFE budget of 4"),
    (["tuner.sigma_max=[]"], "tuner.sigma_max is empty"),
    (["tuner.rho=[1,-2]"], "tuner.rho values must be finite and > 0"),
    (["tuner.sigma_max=[0.01]", "tuner.sigma_min=[0.1]"], "no grid point"),
    (["tuner=gits", "tuner.levels=4", "nfe=6"], "tuner.levels=4 is too few"),
    (["tuner=gits", "tuner.sigma_min=90"], "sigma_min < sigma_max"),
    (["tuner=ld3", "sampler=ddpm"], "backpropagates"),
    (["tuner=ld3", "tuner.slack=-0.1"], "tuner.slack"),
    (["tuner=ld3", "tuner.iterations=0"], "tuner.iterations"),
])
def test_bad_tune_config_fails_before_compute(override, message, tmp_path, monkeypatch):
    from diffusion_irl.tune import run as tune

    monkeypatch.chdir(tmp_path)
    cfg = compose_config("tune", override, output_dir=tmp_path)
    with pytest.raises(ConfigError, match=message):
        tune(cfg)
    assert not (tmp_path / "schedule.json").exists() and not (tmp_path / "tuning.json").exists()


def test_tune_command_line_error_is_one_line(tmp_path):
    env = dict(os.environ, WANDB_MODE="disabled")
    proc = subprocess.run([sys.executable, "-m", "diffusion_irl.tune", "sampler=restart", "nfe=4",
                           f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("config error: tuner=grid, nfe=4: sampler restart cannot")
    assert "Traceback" not in proc.stderr and not (tmp_path / "schedule.json").exists()


# ---- LD3's distance: L2 for vectors, the feature classifier's features for images ---------------------------------

def test_ld3_distance_is_l2_for_vectors_and_refuses_features_there(datamodule):
    D = AnalyticDenoiser(datamodule.law)
    result = LD3Tuner(num_pairs=8, teacher_steps=10, iterations=2).tune(Euler(), D, datamodule, 6)
    assert result.details["distance"] == "l2"
    with pytest.raises(ValueError, match="distance=features needs image data"):
        LD3Tuner(num_pairs=8, teacher_steps=10, iterations=2, distance="features").tune(Euler(), D, datamodule, 6)
    with pytest.raises(ValueError, match="tuner.distance must be auto, l2 or features"):
        LD3Tuner(distance="lpips")


@pytest.mark.slow
def test_ld3_uses_the_feature_classifier_for_images(tmp_path):
    """On digits (8x8 images with labels) ``distance=auto`` matches the teacher in the features of the data set's
    classifier (the evaluator's, trained on the training split and cached): the first loss is that feature distance
    computed by hand on the starting schedule, and the loss decreases."""
    from diffusion_irl.data.images import DigitsDataModule
    from diffusion_irl.evaluation import feature_classifier_for
    from diffusion_irl.tuning.ld3 import ld3_loss

    digits = DigitsDataModule()
    digits.setup()
    shrink = lambda x, sigma: x * 0.25 / (0.25 + sigma.reshape(-1, 1, 1, 1) ** 2)  # noqa: E731 (Gaussian data's D)
    tuner = LD3Tuner(num_pairs=16, teacher_steps=10, iterations=15, lr=0.1, slack=0.0, feature_cache=str(tmp_path))
    result = tuner.tune(Euler(), shrink, digits, 5)
    assert result.details["distance"] == "features"
    assert list(tmp_path.glob("feature_classifier_digits_*.pt"))  # cached beside the evaluator's
    net = feature_classifier_for(digits, str(tmp_path)).requires_grad_(False)
    x_T, target, _ = tuner.teacher(shrink, tuple(digits.shape), 0, "cpu")
    start = LogSigmaLevels(5, tuner.sigma_min, tuner.sigma_max, tuner.init_rho)()
    by_hand = ld3_loss(Euler(), shrink, start, x_T, None, torch.zeros(len(x_T)), net.features(target), net.features)
    assert result.details["initial_loss"] == pytest.approx(float(by_hand.detach()), rel=1e-5)
    assert result.details["best_loss"] < result.details["initial_loss"]


def test_gits_selects_its_coefficient_on_the_training_split(datamodule):
    """coeff=[...]: one DP path per coefficient; the path whose samples score best on the training split wins, it
    is the single-coefficient path of that coefficient, and the selection's samples are counted in the cost."""
    counter = BatchCounter(AnalyticDenoiser(datamodule.law))
    coeffs = [0.9, 1.0, 1.2]
    tuner = GITSTuner(levels=40, num_warmup=64, coeff=coeffs, select_samples=200, num_train=500)
    result = tuner.tune(Euler(), counter, datamodule, 8, seed=0)
    scores = result.details["coeff_scores"]
    assert sorted(scores) == ["0.9", "1.0", "1.2"] and result.details["split"] == "train"
    assert scores[str(result.details["selected_coeff"])] == min(scores.values())
    alone = GITSTuner(levels=40, num_warmup=64, coeff=result.details["selected_coeff"]).tune(
        Euler(), AnalyticDenoiser(datamodule.law), datamodule, 8, seed=0)
    torch.testing.assert_close(result.sigmas, alone.sigmas)
    assert result.cost_nfe == counter.evaluations == 64 * (2 * 40 - 1) + len(coeffs) * 200 * 8
    with pytest.raises(ValueError, match="tuner.coeff must be a positive number"):
        GITSTuner(coeff=[])


@pytest.mark.parametrize("name", ["gits", "ld3", "pathwise"])
def test_tuners_condition_a_class_conditional_denoiser_as_the_evaluator_does(datamodule, name):
    """A class-conditional denoiser: every call a tuner makes carries labels, and they are the evaluator's classes
    ``seed mod num_classes`` of the noise the call is made on (a tuner must tune the sampler that is scored, not an
    unconditional one). The echo denoiser adds its label to the analytic output, so it also checks the labels line
    up with their rows."""
    from diffusion_irl import seeding
    from diffusion_irl.tuning.pathwise import PathwiseTuner

    analytic = AnalyticDenoiser(datamodule.law)
    calls = []

    class Conditional(nn.Module):
        num_classes = 3

        def forward(self, x, sigma, labels=None):
            assert labels is not None, f"tuner={name} called a class-conditional denoiser without labels"
            calls.append(labels.clone())
            return analytic(x, sigma)

    tuners = {"gits": lambda: GITSTuner(levels=20, num_warmup=24, batch_size=16),
              "ld3": lambda: LD3Tuner(num_pairs=12, teacher_steps=8, iterations=2),
              "pathwise": lambda: PathwiseTuner(iterations=2, batch=10, disc_warmup=1, starts=None, select_every=0)}
    tuners[name]().tune(Euler(), Conditional(), datamodule, 4, seed=3)
    assert calls
    expected = {"gits": [seeding.sample_seeds(24, "tune", "gits", 3)[:16], seeding.sample_seeds(24, "tune", "gits", 3)[16:]],
                "ld3": [seeding.sample_seeds(12, "tune", "ld3", 3)],
                "pathwise": [seeding.sample_seeds(10, "tune", "pathwise", 3, it) for it in (-1, 0, 1)]}[name]
    expected = [torch.remainder(s, 3) for s in expected]
    for labels in calls:
        assert any(len(labels) == len(e) and torch.equal(labels, e) for e in expected)
    assert all(any(torch.equal(labels, e) for labels in calls) for e in expected)  # every batch was conditioned
