"""The RL loop under 2-process CPU DDP (gloo): gradients of the policy and the discriminator are all-reduced, so the
ranks stay identical; each rank rolls out its own trajectories; the NFE bookkeeping counts every rank's rollouts.

Lightning's ``ddp`` strategies launch the other ranks by re-running the command line, which does not work from inside
pytest; the distributed part is therefore a standalone script, written to ``tmp_path`` and run in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

WORKER = textwrap.dedent('''
    """One rank of a 2-process CPU DDP run of SamplerPolicyModule; saves its final parameters to out_dir/rank{r}.pt."""
    import sys
    from pathlib import Path

    import lightning as L
    import torch

    from diffusion_irl.data.toy2d import gmm8
    from diffusion_irl.denoisers.analytic import AnalyticDenoiser
    from diffusion_irl.discriminator import DiscriminatorModule
    from diffusion_irl.mdp.actions import Knob
    from diffusion_irl.mdp.env import SamplingMDP
    from diffusion_irl.mdp.policies import KnobPolicy
    from diffusion_irl.rl.ppo import PPO
    from diffusion_irl.rl.rewards import Reward
    from diffusion_irl.sampling.samplers import Euler
    from diffusion_irl.system import SamplerPolicyModule

    EPOCHS, BATCH, NFE = 3, 32, 6


    def flat(module):
        return torch.cat([p.detach().flatten() for p in module.parameters()])


    def main(out_dir: Path, strategy: str):
        torch.set_num_threads(1)
        L.seed_everything(0, verbose=False)
        law = gmm8()
        mdp = SamplingMDP(Euler(), nfe=NFE)
        policy = KnobPolicy({"step": Knob("step", -3.0, 3.0)}, sigma_data=2.84)
        mdp.setup_policy(policy, (2,))
        disc = DiscriminatorModule({"_target_": "diffusion_irl.discriminator.networks.MLPDiscriminator",
                                    "shape": [2], "hidden": 32, "depth": 1, "emb_dim": 16, "sigma_data": 2.84}, lr=1e-3)
        train = law.sample(2000, torch.Generator().manual_seed(0))
        module = SamplerPolicyModule(AnalyticDenoiser(law), mdp, policy, disc, Reward("kl"), PPO(lr=1e-2, epochs=2, minibatches=2),
                                     train, rollout_batch=BATCH, disc_steps=2, disc_batch=128, seed=0)
        initial = torch.cat([flat(policy), flat(disc)])
        first = {}
        rollout = module.rollout

        def recording_rollout(*args, **kwargs):
            ro = rollout(*args, **kwargs)
            first.setdefault("final", ro.final.clone())
            first.setdefault("seeds", ro.seeds.clone())
            return ro

        module.rollout = recording_rollout
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=EPOCHS, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            use_distributed_sampler=False)
        trainer.fit(module)
        rank, world = trainer.global_rank, trainer.world_size
        assert world == 2, world
        expected = EPOCHS * world * BATCH * mdp.planned_nfe()
        if rank == 0:
            assert float(module.nfe_spent) == expected, (float(module.nfe_spent), expected)
        final = first["final"]
        torch.save({"rank": rank, "world": world, "initial": initial, "params": torch.cat([flat(policy), flat(disc)]),
                    "policy": flat(policy), "final_sum": final.double().sum(0), "final_hash": hash(final.numpy().tobytes()),
                    "final_head": final[:4].clone(), "seeds": first["seeds"], "nfe_spent": float(module.nfe_spent),
                    "expected_nfe": expected}, out_dir / f"rank{rank}.pt")


    if __name__ == "__main__":
        main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "ddp_find_unused_parameters_true")
''')


def run_worker(tmp_path, *args, timeout=300):
    script = tmp_path / "ddp_worker.py"
    script.write_text(WORKER)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, str(script), str(out), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return proc, out


def test_ddp_ranks_stay_in_sync_and_roll_out_different_trajectories(tmp_path):
    proc, out = run_worker(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert (r0["rank"], r1["rank"], r0["world"]) == (0, 1, 2)
    # all-reduced gradients: the same parameters on both ranks, and they did train
    assert torch.equal(r0["params"], r1["params"])
    assert torch.equal(r0["initial"], r1["initial"])
    assert not torch.allclose(r0["params"], r0["initial"])
    assert not torch.allclose(r0["policy"], r0["initial"][: r0["policy"].numel()])
    # each rank its own seeds and trajectories
    assert not set(r0["seeds"].tolist()) & set(r1["seeds"].tolist())
    assert r0["final_hash"] != r1["final_hash"] and not torch.allclose(r0["final_sum"], r1["final_sum"])
    assert not torch.allclose(r0["final_head"], r1["final_head"])
    # the NFE spent counts both ranks' rollouts (checked in the worker on rank 0; the buffer is synced by all_gather)
    assert r0["nfe_spent"] == r0["expected_nfe"] == 3 * 2 * 32 * 6
    assert r1["nfe_spent"] == r0["nfe_spent"]


@pytest.mark.slow
def test_plain_ddp_refuses_the_loop(tmp_path):
    """The module backpropagates the discriminator and the policy separately, so plain ``ddp`` (which expects every
    parameter in every backward) fails with Lightning's unused-parameters error: trainer/rl_ddp.yaml must keep
    ``ddp_find_unused_parameters_true``."""
    proc, out = run_worker(tmp_path, "ddp", timeout=180)
    assert proc.returncode != 0
    assert "parameters that were not used in producing the loss" in proc.stderr
    assert "ddp_find_unused_parameters_true" in proc.stderr
    assert not list(out.glob("rank*.pt"))
