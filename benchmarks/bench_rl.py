"""The RL loop's costs: where one iteration's time goes, and what a tuned sampler costs at inference.

    python benchmarks/bench_rl.py                          # full run (CPU, 1 thread: ~2 min on 2 shared cores)
    python benchmarks/bench_rl.py --quick                  # smoke run (small batches, few iterations)
    python benchmarks/bench_rl.py --device cuda --repeats 15 --out /tmp/rl.md

Iteration split: a ``SamplerPolicyModule`` on gmm8 (the exact denoiser, and a randomly initialised MLP denoiser
``EDMPrecond(MLP(2, hidden 256, depth 4))``: speed does not depend on training), Euler at 10 NFE, the open-loop
``step`` knob policy (``conf/policy/step.yaml``), the MLP discriminator (``conf/discriminator/mlp.yaml``),
``Reward('kl')``, PPO with ``conf/algo/ppo.yaml``'s settings, ``disc_steps=8``, ``disc_batch=1024``
(``conf/train.yaml``). A Lightning ``Trainer`` (no logger, no checkpoint, no progress bar) runs ``--warmup`` +
``--iterations`` iterations (one epoch each); the module's own ``timings`` (rollout / discriminator / PPO seconds
of the last iteration) are read at every epoch end, and ``other`` is the epoch's wall time minus those three
(rewards, advantages, logging, Lightning). Warm-up iterations are dropped; the table reports mean +- std.

Inference overhead: the tuned sampler ``PolicySampler(mdp, policy)`` (the policy's deterministic mode, as the
evaluator runs it) against the base sampler ``Euler`` at the same NFE, batch, denoiser and initial noise. Two knob
policies: open loop (``conditioning: step``, a per-step table) and closed loop (``conditioning: state``, table +
zero-initialised MLP of ``(log sigma, k / N)``); and, side by side, the open-loop policy acting on the whole batch at
every step (``per-sample act (before)``: what ``PolicySampler`` did before it tabulated an open-loop policy's actions
once per batch). All are at their initial values (the base sampler's schedule, so the samples must equal the base
sampler's: ``max |tuned - base|`` is reported); time does not depend on the values.
Denoisers: the exact gmm8 denoiser (cheap), the MLP (a real network), and ``D = x / (1 + sigma^2)`` (no network:
what is left is each sampler's per-step overhead). One warm-up each, then ``--repeats`` rounds running every sampler
once (order alternating); times are medians, and ``ratio /base (totals)`` is the median over rounds of tuned / base
within a round, which cancels a shared machine's load drift. The denoiser is wrapped in a timer (synchronised on
CUDA), so each run splits into time inside D and time outside it; ``added outside D, % of base`` = (median time
outside D of the tuned sampler - the base's) / the base's median total: the tuned sampler's own added cost, which
the run-to-run noise of a network's time (several % on a loaded machine) would otherwise hide.

Profile: per-call cost of the pieces of one MDP step at the same batch (medians of many calls), to say where the
tuned sampler's overhead goes.
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable

import lightning as L
import torch
from torch import Tensor, nn

from diffusion_irl.data.toy2d import gmm8
from diffusion_irl.denoisers.analytic import AnalyticDenoiser
from diffusion_irl.denoisers.networks import MLP
from diffusion_irl.denoisers.precond import EDMPrecond
from diffusion_irl.discriminator.module import DiscriminatorModule
from diffusion_irl.discriminator.networks import MLPDiscriminator
from diffusion_irl.mdp.actions import Knob
from diffusion_irl.mdp.env import PolicySampler, SamplingMDP, _OpenLoopActions
from diffusion_irl.mdp.policies import KnobPolicy, State
from diffusion_irl.rl.ppo import PPO
from diffusion_irl.rl.rewards import Reward
from diffusion_irl.sampling import solvers
from diffusion_irl.sampling.noise import NoiseStream, SampleNoise, Slot
from diffusion_irl.sampling.samplers import Euler
from diffusion_irl.system import SamplerPolicyModule
from tables import format_row, markdown, sync  # benchmarks/tables.py (the script's own folder)

SIGMA_DATA = 2.84   # conf/data/gmm8.yaml
NFE = 10            # conf/train.yaml: mdp.nfe


# --- building blocks ---------------------------------------------------------------------------------------------

class NoNetwork(nn.Module):
    """``D(x, sigma) = x / (1 + sigma^2)`` (the exact denoiser of N(0, I) data): costs (almost) nothing, so what is
    left is the sampler's own per-step overhead."""

    shape = (2,)

    def forward(self, x: Tensor, sigma, class_labels=None) -> Tensor:
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))
        return x / (1 + s**2)


