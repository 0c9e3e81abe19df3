"""Our samplers against diffusers' scheduler loops: speed on the same network and batch, and peak memory vs steps.

    python benchmarks/bench_samplers.py                     # full run (CPU: ~10 min on 2 shared cores)
    python benchmarks/bench_samplers.py --quick             # smoke run (small batches, few steps)
    python benchmarks/bench_samplers.py --device cuda --repeats 9 --out benchmarks/results.md

Speed: for each network (a 2D MLP at batch 4096, a digits-sized 1x8x8 U-Net at batch 256; randomly initialised,
since speed does not depend on training; and a trivial ``eps = 0.1 x`` at batch 4096, which leaves only the
samplers' own per-step overhead) and each sampler, our config-facing sampler (``Sampler.sample`` over
``VPEpsDenoiser``, schedule ``DiscreteVPSchedule(spacing="leading")``) and diffusers' equivalent scheduler loop
(``set_timesteps``, initial noise, ``for t in timesteps: eps = model(scale_model_input(x, t), t); x = step(...)``)
run on the same epsilon network and batch at the same number of steps. Both sides are timed from "network and
batch size given" to "final samples" (schedule, initial noise, loop). Repetitions of the two are interleaved (order
alternating) after one warm-up each; the table reports median times, and as the ratio the median over rounds of
(ours / diffusers) within a round, which cancels the load drift of a shared machine. Parity of the results is tested in
``tests/test_diffusers_parity.py``; here only time is compared.

Memory: each measurement runs in a fresh subprocess: a 2-step warm-up of the same sampler (every code path once),
then the peak resident set size is reset to the current one (Linux ``/proc/self/clear_refs``) and the run of
``steps`` steps, with or without ``trajectory=True``, reports its peak RSS above the RSS before it (``VmHWM - VmRSS``;
on CUDA also ``torch.cuda.max_memory_allocated`` above the memory allocated before the run). The claim checked: the
peak does not grow with the number of steps unless trajectories are kept (then it grows by one state per step).
The children run with ``MALLOC_MMAP_THRESHOLD_=65536`` (blocks of 64 KiB and more are mmapped and returned on free):
with glibc's adaptive threshold, heap fragmentation made a kept 200-state trajectory cost 2x its size in some runs.
The exact Gaussian denoiser isolates the sampler's own memory; the U-Net rows add a real network's activations.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from diffusion_irl.denoisers.networks import MLP, UNet
from diffusion_irl.denoisers.precond import VPEpsDenoiser
from diffusion_irl.sampling.noise import NoiseStream
from diffusion_irl.sampling.samplers import Ancestral, DPMpp2M, Euler, Heun, Sampler
from diffusion_irl.sampling.schedules import DiscreteVPSchedule, ddpm_alphas_cumprod
from tables import format_row, markdown, sync  # benchmarks/tables.py (the script's own folder)

T = 1000          # training timesteps of the discrete VP schedule (linear betas 1e-4 .. 0.02)
SPACING = "leading"  # the one spacing in which every diffusers scheduler steps exactly between its own timesteps


# --- networks ----------------------------------------------------------------------------------------------------

class EpsNet(nn.Module):
    """An epsilon model ``eps(x_vp, t)`` from one of our raw networks ``F(x, c)``, with ``c = t / T``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.net(x, torch.as_tensor(t, device=x.device).to(x.dtype) / T)


class TrivialEps(nn.Module):
    """``eps(x, t) = 0.1 x``: a network that costs (almost) nothing, so the time left is the sampler's own
    per-step overhead (schedule arithmetic, noise, the denoiser wrapper, Python and dispatch)."""

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return 0.1 * x


