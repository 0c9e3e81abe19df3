"""SLURM for real: a private one-node cluster on this machine (slurm/local_cluster.py: munged, slurmctld and slurmd,
no GPUs) runs slurm/train_ddp.sbatch and the submitit launcher ``hydra/launcher=slurm_ddp_cpu`` with 2-process CPU
DDP (``trainer=rl_ddp_cpu``) of a tiny RL loop (the ``slow`` tests, about a minute each on 2 cores), after two quick
checks of the cluster helper itself.

Skipped, with the reason, where SLURM is not installed (``.ci/run`` installs it when it runs as root) or the host has
fewer than 2 CPUs. Every job runs in a temporary submit directory (its ``outputs/``, the sweep directory, the cache);
the cluster is stopped at the end of the session, also when a test fails.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from .conftest import ROOT

SBATCH = ROOT / "slurm" / "train_ddp.sbatch"
CPU_LAYOUT = ["--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1"]   # README: the CPU-only layout
# the smallest loop that still trains both parts (as tests/test_train.py's TRAIN_ONLY), 2 ranks on CPU
TINY = ["trainer=rl_ddp_cpu", "data=gmm8", "denoiser=analytic", "logger=none", "compare.enabled=false", "mdp.nfe=10",
        "system.rollout_batch=16", "system.disc_steps=2", "system.disc_batch=128", "system.eval_every=0",
        "discriminator.net.hidden=32", "discriminator.net.depth=1", "discriminator.net.emb_dim=16",
        "data.n_train=2000", "data.n_heldout=500", "trainer.enable_progress_bar=false"]
ITERATIONS = 12        # the requeue test signals after the first: the job must still be running then
TRAIN = [*TINY, f"train.iterations={ITERATIONS}", "checkpoint.every_n_epochs=1"]
JOB_TIMEOUT = 300


def _load_local_cluster():
    spec = importlib.util.spec_from_file_location("local_cluster", ROOT / "slurm" / "local_cluster.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


local_cluster = _load_local_cluster()


def test_local_cluster_config(tmp_path):
    """The generated slurm.conf (no daemons needed): this host with its CPUs, no cgroups, no accounting, its files
    under the cluster's directory, the daemons on two distinct ports."""
    c = local_cluster.LocalCluster(tmp_path, memory_mb=2048)
    conf = dict(line.split("=", 1) for line in c.write_config().read_text().splitlines()
                if line and not line.startswith(("#", "NodeName", "PartitionName")))
    assert conf["ProctrackType"] == "proctrack/linuxproc" and conf["TaskPlugin"] == "task/none"
    assert conf["SelectType"] == "select/cons_tres" and conf["JobAcctGatherType"] == "jobacct_gather/none"
    assert conf["ReturnToService"] == "2" and conf["SlurmctldPort"] != conf["SlurmdPort"]
    assert int(conf["FirstJobId"]) > 1           # not 1: a new cluster must not reuse an earlier one's run directories
    assert all(conf[k].startswith(str(tmp_path)) for k in ("StateSaveLocation", "SlurmdSpoolDir", "SlurmctldLogFile"))
    node = c.conf.read_text().split("NodeName=", 1)[1].splitlines()[0].split()
    assert node[0] == c.node and f"CPUs={c.cpus}" in node and "RealMemory=2048" in node and c.cpus >= 1
    assert (tmp_path / "munge" / "munge.key").stat().st_mode & 0o777 == 0o600
    assert c.env({"PATH": "/bin", "SLURM_JOB_ID": "7"})["SLURM_CONF"] == str(c.conf)
    assert "SLURM_JOB_ID" not in c.env({"PATH": "/bin", "SLURM_JOB_ID": "7"})


def test_local_cluster_stops_exactly_the_daemons_it_started(tmp_path):
    reason = local_cluster.missing()
    if reason:
        pytest.skip(reason)
    with local_cluster.LocalCluster(tmp_path) as c:
        assert c.node_state().rstrip("*") == "idle"
        assert c.command("srun", "-n1", "hostname").strip()
        procs = dict(c.procs)
        assert sorted(procs) == ["munged", "slurmctld", "slurmd"] and all(p.poll() is None for p in procs.values())
    assert not c.procs and all(p.poll() is not None for p in procs.values())
    for p in procs.values():
        with pytest.raises(ProcessLookupError):
            os.kill(p.pid, 0)


