"""A private one-node SLURM cluster on this machine: to try slurm/train_ddp.sbatch and the submitit launchers without a
real cluster, and for tests/test_slurm_cluster.py.

    sudo apt-get install -y slurm-wlm munge          # Debian / Ubuntu: the daemons and the client commands
    sudo .venv/bin/python slurm/local_cluster.py     # starts munged, slurmctld, slurmd; prints the SLURM_CONF line
    export SLURM_CONF=/tmp/diffusion-irl-slurm-.../slurm.conf   # in another root shell, then sbatch ...

It stops the three daemons it started (and cancels the cluster's jobs) on Ctrl-C or SIGTERM, and removes its
directory unless ``--dir`` was given. Everything lives under one directory: slurm.conf, the munge key and socket,
state, spool, pid and log files. The node is this host with its CPUs (as ``slurmd -C`` reports them) and half its
memory, no GPUs, no cgroups (``proctrack/linuxproc``, ``task/none``), no accounting (``sacct`` fails, see README), the
daemons on two free local ports, so it runs beside a system SLURM and beside another such cluster.

slurmd starts jobs as the submitting user, so it runs as root (``sudo``); the munge socket is private to root, so
jobs are submitted as root too. The daemons run in the foreground as this process's children and are stopped by
their process ids, never by name.
"""
from __future__ import annotations

import argparse
import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
END_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")     # the daemons' usual place, often not on a user's PATH
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", os.defpath), *SBIN_DIRS])


def missing() -> str | None:
    """Why a local cluster cannot start here (None: it can)."""
    absent = [name for name in (*DAEMONS, *CLIENTS) if shutil.which(name, path=SBIN_PATH) is None]
    if absent:
        return (f"SLURM is not installed ({', '.join(absent)} not found): apt-get install slurm-wlm munge "
                "(the package names on Debian and Ubuntu)")
    if os.geteuid() != 0:
        return "a local SLURM cluster needs root: slurmd starts jobs as the submitting user"
    return None


