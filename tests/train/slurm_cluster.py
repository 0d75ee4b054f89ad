"""A real one-node Slurm cluster on localhost, for tests that submit jobs (root only).

    with SlurmCluster() as cluster:                       # munged, slurmctld -D, slurmd -D; node idle
        subprocess.run(["sbatch", ...], env=cluster.env)  # clients find the cluster through SLURM_CONF

Everything lives under one fixed folder (``/tmp/omnitrain-slurm``) so that a later run finds the
pid files of an earlier, crashed one and stops its jobs and daemons before wiping the folder: Slurm
would otherwise recover the old jobs from its state directory, and the old daemons hold the ports.
A lock file (``flock``, released by the kernel when its holder dies) makes a second test session
wait for the first one's cluster instead of tearing it down.
The ports are not Slurm's defaults, so a system Slurm on this machine is left alone.

Settings that matter (measured on Debian's slurm 22.05): ``proctrack/pgid`` (``linuxproc`` leaves
orphans), ``AuthInfo=cred_expire=5`` and ``SchedulerParameters=sched_interval=1`` (a requeued job
starts again within seconds instead of ~2 minutes), no accounting daemon (so no ``sacct``: read
``scontrol show job``).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

BASE = Path(tempfile.gettempdir()) / "omnitrain-slurm"
LOCK = Path(tempfile.gettempdir()) / "omnitrain-slurm.lock"  # one cluster per machine: other test sessions wait
CTLD_PORT, SLURMD_PORT = 16817, 16818
BINARIES = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel")
MUNGE_DIR = Path("/run/munge")


def unavailable_reason() -> str | None:
    """Why no cluster can be started here (None: it can)."""
    if os.geteuid() != 0:
        return "a local Slurm cluster needs root (munged runs as user munge, slurmd as root)"
    missing = [b for b in BINARIES if _which(b) is None]
    if missing:
        return f"Slurm/munge binaries missing ({', '.join(missing)}): apt-get install slurmctld slurmd slurm-client munge"
    return None


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def _slurm_conf(base: Path, host: str, cpus: int) -> str:
    return f"""\
ClusterName=omnitest
SlurmctldHost={host}
SlurmctldPort={CTLD_PORT}
SlurmdPort={SLURMD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd.pid
SlurmctldLogFile={base}/slurmctld.log
SlurmdLogFile={base}/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=sched_interval=1
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
PlugStackConfig={base}/plugstack.conf
NodeName={host} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """munged (reused if one already answers), slurmctld and slurmd for one node with ``cpus`` CPUs."""

    def __init__(self, base: Path = BASE, cpus: int = 2) -> None:
        self.base, self.cpus = Path(base), cpus
        self.host = socket.gethostname().split(".")[0]  # `hostname -s`: slurmd matches NodeName against it
        self.conf = self.base / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._procs: list[subprocess.Popen] = []
        self._munged_pid: int | None = None
        self._lock: Any = None

    def __enter__(self) -> SlurmCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 30.0, wait_for_lock: float = 600.0) -> None:
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        self._take_lock(wait_for_lock)  # held until stop(); the kernel drops it if this process dies
        self._stop_leftovers()
        for port in (CTLD_PORT, SLURMD_PORT):
            if not _port_free(port):
                raise RuntimeError(f"port {port} is in use (a Slurm daemon not started from {self.base}?): stop it and retry")
        shutil.rmtree(self.base, ignore_errors=True)
        for d in ("state", "spool"):
            (self.base / d).mkdir(parents=True)
        (self.base / "plugstack.conf").write_text("")  # not Debian's /etc/slurm one: no SPANK plugins
        self.conf.write_text(_slurm_conf(self.base, self.host, self.cpus))
        self._start_munged()
        for cmd in (["slurmctld", "-D", "-f", str(self.conf)], ["slurmd", "-D", "-f", str(self.conf)]):
            with open(self.base / f"{cmd[0]}.stdout", "w") as log:  # the daemon keeps its own copy of the descriptor
                self._procs.append(subprocess.Popen([_which(cmd[0]), *cmd[1:]], stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                                    start_new_session=True))  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self._procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited with {p.returncode}:\n{self.logs()}")
            state = self.run("sinfo", "-h", "-o", "%t", check=False).stdout.strip()
            if state == "idle":
                return
            time.sleep(0.3)
        raise RuntimeError(f"node not idle after {timeout:.0f}s (sinfo: {state!r}):\n{self.logs()}")

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster."""
        return subprocess.run([_which(args[0]) or args[0], *args[1:]], env=self.env, capture_output=True, text=True, check=check)

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (JobState, Restarts, ...); {} once the job record is gone."""
        res = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        return dict(kv.split("=", 1) for kv in res.stdout.split() if "=" in kv) if res.returncode == 0 else {}

    def logs(self, lines: int = 30) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log", "slurmctld.stdout", "slurmd.stdout"):
            path = self.base / name
            if path.is_file():
                out.append(f"--- {path} (last {lines} lines)\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    def stop(self) -> None:
        """Cancel every job (so no slurmstepd outlives the cluster), then stop what we started."""
        if self._procs and all(p.poll() is None for p in self._procs):
            self._cancel_all_jobs()
        for p in reversed(self._procs):
            _terminate(p.pid, p)
        self._procs.clear()
        if self._munged_pid:
            _terminate(self._munged_pid)
            self._munged_pid = None
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    def _take_lock(self, timeout: float) -> None:
        """Another pytest session's cluster uses the same folder and ports: wait for it to finish."""
        self._lock = open(LOCK, "w")
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"another test session has held the local Slurm cluster ({LOCK}) for {timeout:.0f}s") from None
                time.sleep(0.5)

    def _start_munged(self) -> None:
        if subprocess.run([_which("munge"), "-n"], capture_output=True).returncode == 0:
            return  # a munged answers already (the system's, or one a previous run left): use it, leave it running
        MUNGE_DIR.mkdir(exist_ok=True)
        shutil.chown(MUNGE_DIR, "munge", "munge")
        os.chmod(MUNGE_DIR, 0o755)
        # --force: start even if a dead munged left its socket behind
        subprocess.run(["runuser", "-u", "munge", "--", _which("munged"), "--force"], check=True, capture_output=True)
        pid_file = MUNGE_DIR / "munged.pid"
        self._munged_pid = int(pid_file.read_text()) if pid_file.is_file() else None
        (self.base / "munged.pid").write_text(f"{self._munged_pid}\n")  # for _stop_leftovers if this run dies

    def _cancel_all_jobs(self, timeout: float = 15.0) -> None:
        self.run("scancel", "--full", "--user=root", check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
            time.sleep(0.3)

    def _stop_leftovers(self) -> None:
        """Stop what an earlier, crashed run left in ``base``: its jobs (through its slurmctld, if that
        still runs), then the daemons its pid files name (checked by name, never a broad kill)."""
        alive = {}
        for name in ("slurmd", "slurmctld", "munged"):
            try:
                pid = int((self.base / f"{name}.pid").read_text().split()[0])
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
            except (OSError, ValueError, IndexError):
                continue
            if Path(cmdline).name == name and _alive(pid):
                alive[name] = pid
        if "slurmctld" in alive and self.conf.is_file():
            self._cancel_all_jobs()  # or their slurmstepd and tasks outlive the daemons
        for pid in alive.values():
            _terminate(pid)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _alive(pid: int) -> bool:
    """False once ``pid`` is gone or a zombie (a leftover daemon's parent died; PID 1 may never reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _terminate(pid: int, proc: subprocess.Popen | None = None, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return
        if proc is None and not _alive(pid):
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if proc is not None:
        proc.wait()