@pytest.fixture(scope="session")
def cluster(request, tmp_path_factory):
    reason = local_cluster.missing()
    if reason:
        pytest.skip(reason)
    c = local_cluster.LocalCluster(tmp_path_factory.mktemp("slurm"))
    if c.cpus < 2:
        pytest.skip(f"the local SLURM node has {c.cpus} CPU; the 2-task DDP jobs need 2")
    request.addfinalizer(c.stop)      # also after a failed start or test: cancels the jobs, stops the daemons
    return c.start()


@pytest.fixture(scope="module")
def submit_dir(tmp_path_factory):
    """A submit directory as slurm/train_ddp.sbatch expects one: ``.venv/bin/activate`` (here: this interpreter's
    bin directory first on PATH) and ``outputs/slurm`` for the job logs."""
    submit = tmp_path_factory.mktemp("submit")
    (submit / ".venv" / "bin").mkdir(parents=True)
    (submit / ".venv" / "bin" / "activate").write_text(f'export PATH="{Path(sys.executable).parent}:$PATH"\n')
    (submit / "outputs" / "slurm").mkdir(parents=True)
    return submit


def job_env(cluster, submit: Path) -> dict[str, str]:
    """The environment jobs inherit (sbatch exports it): this cluster, a private cache, one thread per rank, no W&B,
    no distributed variables of an enclosing run."""
    distributed = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = cluster.env({k: v for k, v in os.environ.items() if k not in distributed})
    env.update(DIFFUSION_IRL_CACHE=str(submit / "cache"), WANDB_MODE="disabled", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def sbatch(cluster, submit: Path, *overrides: str) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *CPU_LAYOUT, "--time=10", str(SBATCH), *overrides], cwd=submit,
                          env=job_env(cluster, submit), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job_log(submit: Path, job_id: str) -> str:
    path = submit / "outputs" / "slurm" / f"diffusion-irl-train-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else f"(no log {path})"


def run_dir(submit: Path, job_id: str) -> Path:
    return submit / "outputs" / "train" / f"slurm-{job_id}"


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_finished(cluster, submit, job_id, info):
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", \
        f"job {job_id}: {info.get('JobState')} {info.get('ExitCode')}\n{job_log(submit, job_id)[-6000:]}\n" \
        f"{cluster.logs()}"


# --- slurm/train_ddp.sbatch -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def uninterrupted(cluster, submit_dir):
    """(20-35 s on 2 busy cores, mostly the 2 ranks importing torch) The sbatch script, 2 CPU tasks, ITERATIONS
    iterations with a checkpoint after each, never stopped."""
    job_id = sbatch(cluster, submit_dir, *TRAIN)
    (info,) = cluster.wait(job_id, timeout=JOB_TIMEOUT)
    return job_id, info


@pytest.mark.slow
def test_sbatch_script_runs_two_process_ddp_to_completion(cluster, submit_dir, uninterrupted):
    job_id, info = uninterrupted
    assert_finished(cluster, submit_dir, job_id, info)
    assert info["NumTasks"] == "2" and info["Restarts"] == "0"
    out = run_dir(submit_dir, job_id)
    log = job_log(submit_dir, job_id)
    assert f"training done: {ITERATIONS} iterations" in log and "resuming from" not in log
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == [f"iter{i:05d}.ckpt" for i in range(ITERATIONS)] + ["last.ckpt"]
    last = load_ckpt(out / "checkpoints" / "last.ckpt")
    assert last["epoch"] == ITERATIONS
    # two ranks rolled out: the denoiser evaluations count both (iterations x world size x rollout_batch x NFE)
    assert float(last["state_dict"]["nfe_spent"]) == ITERATIONS * 2 * 16 * 10
    overrides = yaml.safe_load((out / ".hydra" / "overrides.yaml").read_text())
    assert "trainer.devices=2" in overrides and "trainer.num_nodes=1" in overrides   # from SLURM's variables
    config = yaml.safe_load((out / ".hydra" / "config.yaml").read_text())
    assert config["trainer"]["accelerator"] == "cpu" and config["trainer"]["devices"] == 2


