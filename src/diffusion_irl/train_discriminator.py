"""``python -m diffusion_irl.train_discriminator``: train a noise-conditional discriminator against a FIXED sampler.

The discriminator-guidance setting (Kim et al. 2023) and the first half of the IRL loop (docs/method.md section 4),
with the policy frozen at the base sampler:

1. The sampler (``sampler@sampler``, budget ``train.nfe`` -> steps) draws ``train.num_fake`` trajectories once
   (plus ``train.num_heldout`` more for the final accuracy), with noise streams disjoint from the evaluator's.
   Negatives ("fake"): every visited state ``x_next`` with its ``sigma_next`` and step index; with
   ``train.terminal_only=true`` only the final samples, either at sigma 0 (``train.noise_terminal=false``) or, as in
   the DG paper, forward-noised at a uniformly drawn level of the schedule (``train.noise_terminal=true``, sigma 0
   included as the last step).
2. Positives ("real"): training-split data forward-noised at the SAME sigma as the fake state they are paired with
   (fresh data and noise at every batch), so the loss is balanced per step.
3. Lightning fits the :class:`~diffusion_irl.discriminator.module.DiscriminatorModule`; checkpoints go to
   ``<run dir>/checkpoints/`` (``last.ckpt`` is what ``samplers.dg.discriminator_path`` expects); the held-out
   accuracy (held-out data vs held-out trajectories), overall and per step, is printed and returned.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence

import hydra
import lightning as L
import torch
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from diffusion_irl.config import (ConfigError, build, exit_on_config_error, require, require_bool, require_int,
                                  require_str)
from diffusion_irl.runs import build_logger, check_run_dir, output_dir, warn_unread_additions
from diffusion_irl.discriminator.module import DiscriminatorModule, forward_noise, paired_batch
from diffusion_irl.sampling.noise import NoiseStream
from diffusion_irl.seeding import derive_seed, generator, sample_seeds
from diffusion_irl.sampling.samplers import Sampler



def check_config(cfg: DictConfig) -> None:
    require_int(cfg, "seed", min=0, max=2**32 - 1)
    require_bool(cfg, "overwrite")
    require_str(cfg, "device")
    for key in ("nfe", "num_fake", "num_heldout", "batch_size", "generate_batch_size"):
        require_int(cfg, f"train.{key}", min=1, max=10**9)
    for key in ("terminal_only", "noise_terminal"):
        require_bool(cfg, f"train.{key}")


def generate_states(sampler: Sampler, denoiser, shape: Sequence[int], steps: int, num: int, seed: int,
                    batch_size: int, device: str | torch.device = "cpu", terminal_only: bool = False):
    """Run the sampler on ``num`` trajectories (per-sample noise from ``sample_seeds(num, "fake-states", seed)``,
    so the states do not depend on ``batch_size``) and return the fake states
    ``(x [M, *shape], sigma [M], step [M])`` on CPU: every visited ``x_next`` with its ``sigma_next`` and step index,
    or only the final samples (sigma 0, the last step) when ``terminal_only``."""
    xs, sigmas, idx = [], [], []
    per_sample = sample_seeds(num, "fake-states", seed, device=device)
    for start in range(0, num, batch_size):
        n = min(batch_size, num - start)
        noise = NoiseStream(device=device, seeds=per_sample[start:start + n])

        def keep(info):
            xs.append(info.x_next.detach().float().cpu())
            sigmas.append(info.sigma_next.detach().float().cpu())
            idx.append(torch.full((n,), info.step, dtype=torch.long))

        out = sampler.sample(denoiser, (n, *shape), steps, noise, callback=None if terminal_only else keep)
        if terminal_only:
            xs.append(out.x.detach().float().cpu())
            sigmas.append(torch.zeros(n))
            idx.append(torch.full((n,), len(out.sigmas) - 2, dtype=torch.long))
    return torch.cat(xs), torch.cat(sigmas), torch.cat(idx)


class PairedBatches:
    """``collate_fn`` turning indices of fake states into ``(real, fake, sigma_real, sigma_fake, step_real,
    step_fake)``: each fake state is paired with a random data point forward-noised at its sigma. With ``levels``
    ([N] sigmas, step k at ``levels[k]``), the fake samples are themselves forward-noised at a uniformly drawn step."""

    def __init__(self, data: Tensor, fake: Tensor, sigma: Tensor, step: Tensor, levels: Tensor | None = None,
                 generator: torch.Generator | None = None):
        self.data, self.fake, self.sigma, self.step, self.levels, self.generator = data, fake, sigma, step, levels, generator

    def __len__(self) -> int:
        return len(self.fake)

    def __call__(self, indices: Sequence[int]):
        generator = self.generator
        idx = torch.as_tensor(indices, dtype=torch.long)
        fake, sigma, step = self.fake[idx], self.sigma[idx], self.step[idx]
        if self.levels is not None:
            step = torch.randint(len(self.levels), (len(idx),), generator=generator)
            sigma = self.levels[step]
            fake = forward_noise(fake, sigma, generator)
        return paired_batch(self.data, fake, sigma, step, generator).as_tuple()


def heldout_set(pairs: PairedBatches, batch_size: int) -> TensorDataset:
    """All held-out pairs, drawn once (fixed generator) so every validation sees the same set."""
    parts = [pairs(range(i, min(i + batch_size, len(pairs)))) for i in range(0, len(pairs), batch_size)]
    return TensorDataset(*(torch.cat(cols) for cols in zip(*parts)))


def train_discriminator(cfg: DictConfig) -> float:
    """Run one job from a composed config (needs a Hydra context for ``${hydra:...}``); returns held-out accuracy."""
    check_config(cfg)
    warn_unread_additions(cfg)
    t = cfg.train
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build(cfg, "data")
    datamodule.prepare_data()
    sampler = build(cfg, "sampler")
    require(isinstance(sampler, Sampler), f"sampler must build a Sampler, got {type(sampler).__name__}")
    steps = sampler.steps_for_budget(t.nfe)
    require(steps is not None, f"train.nfe={t.nfe} is too small for sampler {sampler.name} (its fewest steps cost "
                               f"{sampler.planned_nfe(sampler.min_steps)} NFE)")
    module = build(cfg, "discriminator")
    require(isinstance(module, DiscriminatorModule),
            f"discriminator must build a DiscriminatorModule, got {type(module).__name__}")
    shape = tuple(datamodule.shape)
    if module.shape is not None and tuple(module.shape) != shape:
        raise ConfigError(f"the discriminator works on shape {tuple(module.shape)} but data={datamodule.name} has "
                          f"shape {shape}")
    denoiser = build(cfg, "denoiser")
    den_shape = tuple(getattr(denoiser, "shape", shape))
    require(den_shape == shape, f"the denoiser works on samples of shape {den_shape} but data={datamodule.name} has "
                                f"shape {shape}: pick a denoiser trained on this data")
    device = torch.device(cfg.device)
    if isinstance(denoiser, torch.nn.Module):
        denoiser = denoiser.to(device).eval().requires_grad_(False)
    check_run_dir(output_dir(), overwrite=cfg.overwrite, markers=("checkpoints/last.ckpt",))
    logger = build_logger(cfg)
    checkpoint = build(cfg, "checkpoint", enable_version_counter=False)
    trainer = build(cfg, "trainer", callbacks=[checkpoint], logger=logger)

    levels = sampler.sigmas(steps)[1:].float() if t.terminal_only and t.noise_terminal else None
    fakes = {}
    for split, num in (("train", t.num_fake), ("heldout", t.num_heldout)):
        fakes[split] = generate_states(sampler, denoiser, shape, steps, num, derive_seed("fake-states", split, cfg.seed),
                                       t.generate_batch_size, device, t.terminal_only)
    num_steps = steps if levels is None else len(levels)
    num_steps = max(num_steps, int(fakes["train"][2].max()) + 1)
    train_pairs = PairedBatches(datamodule.train_samples(), *fakes["train"], levels=levels)
    held = heldout_set(PairedBatches(datamodule.heldout(), *fakes["heldout"], levels=levels,
                                     generator=generator("heldout-pairs", cfg.seed)), t.batch_size)
    train_loader = DataLoader(range(len(train_pairs)), batch_size=t.batch_size, shuffle=True,
                              drop_last=len(train_pairs) > t.batch_size, collate_fn=train_pairs)
    trainer.fit(module, train_dataloaders=train_loader,
                val_dataloaders=DataLoader(held, batch_size=t.batch_size, shuffle=False))

    module.eval()
    with torch.no_grad():
        real, fake, s_real, s_fake, k_real, k_fake = (c.to(module.device) for c in held.tensors)
        _, diag = module.loss(real, fake, s_real, s_fake, k_real, k_fake, num_steps=num_steps, r1_gamma=0.0)
    acc = float(diag["disc/acc"])
    if trainer.is_global_zero:
        per_step = ", ".join("-" if math.isnan(a) else f"{a:.3f}" for a in diag["disc/acc_per_step"].tolist())
        print(f"checkpoint: {os.path.join(checkpoint.dirpath, 'last.ckpt')}")
        print(f"{sampler.name}, {steps} steps ({sampler.planned_nfe(steps)} NFE): held-out accuracy {acc:.4f} "
              f"(per step: {per_step})")
    return acc


@hydra.main(version_base="1.3", config_path="../../conf", config_name="train_discriminator")
@exit_on_config_error
def main(cfg: DictConfig) -> float:
    return train_discriminator(cfg)


if __name__ == "__main__":
    main()