class GaussianDenoiser(nn.Module):
    """Exact denoiser of N(0, I) data, ``D(x, sigma) = x / (1 + sigma^2)``: costs nothing, so the memory measured
    around it is the sampler's own."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.shape = shape

    def forward(self, x: Tensor, sigma) -> Tensor:
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))
        return x / (1 + s**2)


def build_network(name: str, device: str) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    if name == "mlp":
        net, shape = MLP(2, hidden=256, depth=4, emb_dim=64), (2,)
    elif name == "trivial":
        return TrivialEps().to(device), (2,)
    elif name == "unet":
        net, shape = UNet(1, base_channels=32, channel_mults=(1, 2), num_res_blocks=1, emb_dim=128), (1, 8, 8)
        nn.init.normal_(net.conv_out.weight, std=0.05)  # zero-initialised for training; give it a non-trivial output
    else:
        raise ValueError(name)
    return EpsNet(net).to(device).eval().requires_grad_(False), shape


NETWORK_LABEL = {"mlp": "MLP 2D (256x4)", "unet": "U-Net 1x8x8 (32, [1,2])", "gaussian": "exact Gaussian D",
                 "trivial": "none: eps = 0.1 x (overhead only)"}


# --- samplers: ours and diffusers' -------------------------------------------------------------------------------

def our_sampler(name: str) -> Sampler:
    schedule = DiscreteVPSchedule(T, spacing=SPACING)
    return {"ddim": lambda: Ancestral(schedule, eta=0.0), "euler": lambda: Euler(schedule),
            "euler_ancestral": lambda: Ancestral(schedule, eta=1.0), "heun": lambda: Heun(schedule),
            "dpmpp_2m": lambda: DPMpp2M(schedule)}[name]()


def diffusers_scheduler(name: str):
    import diffusers

    kw = dict(num_train_timesteps=T, beta_schedule="linear", timestep_spacing=SPACING)
    if name == "ddim":
        return diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=True, **kw)
    if name == "euler":
        return diffusers.EulerDiscreteScheduler(**kw)
    if name == "euler_ancestral":
        return diffusers.EulerAncestralDiscreteScheduler(**kw)
    if name == "heun":
        return diffusers.HeunDiscreteScheduler(**kw)
    if name == "dpmpp_2m":
        return diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **kw)
    raise ValueError(name)


SAMPLERS = ["ddim", "euler", "euler_ancestral", "heun", "dpmpp_2m"]
DIFFUSERS_NAME = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
                  "euler_ancestral": "EulerAncestralDiscreteScheduler", "heun": "HeunDiscreteScheduler",
                  "dpmpp_2m": "DPMSolverMultistepScheduler"}


@torch.no_grad()
def run_ours(sampler: Sampler, D: nn.Module, shape: tuple[int, ...], steps: int, device: str, seed: int = 0):
    out = sampler.sample(D, shape, steps, NoiseStream(seed, device=device))
    return out.x, out.nfe


@torch.no_grad()
def run_diffusers(sched, eps_model: nn.Module, shape: tuple[int, ...], steps: int, device: str, seed: int = 0,
                  stochastic: bool = False):
    sched.set_timesteps(steps, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(shape, generator=g, device=device) * sched.init_noise_sigma
    kw = {"generator": g} if stochastic else {}
    nfe = 0
    for t in sched.timesteps:
        eps = eps_model(sched.scale_model_input(x, t), t)
        nfe += 1
        x = sched.step(eps, t, x, **kw).prev_sample
    return x, nfe


# --- timing ------------------------------------------------------------------------------------------------------

def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int, device: str) -> dict[str, list[float]]:
    """One warm-up each, then ``repeats`` rounds running every function once (order alternating between rounds).
    Returns the seconds of every round, so that ratios can be taken within a round (same machine load)."""
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    for r in range(repeats):
        for k in order if r % 2 == 0 else order[::-1]:
            sync(device)
            t0 = time.perf_counter()
            fns[k]()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return times


def speed_table(args) -> list[dict]:
    cases = [("mlp", 512 if args.quick else 4096), ("unet", 32 if args.quick else 256),
             ("trivial", 512 if args.quick else 4096)]
    steps_list = [5] if args.quick else [10, 50]
    rows = []
    for net_name, batch in cases:
        eps_model, shape = build_network(net_name, args.device)
        D = VPEpsDenoiser(eps_model, ddpm_alphas_cumprod(T), shape).to(args.device)
        full = (batch, *shape)
        for sampler_name in SAMPLERS:
            for steps in steps_list:
                ours, sched = our_sampler(sampler_name), diffusers_scheduler(sampler_name)
                nfe = {"ours": run_ours(ours, D, full, steps, args.device)[1],
                       "diffusers": run_diffusers(sched, eps_model, full, steps, args.device,
                                                  stochastic=sampler_name == "euler_ancestral")[1]}
                times = interleaved_times({
                    "ours": lambda: run_ours(ours, D, full, steps, args.device),
                    "diffusers": lambda: run_diffusers(sched, eps_model, full, steps, args.device,
                                                       stochastic=sampler_name == "euler_ancestral"),
                }, args.repeats, args.device)
                med = {k: statistics.median(v) for k, v in times.items()}
                # the ratio is the median of within-round ratios: both sides of a round ran under the same load
                ratio = statistics.median(a / b for a, b in zip(times["ours"], times["diffusers"]))
                row = {"network": NETWORK_LABEL[net_name], "batch": batch, "sampler": sampler_name,
                       "diffusers": DIFFUSERS_NAME[sampler_name], "steps": steps,
                       "NFE ours/diffusers": f"{nfe['ours']}/{nfe['diffusers']}",
                       "ours us/sample": 1e6 * med["ours"] / batch,
                       "diffusers us/sample": 1e6 * med["diffusers"] / batch,
                       "ours - diffusers ms/step": 1e3 * (med["ours"] - med["diffusers"]) / steps,
                       "ratio ours/diffusers": ratio}
                rows.append(row)
                print(format_row(row), flush=True)
    return rows


# --- memory ------------------------------------------------------------------------------------------------------

def _proc_status_mib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to /proc/self/clear_refs resets the peak RSS (VmHWM) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    hwm = _proc_status_mib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def memory_child(spec: dict) -> dict:
    """Runs in a fresh process: the peak memory of one sampling run above the memory in use before it.

    CPU: the peak RSS is reset to the current RSS just before the run (``/proc/self/clear_refs``), so the increase
    is the run's own high-water mark above what was resident (one step's temporaries, plus any kept states).
    Without clear_refs it falls back to ``ru_maxrss`` above the 2-step warm-up's peak, which hides growth smaller
    than the warm-up's temporaries."""
    device = spec["device"]
    torch.set_num_threads(spec["threads"])
    if spec["network"] == "gaussian":
        shape = tuple(spec["shape"])
        D = GaussianDenoiser(shape)
    else:
        eps_model, shape = build_network(spec["network"], device)
        D = VPEpsDenoiser(eps_model, ddpm_alphas_cumprod(T), shape).to(device)
    full = (spec["batch"], *shape)
    sampler = our_sampler(spec["sampler"])
    noise = NoiseStream(0, device=device)
    with torch.no_grad():
        sampler.sample(D, full, 2, noise)  # warm-up: every code path and one network call's activations
        gc.collect()
        sync(device)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        reset = _reset_peak_rss()
        base_rss = _proc_status_mib("VmRSS") if reset else _peak_rss_mib()
        out = sampler.sample(D, full, spec["steps"], noise, trajectory=spec["trajectory"])
        sync(device)
        peak_rss = _peak_rss_mib()
        res = {"rss_increase_mib": peak_rss - base_rss, "rss_method": "VmHWM-VmRSS" if reset else "ru_maxrss",
               "kept_states": len(out.trajectory) if out.trajectory is not None else 0,
               "state_mib": out.x.numel() * out.x.element_size() / 2**20}
        if device.startswith("cuda"):
            res["cuda_peak_increase_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return res


def memory_table(args) -> list[dict]:
    steps_list = [5, 20] if args.quick else [10, 50, 200]
    cases = [("gaussian", (1, 32, 32), 64 if args.quick else 256, s) for s in ("euler", "euler_ancestral", "dpmpp_2m")]
    cases.append(("unet", None, 32 if args.quick else 256, "euler_ancestral"))
    rows = []
    for network, shape, batch, sampler in cases:
        for steps in steps_list:
            for trajectory in (False, True):
                spec = dict(network=network, shape=shape, batch=batch, sampler=sampler, steps=steps,
                            trajectory=trajectory, device=args.device, threads=torch.get_num_threads())
                # A fixed mmap threshold: glibc's default (adaptive) one serves freed-and-reallocated state-sized
                # blocks from the heap, whose fragmentation doubled the RSS of a kept trajectory in some runs.
                env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "65536")}
                proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", json.dumps(spec)],
                                      capture_output=True, text=True, check=False, env=env)
                if proc.returncode != 0:
                    raise RuntimeError(f"memory child failed for {spec}:\n{proc.stderr}")
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                row = {"denoiser": NETWORK_LABEL[network], "batch": batch,
                       "state MiB": res["state_mib"], "sampler": sampler, "steps": steps,
                       "trajectory": trajectory, "kept states": res["kept_states"],
                       "kept MiB": res["kept_states"] * res["state_mib"],
                       "peak RSS increase MiB": res["rss_increase_mib"]}
                if "cuda_peak_increase_mib" in res:
                    row["CUDA peak increase MiB"] = res["cuda_peak_increase_mib"]
                rows.append(row)
                print(format_row(row), flush=True)
    return rows