@pytest.mark.slow
def test_sbatch_requeue_resumes_from_last_ckpt_and_ends_where_an_uninterrupted_run_ends(cluster, submit_dir,
                                                                                       uninterrupted):
    """Near the time limit SLURM signals the batch script (``--signal=B:USR1@180``); here the same signal is sent as
    soon as the job has written its first checkpoint. The script requeues the job, the job restarts under the same id,
    resumes from its last.ckpt and must end with exactly the parameters of the uninterrupted run."""
    ref_id, ref_info = uninterrupted
    assert_finished(cluster, submit_dir, ref_id, ref_info)
    job_id = sbatch(cluster, submit_dir, *TRAIN)
    out = run_dir(submit_dir, job_id)
    deadline = time.monotonic() + JOB_TIMEOUT
    while not (out / "checkpoints" / "last.ckpt").exists():
        state = cluster.job_state(job_id).get("JobState")
        assert state in ("PENDING", "CONFIGURING", "RUNNING") and time.monotonic() < deadline, \
            f"job {job_id} {state} before its first checkpoint\n{job_log(submit_dir, job_id)[-6000:]}"
        time.sleep(0.1)
    cluster.command("scancel", "--batch", "--signal=USR1", job_id)     # what the time limit does, 180 s early
    (info,) = cluster.wait(job_id, timeout=JOB_TIMEOUT)
    assert_finished(cluster, submit_dir, job_id, info)
    log = job_log(submit_dir, job_id)
    assert info["Restarts"] == "1", log
    assert f"requeueing job {job_id}" in log and f"restart 1 of job {job_id}: resuming from" in log
    # the first attempt was stopped before its end: only the resumed one finished
    assert log.count(f"training done: {ITERATIONS} iterations") == 1, log

    ref = load_ckpt(run_dir(submit_dir, ref_id) / "checkpoints" / "last.ckpt")
    got = load_ckpt(out / "checkpoints" / "last.ckpt")
    assert got["epoch"] == ref["epoch"] == ITERATIONS
    assert got["state_dict"].keys() == ref["state_dict"].keys()
    for key, value in ref["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)
    # not a trivial equality: training moved the policy after the first checkpoint
    first = load_ckpt(run_dir(submit_dir, ref_id) / "checkpoints" / "iter00000.ckpt")
    assert not torch.equal(first["state_dict"]["policy.tables.step"], ref["state_dict"]["policy.tables.step"])


# --- hydra/launcher=slurm_ddp_cpu (submitit) ------------------------------------------------------------------------

@pytest.mark.slow
def test_submitit_sweep_runs_a_two_point_array_of_ddp_jobs(cluster, submit_dir):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the `slurm` extra")
    sweep = submit_dir / "sweep"
    cmd = [sys.executable, "-m", "diffusion_irl.train", "-m", "hydra/launcher=slurm_ddp_cpu", *TINY,
           "train.iterations=2", f"hydra.sweep.dir={sweep}", "reward=kl,js"]
    proc = subprocess.run(cmd, cwd=submit_dir, env=job_env(cluster, submit_dir), capture_output=True, text=True,
                          timeout=2 * JOB_TIMEOUT)
    logs = "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-3000:]}"
                     for p in sorted(sweep.glob(".submitit/*/*.err")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:] + logs
    # one array job of two points, each asked for the CPU layout of the launcher config; SLURM saw both complete
    (submission,) = sweep.glob(".submitit/*/*_submission.sh")
    tasks = cluster.wait(submission.parent.name, timeout=60)
    assert sorted(t["ArrayTaskId"] for t in tasks) == ["0", "1"], tasks
    assert all(t["JobState"] == "COMPLETED" and t["ExitCode"] == "0:0" for t in tasks), tasks
    script = submission.read_text()
    for line in ("--array=0-1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=4GB"):
        assert f"#SBATCH {line}" in script, script
    for num, reward in ((0, "kl"), (1, "js")):
        out = sweep / str(num)
        config = yaml.safe_load((out / ".hydra" / "config.yaml").read_text())
        assert config["reward"]["divergence"] == reward and config["trainer"]["devices"] == 2
        last = load_ckpt(out / "checkpoints" / "last.ckpt")
        assert last["epoch"] == 2 and float(last["state_dict"]["nfe_spent"]) == 2 * 2 * 16 * 10
    # both tasks (ranks) of both array jobs returned a result to submitit
    results = sorted(p.name for p in sweep.glob(".submitit/*_*/*_result.pkl"))
    assert len(results) == 4 and all(re.fullmatch(r"\d+_[01]_[01]_result\.pkl", r) for r in results), results