def build_denoiser(name: str, device: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "analytic":
        D = AnalyticDenoiser(gmm8())
    elif name == "mlp":
        D = EDMPrecond(MLP(2, hidden=256, depth=4, emb_dim=64), SIGMA_DATA, (2,))
    elif name == "none":
        D = NoNetwork()
    else:
        raise ValueError(name)
    return D.to(device).eval().requires_grad_(False)


DENOISER_LABEL = {"analytic": "exact gmm8 D", "mlp": "MLP 2D (256x4)", "none": "none: D = x/(1+s^2) (overhead only)"}


def step_policy(conditioning: str = "step") -> KnobPolicy:
    """``conf/policy/step.yaml``: the next noise level's log-offset on [-3, 3], squashed Gaussian."""
    knob = Knob("step", low=-3.0, high=3.0, num=13, init_std=0.5)
    return KnobPolicy({"step": knob}, conditioning=conditioning, hidden=64, depth=2, sigma_data=SIGMA_DATA)


def build_mdp(conditioning: str = "step", nfe: int = NFE) -> tuple[SamplingMDP, KnobPolicy]:
    mdp = SamplingMDP(Euler(), nfe=nfe)
    policy = step_policy(conditioning)
    mdp.setup_policy(policy, (2,))
    return mdp, policy


def build_module(denoiser: str, rollout_batch: int, device: str, n_train: int = 50_000) -> SamplerPolicyModule:
    law = gmm8()
    mdp, policy = build_mdp()
    disc = DiscriminatorModule(MLPDiscriminator([2], hidden=128, depth=3, emb_dim=32, sigma_data=SIGMA_DATA))
    algo = PPO(lr=1e-2, epochs=4, minibatches=4, clip_eps=0.2, max_grad_norm=1.0)   # conf/algo/ppo.yaml
    data = law.sample(n_train, torch.Generator().manual_seed(0)).float()
    return SamplerPolicyModule(build_denoiser(denoiser, "cpu"), mdp, policy, disc, Reward("kl", logit_clip=5.0), algo,
                               data, rollout_batch=rollout_batch, disc_steps=8, disc_batch=1024, seed=0)


# --- timing helpers ----------------------------------------------------------------------------------------------

def per_call_us(fn: Callable[[], object], device: str, calls: int, rounds: int = 5) -> float:
    """Median over ``rounds`` of the mean time of ``calls`` back-to-back calls, in microseconds."""
    fn()
    out = []
    for _ in range(rounds):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        out.append((time.perf_counter() - t0) / calls)
    return 1e6 * statistics.median(out)


def mean_std(values: list[float]) -> str:
    m = statistics.fmean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:.3g} ± {s:.2g}"


# --- 1. one iteration of the loop --------------------------------------------------------------------------------

class _Recorder(L.Callback):
    def __init__(self):
        self.rows: list[dict[str, float]] = []

    def on_train_epoch_start(self, trainer, module):
        sync(str(module.device))
        self.t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, module):
        sync(str(module.device))
        wall = time.perf_counter() - self.t0
        t = dict(module.timings)
        t["other"] = wall - sum(t.values())
        t["total"] = wall
        self.rows.append(t)


def iteration_table(args) -> list[dict]:
    rows = []
    parts = ("rollout", "discriminator", "ppo", "other")
    for denoiser in args.denoisers:
        if denoiser == "none":
            continue
        for batch in args.batches:
            L.seed_everything(0, verbose=False)
            module = build_module(denoiser, batch, args.device)
            rec = _Recorder()
            accel = "gpu" if args.device.startswith("cuda") else "cpu"
            trainer = L.Trainer(max_epochs=args.warmup + args.iterations, accelerator=accel, devices=1, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                log_every_n_steps=1, num_sanity_val_steps=0, limit_val_batches=0,
                                callbacks=[rec])
            trainer.fit(module)
            kept = rec.rows[args.warmup:]
            total = statistics.fmean(r["total"] for r in kept)
            row = {"denoiser": DENOISER_LABEL[denoiser], "rollout_batch": batch, "NFE": module.mdp.planned_nfe(),
                   "iterations": len(kept)}
            for p in parts:
                row[f"{p} s"] = mean_std([r[p] for r in kept])
            row["total s"] = mean_std([r["total"] for r in kept])
            for p in parts:
                row[f"{p} %"] = 100 * statistics.fmean(r[p] for r in kept) / total
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


# --- 2. inference: tuned vs base sampler -------------------------------------------------------------------------

