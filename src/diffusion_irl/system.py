"""``SamplerPolicyModule``: the alternating loop of docs/method.md section 6 as a LightningModule.

One training "epoch" is one iteration (so checkpoints, resume and progress count iterations), in named stages:

1. :meth:`~SamplerPolicyModule.collect_rollout`: ``rollout_batch`` trajectories per rank with the current policy,
   without gradients (states, actions, old log-probs, per-sample NFE; the noise is replayable from per-sample seeds);
2. :meth:`~SamplerPolicyModule.fit_discriminator`: ``disc_steps`` steps on forward-noised training data vs the
   visited states at the same sigma, balanced per step;
3. :meth:`~SamplerPolicyModule.score_rollout` and :meth:`~SamplerPolicyModule.advantages`: rewards
   ``r_k = f-reward(logit(x_{k+1}, sigma_{k+1})) - nfe_cost * nfe_k`` from the updated discriminator, per-step
   weights, returns-to-go; advantages with the per-step mean baseline (or a value network with GAE), normalised per
   step over the global batch (gathered across ranks);
4. :meth:`~SamplerPolicyModule.update_policy`: :func:`~diffusion_irl.rl.ppo.ppo_update`;
5. :meth:`~SamplerPolicyModule.log_iteration`: run-level scalars (``reward/``, ``disc/``, ``ppo/``, ``time/``) and
   the per-step diagnostics as one table per iteration (``per_step``), not as dozens of scalar keys.

All randomness of an iteration is derived from ``(seed, iteration, rank)`` (:mod:`diffusion_irl.seeding`), so a run
resumed from a checkpoint continues exactly as it would have. Under DDP (``strategy: ddp_find_unused_parameters_true``)
every manual backward all-reduces the gradients of the part being trained; each rank rolls out its own trajectories.
A non-finite reward or loss stops the run before any optimiser step, so the last checkpoint stays a good one.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import lightning as L
import torch
from torch import Tensor, nn

from diffusion_irl.discriminator.module import paired_batch
from diffusion_irl.mdp.env import Rollout, SamplingMDP
from diffusion_irl.mdp.policies import ValueNet, frozen_copy
from diffusion_irl.rl.ppo import PPO, gae, normalise_per_step, ppo_update
from diffusion_irl.rl.rewards import Reward, returns_to_go
from diffusion_irl.runs import record, report
from diffusion_irl.seeding import generator, sample_seeds

LOGIT_CHUNK = 8192  # states scored by the discriminator per call when computing rewards


class NonFiniteError(FloatingPointError):
    """Raised when rewards or losses stop being finite (the run stops; the last checkpoint is kept)."""


class DivergenceError(NonFiniteError):
    """Raised when training diverges (approx-KL, exploding policy parameters or gradients, a discriminator stuck at
    accuracy 0 or 1): the run stops like on a non-finite loss, and the last checkpoint is kept."""


@dataclass
class DivergenceLimits:
    """When the loop counts as diverged (``system.`` keys; see conf/system/default.yaml).

    max_approx_kl: PPO's approx-KL above this for ``patience`` consecutive iterations (null: no check).
    max_policy_param: the policy's largest absolute parameter above this, or any non-finite one: at once.
    max_policy_grad_norm: PPO's gradient norm (``ppo/grad_norm``, before clipping) above this, or non-finite: at
        once.
    disc_patience: consecutive iterations with the discriminator's accuracy within ``DISC_STUCK_TOL`` of 0 or 1
        (0: no check).
    """

    max_approx_kl: float | None = 10.0
    patience: int = 3
    max_policy_param: float | None = 1.0e6
    max_policy_grad_norm: float | None = 1.0e8
    disc_patience: int = 10


DISC_STUCK_TOL = 1e-3


@dataclass
class Scores:
    """The discriminator's view of a rollout: ``logits`` [N, B] of the visited states and the rewards [N, B]."""

    logits: Tensor
    rewards: Tensor


