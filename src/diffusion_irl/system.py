"""``SamplerPolicyModule``: the alternating loop of ALGORITHM.md section 6 as a LightningModule.

One training "epoch" is one iteration (so checkpoints, resume and progress count iterations):

1. roll out ``rollout_batch`` trajectories per rank with the current policy, without gradients (states, actions,
   old log-probs, per-sample NFE; the noise is replayable from the per-sample seeds);
2. ``disc_steps`` discriminator steps on forward-noised training data vs the visited states at the same sigma,
   balanced per step;
3. rewards ``r_k = f-reward(logit(x_{k+1}, sigma_{k+1})) - nfe_cost * nfe_k`` from the updated discriminator,
   per-step weights, returns-to-go; advantages with the per-step mean baseline (or a value network with GAE),
   normalised per step over the global batch (gathered across ranks);
4. PPO: ``algo.epochs`` passes of ``algo.minibatches`` minibatches over the transitions.

All randomness of an iteration is a function of ``(seed, iteration, rank)``, so a run resumed from a checkpoint
continues exactly as it would have. Under DDP (``strategy: ddp_find_unused_parameters_true``) every manual backward
all-reduces the gradients of the part being trained; each rank rolls out its own trajectories.
A non-finite reward or loss stops the run before any optimiser step, so the last checkpoint stays a good one.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable

import lightning as L
import torch
from torch import Tensor, nn

from diffusion_irl.mdp.env import Rollout, SamplingMDP
from diffusion_irl.mdp.policies import ValueNet, frozen_copy
from diffusion_irl.rl.ppo import PPO, explained_variance, gae, normalise_per_step, ppo_loss
from diffusion_irl.rl.rewards import Reward, returns_to_go

SEED_STRIDE = 1_000_003


class NonFiniteError(FloatingPointError):
    """Raised when rewards or losses stop being finite (the run stops; the last checkpoint is kept)."""


class SamplerPolicyModule(L.LightningModule):
    """Args:
        denoiser: the fixed ``D(x, sigma[, labels])`` (frozen here).
        mdp: the sampling MDP (its base sampler and horizon); the policy must already be ``mdp.setup_policy``-ed.
        policy: a knob or transition policy. discriminator: a ``DiscriminatorModule``.
        reward: ``rl.rewards.Reward``. algo: ``rl.ppo.PPO``.
        train_data: training samples [n, *shape] (positives for the discriminator; never the held-out split).
        rollout_batch: trajectories per rank per iteration. disc_steps / disc_batch: K_d and its minibatch size.
        seed: the run's seed. evaluate: optional ``f(module) -> dict`` called on rank 0 every ``eval_every``
            iterations (held-out metrics, plots).
    """

    def __init__(self, denoiser: nn.Module, mdp: SamplingMDP, policy: nn.Module, discriminator: nn.Module,
                 reward: Reward, algo: PPO, train_data: Tensor, rollout_batch: int = 256, disc_steps: int = 4,
                 disc_batch: int = 1024, seed: int = 0, eval_every: int = 0,
                 evaluate: Callable[["SamplerPolicyModule"], dict[str, float]] | None = None):
        super().__init__()
        if rollout_batch < 2:
            raise ValueError(f"train.rollout_batch must be >= 2 (advantages need a batch), got {rollout_batch}")
        if disc_steps < 0 or disc_batch < 1:
            raise ValueError(f"train.disc_steps must be >= 0 and train.disc_batch >= 1, got {disc_steps}, {disc_batch}")
        self.automatic_optimization = False
        self.denoiser = denoiser.eval() if isinstance(denoiser, nn.Module) else denoiser
        if isinstance(self.denoiser, nn.Module):
            for p in self.denoiser.parameters():
                p.requires_grad_(False)
        self.mdp, self.policy, self.discriminator = mdp, policy, discriminator
        self.ref_policy = frozen_copy(policy) if algo.kl_coef > 0 else None
        self.value = ValueNet(train_data.shape[1:], mdp.horizon, sigma_data=getattr(policy, "sigma_data", 1.0)) \
            if algo.baseline == "value" else None
        self.reward, self.algo = reward, algo
        self.train_data = train_data
        self.shape = tuple(train_data.shape[1:])
        self.rollout_batch, self.disc_steps, self.disc_batch = int(rollout_batch), int(disc_steps), int(disc_batch)
        self.seed, self.eval_every, self.evaluate_fn = int(seed), int(eval_every), evaluate
        self.register_buffer("weights", reward.weights(mdp.horizon))
        self.register_buffer("nfe_spent", torch.zeros((), dtype=torch.float64))  # all ranks' rollouts, in checkpoints
        self.timings: dict[str, float] = {}

    # -- optimisers ----------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the policy has no trainable parameters")
        opts = [torch.optim.Adam(params, lr=self.algo.lr), self.discriminator.make_optimizer()]
        if self.value is not None:
            opts.append(torch.optim.Adam(self.value.parameters(), lr=self.algo.value_lr))
        return opts

    def train_dataloader(self):
        # one dummy batch per epoch: an epoch is one iteration of the loop
        return torch.utils.data.DataLoader([0], batch_size=1)

    # -- helpers -------------------------------------------------------------------------------------------------
    @property
    def iteration(self) -> int:
        return int(self.current_epoch)

    def _generator(self, purpose: int) -> torch.Generator:
        key = ((self.seed * 7919 + self.iteration) * 4099 + self.global_rank) * 16 + purpose
        return torch.Generator(device="cpu").manual_seed(key % (2**62))

    def rollout_seeds(self, iteration: int | None = None) -> Tensor:
        it = self.iteration if iteration is None else iteration
        start = ((self.seed * 100_003 + it) * 1024 + self.global_rank) * SEED_STRIDE
        return torch.arange(start, start + self.rollout_batch, dtype=torch.int64, device=self.device)

    def _guide(self):
        return self.discriminator if self.mdp.guidance == "dg" else None

    def rollout(self, iteration: int | None = None) -> Rollout:
        return self.mdp.rollout(self.denoiser, self.policy, self.rollout_seeds(iteration), self.shape,
                                discriminator=self._guide())

    def _gather_stats(self, values: Tensor) -> tuple[Tensor, Tensor]:
        """Per-step mean and std of ``values`` [B, N] over the global batch (all ranks)."""
        g = self.all_gather(values.detach())
        g = g.reshape(-1, values.shape[1]) if g.ndim == 3 else g
        return g.mean(0), (g.std(0) if g.shape[0] > 1 else torch.ones_like(g[0]))

    @staticmethod
    def _check_finite(name: str, value: Tensor, iteration: int):
        if not torch.isfinite(value).all():
            raise NonFiniteError(f"non-finite {name} at iteration {iteration}: the run stops here; the last checkpoint "
                                 "(checkpoints/last.ckpt) holds the last good state")

    # -- one iteration -------------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        opts = self.optimizers()
        opt_pi, opt_d = opts[0], opts[1]
        opt_v = opts[2] if self.value is not None else None
        it = self.iteration
        logs: dict[str, float] = {}

        t0 = time.perf_counter()
        self.policy.eval()
        # knob policies draw their actions from torch's global generators: seed them from (seed, iteration, rank)
        # too, or a run resumed from a checkpoint would not continue as the uninterrupted one
        torch.manual_seed(self._generator(0).initial_seed())
        ro = self.rollout()
        self.nfe_spent += self.all_gather(ro.nfe.sum().to(torch.float64)).sum()
        t1 = time.perf_counter()

        # 2. discriminator: forward-noised training data vs visited states, same sigma, balanced per step
        N, B = ro.sigma.shape
        fake = ro.x_next.flatten(0, 1)
        sig = ro.sigma_next.flatten()
        steps = torch.arange(N, device=self.device).repeat_interleave(B)
        g = self._generator(1)
        idx = torch.randint(len(self.train_data), (N * B,), generator=g)
        x0 = self.train_data[idx].to(self.device)
        real = x0 + sig.view(-1, *([1] * len(self.shape))) * torch.randn(x0.shape, generator=g).to(self.device)
        self.discriminator.train()
        d_diag: dict[str, Tensor] = {}
        for _ in range(self.disc_steps):
            mb = torch.randperm(N * B, generator=g)[: self.disc_batch].to(self.device)
            loss_d, d_diag = self.discriminator.loss(real[mb], fake[mb], sig[mb], sig[mb], steps[mb], steps[mb], N)
            self._check_finite("discriminator loss", loss_d, it)
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(loss_d)
            opt_d.step()
        t2 = time.perf_counter()

        # 3. rewards, returns, advantages
        self.discriminator.eval()
        with torch.no_grad():
            logits = torch.cat([self.discriminator(fake[i:i + 8192], sig[i:i + 8192]) for i in range(0, N * B, 8192)])
            logits = logits.view(N, B)
            acc_fake = (logits < 0).float().mean(1)
            r = self.reward(logits) - self.reward.nfe_cost * ro.nfe       # [N, B]
        self._check_finite("rewards", r, it)
        rewards = (r * self.weights.unsqueeze(1)).T                        # [B, N], weighted
        tr = ro.transitions()
        if self.value is not None:
            with torch.no_grad():
                v = self.value(tr["x"], tr["sigma"], tr["k"]).view(N, B).T
            adv, targets = gae(rewards, v, self.algo.gae_lambda)
        else:
            adv = returns_to_go(r.T, self.weights)
            targets = None
        mean, std = self._gather_stats(adv)
        adv = normalise_per_step(adv, mean, std) if self.algo.normalise else adv - mean
        tr["adv"] = adv.T.flatten()                                        # step-major, like the transitions
        if targets is not None:
            tr["target"] = targets.T.flatten()

        # 4. PPO
        self.policy.train()
        M = int(tr["mask"].sum())
        keep = tr["mask"].nonzero().squeeze(1)
        mb_size = max(1, math.ceil(M / self.algo.minibatches))
        diags: list[dict[str, Tensor]] = []
        for _ in range(self.algo.epochs):
            perm = keep[torch.randperm(M, generator=g).to(self.device)]
            for start in range(0, M, mb_size):
                sel = perm[start:start + mb_size]
                mb = {key: val[sel] for key, val in tr.items()}
                logp, ent = self.policy.log_prob(mb)
                logp_ref = self.ref_policy.log_prob(mb)[0] if self.ref_policy is not None else None
                loss, diag = ppo_loss(logp, mb["logp"], mb["adv"], self.algo.clip_eps, logp_ref, self.algo.kl_coef,
                                      ent, self.algo.ent_coef)
                self._check_finite("PPO loss", loss, it)
                opt_pi.zero_grad(set_to_none=True)
                self.manual_backward(loss)
                if self.algo.max_grad_norm is not None:
                    diag["ppo/grad_norm"] = torch.nn.utils.clip_grad_norm_(
                        [p for p in self.policy.parameters() if p.requires_grad], self.algo.max_grad_norm)
                opt_pi.step()
                if self.value is not None:
                    pred = self.value(mb["x"], mb["sigma"], mb["k"])
                    v_loss = self.algo.value_coef * (pred - mb["target"]).pow(2).mean()
                    self._check_finite("value loss", v_loss, it)
                    opt_v.zero_grad(set_to_none=True)
                    self.manual_backward(v_loss)
                    opt_v.step()
                    diag["ppo/value_loss"] = v_loss.detach()
                    diag["ppo/explained_variance"] = explained_variance(pred.detach(), mb["target"])
                diags.append(diag)
        t3 = time.perf_counter()

        # 5. log
        for key in diags[0] if diags else []:
            logs[key] = float(torch.stack([d[key].float() for d in diags]).mean())
        for key, val in d_diag.items():
            if val.ndim == 0:
                logs[key] = float(val)
        logs["disc/acc_fake"] = float(acc_fake.mean())
        for k in range(N):
            logs[f"disc_step/acc_fake_{k:02d}"] = float(acc_fake[k])
            logs[f"reward_step/mean_{k:02d}"] = float(r[k].mean())
            logs[f"reward_step/std_{k:02d}"] = float(r[k].std())
        logs["reward/mean"] = float(r.mean())
        logs["reward/return"] = float((r * self.weights.unsqueeze(1)).sum(0).mean())
        logs["reward/terminal_logit"] = float(logits[-1].mean())
        logs["rollout/nfe"] = float(ro.nfe.sum(0).mean())
        for name, val in ro.knob_values.items():
            logs[f"knob/{name}_mean"] = float(val.mean())
        for name, sched in self.policy.schedule().items():
            for k, v in enumerate(sched.tolist()):
                logs[f"schedule/{name}_{k:02d}"] = float(v)
        self.timings = {"rollout": t1 - t0, "discriminator": t2 - t1, "ppo": t3 - t2}
        for key, val in self.timings.items():
            logs[f"time/{key}_s"] = val
        self.log_dict(logs, on_step=False, on_epoch=True, batch_size=1)
        self.log("reward", logs["reward/mean"], prog_bar=True, on_epoch=True, batch_size=1)
        self.log("d_acc", logs.get("disc/acc", float("nan")), prog_bar=True, on_epoch=True, batch_size=1)
        self.log("kl", logs.get("ppo/approx_kl", float("nan")), prog_bar=True, on_epoch=True, batch_size=1)

    def on_train_epoch_end(self) -> None:
        it = self.iteration + 1
        if self.evaluate_fn is not None and self.eval_every > 0 and it % self.eval_every == 0:
            if self.trainer.is_global_zero:
                metrics = self.evaluate_fn(self)
                shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
                print(f"iteration {it}: held-out {shown} (reward {self.trainer.callback_metrics.get('reward', float('nan')):.3f})")
                for key, val in metrics.items():
                    self.log(f"eval/{key}", float(val), rank_zero_only=True, batch_size=1)