class TimedDenoiser(nn.Module):
    """Wraps D and accumulates the seconds spent inside it (synchronised on CUDA), so the time a sampler spends
    outside the network (its own overhead) can be told from the network's, whose run-to-run noise on a shared
    machine is larger than the overhead itself."""

    def __init__(self, denoiser: nn.Module, device: str):
        super().__init__()
        self.denoiser, self.device, self.seconds = denoiser, device, 0.0

    def forward(self, x: Tensor, sigma, *args, **kwargs) -> Tensor:
        sync(self.device)
        t0 = time.perf_counter()
        out = self.denoiser(x, sigma, *args, **kwargs)
        sync(self.device)
        self.seconds += time.perf_counter() - t0
        return out


class PerStepAct:
    """Delegates ``act`` to a knob policy but hides its type, so ``PolicySampler`` calls ``policy.act`` on the whole
    batch at every step, as it did before it tabulated open-loop actions once per batch (``_OpenLoopActions``)."""

    kind = "knob"
    per_step_table = False

    def __init__(self, policy: KnobPolicy):
        self.policy, self.names, self.eval_mode = policy, policy.names, policy.eval_mode

    def act(self, state: State, deterministic: bool = False):
        return self.policy.act(state, deterministic)


def inference_table(args) -> list[dict]:
    rows = []
    B = args.batch
    for denoiser in args.denoisers:
        D = TimedDenoiser(build_denoiser(denoiser, args.device), args.device)
        base = Euler()
        samplers: dict[str, object] = {"base (Euler)": base}
        for cond in ("step", "state"):
            mdp, policy = build_mdp(cond)
            samplers[f"tuned, conditioning={cond}"] = PolicySampler(mdp, policy.to(args.device))
            if cond == "step":
                samplers["tuned, conditioning=step, per-sample act (before)"] = PolicySampler(mdp, PerStepAct(policy))
        steps = base.steps_for_budget(NFE)
        shape = (B, 2)

        def run(s, seed=0):
            with torch.no_grad():
                return s.sample(D, shape, steps, NoiseStream(seed, device=args.device))

        outs = {name: run(s) for name, s in samplers.items()}   # also the warm-up
        total: dict[str, list[float]] = {k: [] for k in samplers}
        inside: dict[str, list[float]] = {k: [] for k in samplers}
        order = list(samplers)
        for r in range(args.repeats):   # interleaved rounds, order alternating
            for name in order if r % 2 == 0 else order[::-1]:
                D.seconds = 0.0
                sync(args.device)
                t0 = time.perf_counter()
                run(samplers[name])
                sync(args.device)
                total[name].append(time.perf_counter() - t0)
                inside[name].append(D.seconds)
        b = "base (Euler)"
        outside = {k: [t - i for t, i in zip(total[k], inside[k])] for k in samplers}
        med = {k: statistics.median(v) for k, v in total.items()}
        med_out = {k: statistics.median(v) for k, v in outside.items()}
        for name in samplers:
            row = {"denoiser": DENOISER_LABEL[denoiser], "batch": B, "sampler": name, "NFE": outs[name].nfe,
                   "ms/batch": 1e3 * med[name], "ms in D": 1e3 * statistics.median(inside[name]),
                   "ms outside D": 1e3 * med_out[name],
                   "ratio /base (totals)": statistics.median(t / u for t, u in zip(total[name], total[b])),
                   "added outside D, % of base": 100 * (med_out[name] - med_out[b]) / med[b],
                   "max abs diff vs base": float((outs[name].x - outs[b].x).abs().max())}
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


# --- 3. where the tuned sampler's per-step overhead goes ---------------------------------------------------------

