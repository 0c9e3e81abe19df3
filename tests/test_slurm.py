"""SLURM: the multi-node DDP launcher config (hydra/launcher=slurm_ddp) and the sbatch script of the RL loop.

No cluster is needed: the launcher is composed and instantiated (the parameters submitit would submit with), and the
sbatch script runs against stand-in ``srun`` / ``scontrol`` executables that record their arguments.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from .conftest import CONF, ROOT
from .helpers import compose_config

SBATCH = ROOT / "slurm" / "train_ddp.sbatch"


def _compose_with_hydra(overrides):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=["hydra/launcher=slurm_ddp", *overrides], return_hydra_config=True)


@pytest.mark.parametrize("devices, num_nodes", [(4, 2), (1, 1), (8, 3)])
def test_slurm_ddp_launcher_asks_for_one_task_per_device(devices, num_nodes):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the `slurm` extra")
    from hydra.utils import instantiate

    cfg = _compose_with_hydra(["trainer=rl_ddp", f"trainer.devices={devices}", f"trainer.num_nodes={num_nodes}",
                               "hydra.launcher.partition=gpu"])
    launcher = cfg.hydra.launcher
    assert launcher.tasks_per_node == cfg.trainer.devices == devices
    assert launcher.gpus_per_node == devices and launcher.nodes == num_nodes
    assert launcher.partition == "gpu" and launcher.max_num_timeout == 3   # inherited from slurm.yaml
    # what submitit would submit with (the plugin resolves its parameters when Hydra instantiates it)
    plugin = instantiate(launcher)
    assert type(plugin).__name__ == "SlurmLauncher"
    assert (plugin.params["tasks_per_node"], plugin.params["gpus_per_node"], plugin.params["nodes"]) == \
        (devices, devices, num_nodes)


def test_slurm_ddp_launcher_follows_the_single_device_trainer():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the `slurm` extra")
    cfg = _compose_with_hydra([])            # trainer=rl: devices 1, no num_nodes key
    assert cfg.hydra.launcher.tasks_per_node == cfg.trainer.devices == 1 and cfg.hydra.launcher.nodes == 1


def test_slurm_ddp_launcher_refuses_devices_auto():
    """``auto`` cannot size an allocation: reading tasks_per_node fails and names the key."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the `slurm` extra")
    from omegaconf.errors import InterpolationValidationError

    cfg = _compose_with_hydra(["trainer=rl_ddp"])
    assert cfg.trainer.devices == "auto"
    with pytest.raises(InterpolationValidationError, match="tasks_per_node"):
        _ = cfg.hydra.launcher.tasks_per_node


# --- slurm/train_ddp.sbatch --------------------------------------------------------------------------------------

def test_sbatch_script_parses_and_launches_the_rl_loop_with_srun():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    text = SBATCH.read_text()
    srun = [line for line in text.splitlines() if line.lstrip().startswith("srun ")]
    assert len(srun) == 1
    command = text[text.index(srun[0]):].split("&\n", 1)[0]
    assert "python -m diffusion_irl.train" in command and "trainer=rl_ddp" in command
    assert 'trainer.num_nodes="${SLURM_NNODES}"' in command and "trainer.devices=" in command
    assert "#SBATCH --requeue" in text


def _fake_cluster(tmp_path, srun_body: str):
    """A submit directory with an empty .venv, and stand-ins for srun and scontrol that log their arguments."""
    submit = tmp_path / "submit"
    (submit / ".venv" / "bin").mkdir(parents=True)
    (submit / ".venv" / "bin" / "activate").write_text("")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", srun_body), ("scontrol", "")):
        exe = bin_dir / name
        exe.write_text(f'#!/bin/bash\necho "$@" >> "{tmp_path}/{name}.log"\n{body}\n')
        exe.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(submit),
           "SLURM_JOB_ID": "123", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4", "SLURM_RESTART_COUNT": "1"}
    return submit, env


def _srun_args(tmp_path) -> list[str]:
    return (tmp_path / "srun.log").read_text().strip().splitlines()[-1].split()


def test_sbatch_script_resumes_from_last_ckpt_on_requeue(tmp_path):
    submit, env = _fake_cluster(tmp_path, "")
    run = ["bash", str(SBATCH), "experiment=digits", "train.iterations=3"]
    subprocess.run(run, check=True, env=env, capture_output=True, text=True)
    first = _srun_args(tmp_path)
    assert first[:3] == ["python", "-m", "diffusion_irl.train"]
    assert "trainer=rl_ddp" in first and "trainer.num_nodes=2" in first and "trainer.devices=4" in first
    assert "hydra.run.dir=outputs/train/slurm-123" in first and first[-2:] == ["experiment=digits", "train.iterations=3"]
    assert not any(a.startswith("ckpt_path=") for a in first)

    # the requeued job (same id) finds its own last checkpoint
    ckpt = submit / "outputs" / "train" / "slurm-123" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")
    out = subprocess.run(run, check=True, env=env, capture_output=True, text=True).stdout
    second = _srun_args(tmp_path)
    assert "ckpt_path=outputs/train/slurm-123/checkpoints/last.ckpt" in second and "resuming from" in out

    # the overrides the script passes compose with the RL loop's config
    cfg = compose_config("train", [a for a in second[3:] if not a.startswith("hydra.")], output_dir=tmp_path)
    assert cfg.trainer.strategy == "ddp_find_unused_parameters_true"
    assert (cfg.trainer.devices, cfg.trainer.num_nodes) == (4, 2) and cfg.ckpt_path.endswith("last.ckpt")
    assert list(cfg.data.shape) == [1, 8, 8] and cfg.mdp.guidance == "cfg"   # experiment=digits


def test_sbatch_script_requeues_on_usr1(tmp_path):
    submit, env = _fake_cluster(tmp_path, f'touch "{tmp_path}/started"; sleep 2')
    proc = subprocess.Popen(["bash", str(SBATCH)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "started").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "srun stand-in did not start"
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)      # what `#SBATCH --signal=B:USR1@180` sends near the time limit
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "123"]
    assert "requeueing job 123" in out and proc.returncode != 0