class SamplerPolicyModule(L.LightningModule):
    """Args:
        denoiser: the fixed ``D(x, sigma[, labels])`` (frozen here).
        mdp: the sampling MDP (its base sampler and horizon); the policy must already be ``mdp.setup_policy``-ed.
        policy: a knob or transition policy. discriminator: a ``DiscriminatorModule``.
        reward: ``rl.rewards.Reward``. algo: ``rl.ppo.PPO``.
        train_data: training samples [n, *shape] (positives for the discriminator; never the held-out split).
        train_labels: their classes [n], for a label-conditional discriminator (``discriminator.net.num_classes >
            0``): each visited state is then compared with training points of its own trajectory's label.
        rollout_batch: trajectories per rank per iteration. disc_steps / disc_batch: K_d and its minibatch size.
        seed: the run's seed. evaluate: optional ``f(module) -> dict`` called on rank 0 every ``eval_every``
            iterations (held-out metrics, plots).
        max_approx_kl, patience, max_policy_param, max_policy_grad_norm, disc_patience: when the run counts as
            diverged (:class:`DivergenceLimits`; :class:`DivergenceError` stops it).
    """

    def __init__(self, denoiser: nn.Module, mdp: SamplingMDP, policy: nn.Module, discriminator: nn.Module,
                 reward: Reward, algo: PPO, train_data: Tensor, rollout_batch: int = 256, disc_steps: int = 4,
                 disc_batch: int = 1024, seed: int = 0, eval_every: int = 0,
                 evaluate: Callable[["SamplerPolicyModule"], dict[str, float]] | None = None,
                 max_approx_kl: float | None = 10.0, patience: int = 3, max_policy_param: float | None = 1.0e6,
                 max_policy_grad_norm: float | None = 1.0e8, disc_patience: int = 10,
                 train_labels: Tensor | None = None):
        super().__init__()
        if rollout_batch < 2:
            raise ValueError(f"system.rollout_batch must be >= 2 (advantages need a batch), got {rollout_batch}")
        if disc_steps < 0 or disc_batch < 1:
            raise ValueError(f"system.disc_steps must be >= 0 and system.disc_batch >= 1, got {disc_steps}, {disc_batch}")
        self.automatic_optimization = False
        self.denoiser = denoiser.eval() if isinstance(denoiser, nn.Module) else denoiser
        if isinstance(self.denoiser, nn.Module):
            self.denoiser.requires_grad_(False)
        self.mdp, self.policy, self.discriminator = mdp, policy, discriminator
        self.ref_policy = frozen_copy(policy) if algo.kl_coef > 0 else None
        self.value = ValueNet(train_data.shape[1:], mdp.horizon, sigma_data=getattr(policy, "sigma_data", 1.0)) \
            if algo.baseline == "value" else None
        self.reward, self.algo = reward, algo
        self.train_data = train_data
        self.conditional = int(getattr(discriminator, "num_classes", 0)) > 0
        if self.conditional:
            if mdp.num_classes <= 0:
                raise ValueError("a label-conditional discriminator (discriminator.net.num_classes > 0) needs a "
                                 "class-conditional MDP (mdp.num_classes > 0): the rollouts carry no labels")
            if discriminator.num_classes != mdp.num_classes:
                raise ValueError(f"discriminator.net.num_classes={discriminator.num_classes} but "
                                 f"mdp.num_classes={mdp.num_classes}")
            if mdp.guidance == "dg":
                raise ValueError("discriminator guidance (mdp.guidance=dg) takes the gradient of an unconditional "
                                 "discriminator; set discriminator.net.num_classes=0")
            if train_labels is None or len(train_labels) != len(train_data):
                raise ValueError("a label-conditional discriminator needs the training data's labels (train_labels), "
                                 "one per training sample")
        self.train_labels = train_labels if self.conditional else None
        self.shape = tuple(train_data.shape[1:])
        self.rollout_batch, self.disc_steps, self.disc_batch = int(rollout_batch), int(disc_steps), int(disc_batch)
        self.seed, self.eval_every, self.evaluate_fn = int(seed), int(eval_every), evaluate
        self.register_buffer("weights", reward.weights(mdp.horizon))
        self.register_buffer("nfe_spent", torch.zeros((), dtype=torch.float64))  # all ranks' rollouts, in checkpoints
        self.limits = DivergenceLimits(max_approx_kl, int(patience), max_policy_param, max_policy_grad_norm,
                                       int(disc_patience))
        self.streaks = {"approx_kl": 0, "disc": 0}  # consecutive iterations over a limit (not checkpointed)
        self.timings: dict[str, float] = {}
        self.per_step: dict[str, list[float]] = {}  # the last iteration's per-step diagnostics (one entry per step)

    # -- optimisers ----------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the policy has no trainable parameters")
        optimizers = [torch.optim.Adam(params, lr=self.algo.lr), self.discriminator.make_optimizer()]
        if self.value is not None:
            optimizers.append(torch.optim.Adam(self.value.parameters(), lr=self.algo.value_lr))
        # the configured settings (lr, betas, ...): a resumed run re-applies them over the checkpoint's
        self._configured = [[{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
                            for opt in optimizers]
        return optimizers

    def on_train_start(self) -> None:
        """After a resume restored the optimisers' state: apply this config's optimiser settings (``algo.lr``,
        ``discriminator.lr``, ...) instead of the checkpoint's, and say which ones changed."""
        names = ("policy", "discriminator", "value")
        changed = []
        for name, opt, groups in zip(names, self.trainer.optimizers, getattr(self, "_configured", [])):
            for group, configured in zip(opt.param_groups, groups):
                for key, value in configured.items():
                    if key in group and group[key] != value:
                        changed.append(f"{name} optimiser {key} {group[key]} -> {value}")
                    group[key] = value
        if changed and self.trainer.is_global_zero:
            report("resumed with changed optimiser settings, applied: " + "; ".join(dict.fromkeys(changed)))

    def train_dataloader(self):
        # one dummy batch per epoch: an epoch is one iteration of the loop
        return torch.utils.data.DataLoader([0], batch_size=1)

    # -- randomness ----------------------------------------------------------------------------------------------
    @property
    def iteration(self) -> int:
        return int(self.current_epoch)

    def generator(self, purpose: str) -> torch.Generator:
        """The CPU generator of ``purpose`` for this (seed, iteration, rank)."""
        return generator(purpose, self.seed, self.iteration, self.global_rank)

    def rollout_seeds(self, iteration: int | None = None) -> Tensor:
        it = self.iteration if iteration is None else iteration
        return sample_seeds(self.rollout_batch, "rollout", self.seed, it, self.global_rank, device=self.device)

    def _guide(self):
        return self.discriminator if self.mdp.guidance == "dg" else None

    def rollout(self, iteration: int | None = None) -> Rollout:
        return self.mdp.rollout(self.denoiser, self.policy, self.rollout_seeds(iteration), self.shape,
                                discriminator=self._guide())

    # -- small helpers -------------------------------------------------------------------------------------------
    def _gather_stats(self, values: Tensor) -> tuple[Tensor, Tensor]:
        """Per-step mean and std of ``values`` [B, N] over the global batch (all ranks)."""
        gathered = self.all_gather(values.detach())
        gathered = gathered.reshape(-1, values.shape[1]) if gathered.ndim == 3 else gathered
        std = gathered.std(0) if gathered.shape[0] > 1 else torch.ones_like(gathered[0])
        return gathered.mean(0), std

    def check_finite(self, name: str, value: Tensor) -> None:
        if not torch.isfinite(value).all():
            raise NonFiniteError(f"non-finite {name} at iteration {self.iteration}: the run stops here; the last "
                                 "checkpoint (checkpoints/last.ckpt) holds the last good state")

    @contextmanager
    def _timed(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.timings[stage] = time.perf_counter() - start

    # -- the stages of one iteration -----------------------------------------------------------------------------
    def collect_rollout(self) -> Rollout:
        """Stage 1: trajectories of the current policy (no gradients); counts the denoiser evaluations spent."""
        self.policy.eval()
        # knob policies draw their actions from torch's global generators: seed them from (seed, iteration, rank)
        # too, or a run resumed from a checkpoint would not continue as the uninterrupted one
        torch.manual_seed(self.generator("policy-actions").initial_seed())
        rollout = self.rollout()
        self.nfe_spent += self.all_gather(rollout.nfe.sum().to(torch.float64)).sum()
        return rollout

    def fit_discriminator(self, rollout: Rollout, optimizer) -> dict[str, Tensor]:
        """Stage 2: ``disc_steps`` steps on visited states vs training data forward-noised at the same sigma."""
        fake, sigma = rollout.x_next.flatten(0, 1), rollout.sigma_next.flatten()
        steps, batch = rollout.sigma.shape
        step_index = torch.arange(steps, device=self.device).repeat_interleave(batch)
        labels = self._labels(rollout)
        rng = self.generator("discriminator")
        self.discriminator.train()
        diag: dict[str, Tensor] = {}
        for _ in range(self.disc_steps):
            chosen = torch.randperm(len(fake), generator=rng)[: self.disc_batch].to(self.device)
            pairs = paired_batch(self.train_data, fake[chosen], sigma[chosen], step_index[chosen], rng,
                                 data_labels=self.train_labels, labels=None if labels is None else labels[chosen])
            loss, diag = self.discriminator.batch_loss(pairs, num_steps=steps)
            self.check_finite("discriminator loss", loss)
            optimizer.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            optimizer.step()
        return diag

    def _labels(self, rollout: Rollout) -> Tensor | None:
        """The class of every visited state, step-major [N * B] like ``x_next.flatten(0, 1)`` (label-conditional
        discriminator only; None otherwise)."""
        if not self.conditional:
            return None
        return rollout.labels.to(self.device).repeat(rollout.steps)

    @torch.no_grad()
    def score_rollout(self, rollout: Rollout) -> Scores:
        """Stage 3a: the updated discriminator's logits of every visited state and the rewards [N, B]."""
        self.discriminator.eval()
        fake, sigma = rollout.x_next.flatten(0, 1), rollout.sigma_next.flatten()
        labels = self._labels(rollout)
        logits = torch.cat([self.discriminator(fake[i:i + LOGIT_CHUNK], sigma[i:i + LOGIT_CHUNK],
                                               None if labels is None else labels[i:i + LOGIT_CHUNK])
                            for i in range(0, len(fake), LOGIT_CHUNK)]).view_as(rollout.sigma)
        rewards = self.reward(logits) - self.reward.nfe_cost * rollout.nfe
        self.check_finite("rewards", rewards)
        return Scores(logits=logits, rewards=rewards)

    def advantages(self, rollout: Rollout, rewards: Tensor) -> dict[str, Tensor]:
        """Stage 3b: the rollout's transitions (step-major) with ``adv`` and, with a value network, ``target``."""
        transitions = rollout.transitions()
        steps, batch = rewards.shape
        if self.value is not None:
            with torch.no_grad():
                values = self.value(transitions["x"], transitions["sigma"], transitions["k"]).view(steps, batch).T
            adv, targets = gae((rewards * self.weights.unsqueeze(1)).T, values, self.algo.gae_lambda)
            transitions["target"] = targets.T.flatten()
        else:
            adv = returns_to_go(rewards.T, self.weights)
        mean, std = self._gather_stats(adv)
        adv = normalise_per_step(adv, mean, std) if self.algo.normalise else adv - mean
        transitions["adv"] = adv.T.flatten()
        return transitions

    def update_policy(self, transitions: dict[str, Tensor], optimizers) -> dict[str, float]:
        """Stage 4: the PPO epochs over the transitions (and the value network's regression)."""
        self.policy.train()
        value_optimizer = optimizers[2] if self.value is not None else None
        return ppo_update(self.policy, transitions, self.algo, optimizers[0], self.generator("ppo"),
                          ref_policy=self.ref_policy, value=self.value, value_optimizer=value_optimizer,
                          backward=self.manual_backward, check=self.check_finite)

    def training_step(self, batch, batch_idx):
        optimizers = self.optimizers()
        with self._timed("rollout"):
            rollout = self.collect_rollout()
        with self._timed("discriminator"):
            disc_diag = self.fit_discriminator(rollout, optimizers[1])
        with self._timed("ppo"):
            scores = self.score_rollout(rollout)
            transitions = self.advantages(rollout, scores.rewards)
            ppo_diag = self.update_policy(transitions, optimizers)
        self.log_iteration(rollout, scores, disc_diag, ppo_diag)
        self.check_divergence(ppo_diag, disc_diag)

    # -- divergence ----------------------------------------------------------------------------------------------
    def _diverged(self, symptom: str) -> None:
        raise DivergenceError(f"training diverged at iteration {self.iteration}: {symptom}; the run stops here; the "
                              "last checkpoint (checkpoints/last.ckpt) holds the last good state")

    def _streak(self, name: str, over: bool, patience: int) -> bool:
        self.streaks[name] = self.streaks[name] + 1 if over else 0
        return patience > 0 and self.streaks[name] >= patience

    def check_divergence(self, ppo_diag: dict, disc_diag: dict) -> None:
        """Stop the run (:class:`DivergenceError`) on the symptoms of :class:`DivergenceLimits`."""
        lim = self.limits
        with torch.no_grad():
            params = [p.detach().abs().max() for p in self.policy.parameters() if p.numel()]
            largest = float(torch.stack(params).max()) if params else 0.0
        if not math.isfinite(largest) or (lim.max_policy_param is not None and largest > lim.max_policy_param):
            self._diverged(f"policy parameters exploded (largest |value| {largest:.3g} > system.max_policy_param="
                           f"{lim.max_policy_param})")
        grad = float(ppo_diag.get("ppo/grad_norm", 0.0))
        if not math.isfinite(grad) or (lim.max_policy_grad_norm is not None and grad > lim.max_policy_grad_norm):
            self._diverged(f"policy gradient norm {grad:.3g} > system.max_policy_grad_norm={lim.max_policy_grad_norm}")
        kl = float(ppo_diag.get("ppo/approx_kl", 0.0))
        kl_over = not math.isfinite(kl) or (lim.max_approx_kl is not None and kl > lim.max_approx_kl)
        if self._streak("approx_kl", kl_over, lim.patience if lim.max_approx_kl is not None else 0):
            self._diverged(f"approx-KL {kl:.3g} > system.max_approx_kl={lim.max_approx_kl} for "
                           f"{self.streaks['approx_kl']} consecutive iterations (system.patience={lim.patience})")
        acc = float(disc_diag["disc/acc"]) if "disc/acc" in disc_diag else 0.5
        stuck = min(acc, 1.0 - acc) <= DISC_STUCK_TOL
        if self._streak("disc", stuck, lim.disc_patience):
            self._diverged(f"discriminator accuracy stuck at {acc:.3f} for {self.streaks['disc']} consecutive "
                           f"iterations (system.disc_patience={lim.disc_patience})")

    # -- logging -------------------------------------------------------------------------------------------------
    def log_iteration(self, rollout: Rollout, scores: Scores, disc_diag: dict[str, Tensor],
                      ppo_diag: dict[str, float]) -> None:
        """Stage 5: run-level scalars, the progress-bar numbers and the per-step table."""
        rewards, acc_fake = scores.rewards, (scores.logits < 0).float().mean(1)
        logs = dict(ppo_diag)
        logs.update({key: float(val) for key, val in disc_diag.items() if val.ndim == 0})
        logs.update({"disc/acc_fake": float(acc_fake.mean()), "reward/mean": float(rewards.mean()),
                     "reward/return": float((rewards * self.weights.unsqueeze(1)).sum(0).mean()),
                     "reward/terminal_logit": float(scores.logits[-1].mean()),
                     "rollout/nfe": float(rollout.nfe.sum(0).mean())})
        logs.update({f"knob/{name}_mean": float(val.mean()) for name, val in rollout.knob_values.items()})
        logs.update({f"time/{stage}_s": seconds for stage, seconds in self.timings.items()})
        self.log_dict(logs, on_step=False, on_epoch=True, batch_size=1)
        for name, key in (("reward", "reward/mean"), ("d_acc", "disc/acc"), ("kl", "ppo/approx_kl")):
            # one step per epoch: on_step alone shows each number once in the bar (no _step / _epoch twins)
            self.log(name, logs.get(key, float("nan")), prog_bar=True, on_step=True, on_epoch=False, batch_size=1)
        self.per_step = {"sigma": rollout.sigma_next.mean(1).tolist(), "reward_mean": rewards.mean(1).tolist(),
                         "reward_std": rewards.std(1).tolist(), "disc_acc_fake": acc_fake.tolist()}
        self.per_step.update({name: sched.tolist() for name, sched in self.policy.schedule().items()})
        self._log_per_step_table()

    def _log_per_step_table(self) -> None:
        logger = self.logger
        if logger is None or not hasattr(logger, "log_table") or not self.trainer.is_global_zero:
            return
        columns = ["iteration", "step", *self.per_step]
        rows = [[self.iteration, k, *values] for k, values in enumerate(zip(*self.per_step.values()))]
        logger.log_table(key="per_step", columns=columns, data=rows)

    def on_train_epoch_end(self) -> None:
        it = self.iteration + 1
        if self.trainer.is_global_zero:
            shown = self.trainer.callback_metrics
            times = ", ".join(f"{stage} {seconds:.2f} s" for stage, seconds in self.timings.items())
            record(f"iteration {it}/{self.trainer.max_epochs}: reward {float(shown.get('reward', float('nan'))):.4g}, "
                   f"disc acc {float(shown.get('d_acc', float('nan'))):.3f}, approx-KL "
                   f"{float(shown.get('kl', float('nan'))):.3g}, {float(self.nfe_spent):.3g} NFE so far ({times})")
        if self.evaluate_fn is not None and self.eval_every > 0 and it % self.eval_every == 0:
            if self.trainer.is_global_zero:
                metrics = self.evaluate_fn(self)
                for key, val in metrics.items():
                    self.log(f"eval/{key}", float(val), rank_zero_only=True, batch_size=1)