def profile_table(args) -> list[dict]:
    B, dev = args.batch, args.device
    D = build_denoiser("none", dev)
    mdp, pol_step = build_mdp("step")
    _, pol_state = build_mdp("state")
    pol_step.to(dev).eval()
    pol_state.to(dev).eval()
    k = 3
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(B, 2, generator=gen) * float(mdp.ref_sigmas[k])).to(dev)
    sigma = torch.full((B,), float(mdp.ref_sigmas[k]), device=dev)
    state = State(x, sigma, torch.full((B,), k, device=dev, dtype=torch.long), None)
    open_loop = _OpenLoopActions(pol_step, mdp.steps, x)
    noise = SampleNoise(torch.arange(B, device=dev))
    act_det = pol_step.act(state, deterministic=True)
    s0, s1 = mdp.ref_sigmas[k].float().to(dev), mdp.ref_sigmas[k + 1].float().to(dev)
    n = args.calls
    cases = [
        ("base sampler: solvers.euler_step (shared sigma), no network", "base",
         lambda: solvers.euler_step(D, x, s0, s1)),
        ("MDP: SamplingMDP.knob_step (per-sample sigma, step knob), no network", "tuned",
         lambda: mdp.knob_step(D, state, act_det, noise)),
        ("PolicySampler, conditioning=step: the action of a step (_OpenLoopActions.act)", "tuned step",
         lambda: open_loop.act(state)),
        ("PolicySampler, conditioning=step: all N steps' actions, once per batch (_OpenLoopActions(...))",
         "tuned step, 1/N", lambda: _OpenLoopActions(pol_step, mdp.steps, x)),
        ("policy.act, conditioning=step, deterministic (the per-sample path it replaces)", "none",
         lambda: pol_step.act(state, deterministic=True)),
        ("policy.act, conditioning=state, deterministic (inference)", "tuned state",
         lambda: pol_state.act(state, deterministic=True)),
        ("policy.act, conditioning=step, sampled (training rollout)", "rollout",
         lambda: pol_step.act(state, deterministic=False)),
        ("policy.act, conditioning=state, sampled (training rollout)", "rollout",
         lambda: pol_state.act(state, deterministic=False)),
        ("finite-state guard: torch.isfinite(x).all()", "tuned", lambda: bool(torch.isfinite(x).all())),
        ("State(...) with torch.full k", "tuned",
         lambda: State(x, sigma, torch.full((B,), k, device=dev, dtype=torch.long), None)),
        ("SampleNoise.step draw (churn / renoise / ancestral only)", "not with euler + step", lambda: noise.step(k, x, Slot.STEP)),
        ("NoiseStream.step draw (base stochastic samplers)", "not with euler",
         lambda: NoiseStream(0, device=dev).step(k, x)),
    ]
    rows = []
    for label, used, fn in cases:
        with torch.no_grad():
            us = per_call_us(fn, dev, n)
        row = {"piece (batch %d)" % B: label, "per step in": used, "us/call": us}
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


# --- output ------------------------------------------------------------------------------------------------------

def machine(args) -> str:
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()
    try:
        load = "load average %.1f" % os.getloadavg()[0]
    except OSError:
        load = "load unknown"
    return (f"device {args.device} ({dev}), {os.cpu_count()} CPUs visible ({load}), torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, lightning {L.__version__}, python {platform.python_version()}, "
            f"repeats {args.repeats}, iterations {args.iterations} (+{args.warmup} warm-up)"
            f"{', quick' if args.quick else ''}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: stable timings)")
    p.add_argument("--repeats", type=int, default=15, help="interleaved rounds of the inference comparison")
    p.add_argument("--iterations", type=int, default=5, help="timed RL iterations per case")
    p.add_argument("--warmup", type=int, default=1, help="RL iterations run first and not timed")
    p.add_argument("--batches", type=int, nargs="+", default=[256, 1024], help="rollout batches of the split")
    p.add_argument("--batch", type=int, default=4096, help="batch of the inference comparison and the profile")
    p.add_argument("--calls", type=int, default=200, help="calls per round in the profile")
    p.add_argument("--denoisers", nargs="+", default=["analytic", "mlp", "none"],
                   choices=["analytic", "mlp", "none"], help="'none' (no network) is used by the inference table only")
    p.add_argument("--what", choices=["all", "iteration", "inference", "profile"], default="all")
    p.add_argument("--quick", action="store_true", help="small batches, few iterations and repeats: a smoke run")
    p.add_argument("--out", default=None, help="also write the tables as markdown to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in ("lightning.pytorch", "lightning.fabric"):   # keep the output to the tables
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")
    if args.quick:
        args.batches, args.batch, args.iterations, args.repeats, args.calls = [64], 512, 2, 3, 20
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")

    header = f"Machine: {machine(args)}"
    print(header, flush=True)
    sections = [header]
    tables = [
        ("iteration", f"## One RL iteration: rollout / discriminator (8 steps x 1024) / PPO (4 epochs x 4 minibatches) "
                      f"seconds, Euler {NFE} NFE, step knob, gmm8", iteration_table),
        ("inference", f"## Inference: tuned sampler vs base Euler at {NFE} NFE (medians of interleaved runs)",
         inference_table),
        ("profile", "## Per-call cost of the pieces of one step (no network; medians)", profile_table),
    ]
    for what, title, table in tables:
        if args.what not in ("all", what):
            continue
        print("\n" + title, flush=True)
        rows = table(args)
        sections.append(title + "\n\n" + markdown(rows))
        print("\n" + markdown(rows), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n\n".join(sections) + "\n")
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