def _die_with_parent() -> None:
    """In the daemon's process, before exec (Linux): SIGTERM when this process ends, even if killed before it could
    stop the cluster. A terminal's Ctrl-C does not reach the daemons (their own session): stop() cancels the jobs
    first."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_hardware() -> dict[str, int]:
    """CPUs, sockets, cores, threads as slurmd sees them (``slurmd -C``), and half the memory it reports."""
    hardware = {"CPUs": os.cpu_count() or 1}
    try:
        out = subprocess.run([shutil.which("slurmd", path=SBIN_PATH), "-C"], capture_output=True, text=True,
                             timeout=30).stdout
        for field in out.split():
            key, _, value = field.partition("=")
            if key in ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory"):
                hardware[key] = int(value)
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    if "RealMemory" not in hardware:
        hardware["RealMemory"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    hardware["RealMemory"] = max(hardware["RealMemory"] // 2, 256)   # MB the jobs may ask for (--mem)
    return hardware


class LocalCluster:
    """munged + slurmctld + slurmd for one node (this host), all files under ``root``.

    ``start()`` returns once ``sinfo`` shows the node idle; ``env()`` is the environment for the client commands
    (``SLURM_CONF`` set, no inherited ``SLURM_*`` job variables); ``stop()`` cancels the cluster's jobs and stops the
    three daemons by process id. Also a context manager."""

    def __init__(self, root: str | Path, memory_mb: int | None = None, requeue_delay_s: int = 10):
        self.root = Path(root).resolve()
        self.requeue_delay_s = int(requeue_delay_s)
        self.node = socket.gethostname().split(".")[0]
        hardware = _node_hardware()
        if memory_mb is not None:
            hardware["RealMemory"] = int(memory_mb)
        self.hardware = hardware
        self.cpus = hardware["CPUs"]
        self.memory_mb = hardware["RealMemory"]
        self.conf = self.root / "slurm.conf"
        self.socket = self.root / "munge" / "munge.socket"
        self.procs: dict[str, subprocess.Popen] = {}

    # -- files -------------------------------------------------------------------------------------------------
    def write_config(self) -> Path:
        for sub in ("munge", "state", "spool", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        hw = self.hardware
        layout = " ".join(f"{k}={hw[k]}" for k in ("Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
                          if k in hw)
        user = getpass.getuser()
        r = self.root
        lines = [
            "# written by slurm/local_cluster.py: a private one-node cluster",
            "ClusterName=diffusion-irl-local",
            # job ids from the clock, not from 1: slurm/train_ddp.sbatch resumes outputs/train/slurm-<job id>, which a
            # job of an earlier local cluster may have left behind
            f"FirstJobId={1 + int(time.time()) % 50_000_000}",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            f"SlurmUser={user}",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire also delays a requeued job's restart (default 120 s)
            f"AuthInfo=socket={self.socket},cred_expire={self.requeue_delay_s}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'run' / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            # no cgroups, no accounting
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",       # CPUs are the consumable; memory is only checked against the node
            # a quick cluster: a node that comes back is usable at once, short timeouts, frequent scheduling
            "ReturnToService=2",
            "SlurmctldTimeout=10",
            "SlurmdTimeout=10",
            "MessageTimeout=10",
            "KillWait=2",
            "InactiveLimit=0",
            "MinJobAge=300",
            "Waittime=0",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=2,bf_interval=1",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} {layout} RealMemory={self.memory_mb} "
            "State=UNKNOWN",
            f"PartitionName=local Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")
        return self.conf

    def env(self, base: dict | None = None) -> dict[str, str]:
        """``base`` (default: this process's environment) for the client commands of this cluster."""
        env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = os.pathsep.join([env.get("PATH", os.defpath), *SBIN_DIRS])
        try:
            socket.gethostbyname(self.node)
        except OSError:   # Lightning's SLURM environment connects the ranks through the node's name: one node, local
            env["MASTER_ADDR"] = "127.0.0.1"
        return env

    # -- processes ---------------------------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str]) -> None:
        """Start one daemon in the foreground (its pid is ours to stop). It logs to log/<name>.log; what it prints
        before it opens that file (a bad option, a bad slurm.conf) goes to log/<name>.out."""
        log = open(self.root / "log" / f"{name}.out", "ab")
        try:
            self.procs[name] = subprocess.Popen([shutil.which(name, path=SBIN_PATH), *args], stdin=subprocess.DEVNULL,
                                                stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                                start_new_session=True, preexec_fn=_die_with_parent)
        finally:
            log.close()

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with status {proc.returncode}\n{self.logs(startup=True)}")

    def logs(self, tail: int = 30, startup: bool = False) -> str:
        """The last lines of each daemon's log (with ``startup``: also what they printed before logging)."""
        parts = []
        for path in sorted((self.root / "log").glob("*.log")) + (sorted((self.root / "log").glob("*.out"))
                                                                  if startup else []):
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def command(self, *args: str, timeout: float = 30, check: bool = True) -> str:
        """Run one client command (``sinfo``, ``squeue``, ...) against this cluster; its stdout."""
        proc = subprocess.run(list(args), capture_output=True, text=True, env=self.env(), timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    def node_state(self) -> str:
        try:
            return self.command("sinfo", "-h", "-N", "-n", self.node, "-o", "%T", timeout=10, check=False).strip()
        except subprocess.TimeoutExpired:
            return ""

    def start(self, timeout: float = 60) -> "LocalCluster":
        self.write_config()
        r = self.root
        self._spawn("munged", ["--foreground", "--force", f"--socket={self.socket}",
                               f"--key-file={r / 'munge' / 'munge.key'}", f"--pid-file={r / 'munge' / 'munged.pid'}",
                               f"--log-file={r / 'log' / 'munged.log'}", f"--seed-file={r / 'munge' / 'munged.seed'}"])
        try:
            deadline = time.monotonic() + timeout
            while not self.socket.exists():
                self._check_alive()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"munged did not create {self.socket}\n{self.logs(startup=True)}")
                time.sleep(0.1)
            self._spawn("slurmctld", ["-D", "-i", "-f", str(self.conf)])
            self._spawn("slurmd", ["-D", "-f", str(self.conf), "-N", self.node])
            state = ""
            while True:
                self._check_alive()
                state = self.node_state()
                if state.rstrip("*") == "idle":
                    return self
                if time.monotonic() > deadline:
                    reason = self.command("sinfo", "-R", check=False) if state else ""
                    raise RuntimeError(f"the node is not idle after {timeout:.0f} s (state {state or 'unknown'!r})\n"
                                       f"{reason}{self.logs(startup=True)}")
                time.sleep(0.3)
        except BaseException:
            self.stop()
            raise

    def job_records(self, job_id: str) -> list[dict[str, str]]:
        """``scontrol show job``'s fields (JobState, Restarts, ExitCode, ...) of a job: one record, or one per task of
        an array job."""
        out = self.command("scontrol", "show", "job", "-o", str(job_id), timeout=10, check=False)
        return [dict(f.split("=", 1) for f in line.split() if "=" in f) for line in out.splitlines() if line.strip()]

    def job_state(self, job_id: str) -> dict[str, str]:
        """The fields of one (not array) job; {} when SLURM does not know it."""
        records = self.job_records(job_id)
        return records[0] if records else {}

    def wait(self, job_id: str, timeout: float, poll_s: float = 0.5) -> list[dict[str, str]]:
        """Wait until a job (every task of an array job) has ended: COMPLETED, FAILED, CANCELLED, TIMEOUT, ...; the
        final records. Quicker than ``sbatch --wait``, which polls less and less often."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            records = self.job_records(job_id)
            if records and all(r.get("JobState") in END_STATES for r in records):
                return records
            if time.monotonic() > deadline:
                states = ", ".join(r.get("JobState", "?") for r in records) or "unknown"
                raise TimeoutError(f"job {job_id} still {states} after {timeout:.0f} s")
            time.sleep(poll_s)

    def job_ids(self) -> list[str]:
        try:
            return self.command("squeue", "-h", "-o", "%A", timeout=10, check=False).split()
        except subprocess.TimeoutExpired:
            return []

    def stop(self, timeout: float = 30) -> None:
        """Cancel this cluster's jobs (and wait for them to end), then stop the daemons this object started."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            jobs = self.job_ids()
            if jobs:
                self.command("scancel", *jobs, check=False)
                deadline = time.monotonic() + timeout
                while self.job_ids() and time.monotonic() < deadline:
                    time.sleep(0.5)
        for name in reversed(DAEMONS):       # slurmd, slurmctld, munged
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=timeout / 3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", help="the cluster's directory (kept afterwards); default: a new temporary one")
    parser.add_argument("--memory-mb", type=int, help="the node's memory for --mem checks (default: half of it)")
    args = parser.parse_args(argv)
    reason = missing()
    if reason:
        print(f"cannot start: {reason}", file=sys.stderr)
        return 2
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="diffusion-irl-slurm-"))
    cluster = LocalCluster(root, memory_mb=args.memory_mb)
    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.append(1))
    try:
        cluster.start()
        print(f"one-node cluster up: node {cluster.node}, {cluster.cpus} CPUs, {cluster.memory_mb} MB, no GPUs\n"
              f"export SLURM_CONF={cluster.conf}\n"
              f"logs in {root / 'log'}; Ctrl-C stops it", flush=True)
        while not stop:
            cluster._check_alive()
            time.sleep(0.5)
    finally:
        cluster.stop()
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