# --- output ------------------------------------------------------------------------------------------------------

def machine(args) -> str:
    import diffusers

    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()
    return (f"device {args.device} ({dev}), {os.cpu_count()} CPUs visible, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, diffusers {diffusers.__version__}, "
            f"python {platform.python_version()}, "
            f"repeats {args.repeats}{', quick' if args.quick else ''}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions of each side (median reported)")
    p.add_argument("--quick", action="store_true", help="small batches and few steps: a smoke run")
    p.add_argument("--out", default=None, help="also write the tables as markdown to this file")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--what", choices=["all", "speed", "memory"], default="all")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child is not None:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return

    header = f"Machine: {machine(args)}"
    print(header, flush=True)
    sections = [header]
    if args.what in ("all", "speed"):
        print("\n## Speed: ours vs diffusers (same network, batch, steps; medians, interleaved)", flush=True)
        rows = speed_table(args)
        sections.append("## Speed: ours vs diffusers (same network, batch, steps; medians of interleaved runs)\n\n"
                        + markdown(rows))
        print("\n" + markdown(rows), flush=True)
    if args.what in ("all", "memory"):
        print("\n## Peak memory vs steps (fresh subprocess each)", flush=True)
        rows = memory_table(args)
        sections.append("## Peak memory vs number of steps (fresh subprocess per row; peak RSS above the RSS before "
                        "the run)"
                        "\n\n" + markdown(rows))
        print("\n" + markdown(rows), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n\n".join(sections) + "\n")
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
