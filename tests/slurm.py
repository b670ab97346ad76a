"""A real one-node SLURM cluster for a test: Debian's munged, slurmctld and slurmd (installed by
the Makefile's test set-up) run in the foreground as this process's children, from a
configuration written to a temporary folder, and are stopped when the test session ends.

Nothing outside that folder is touched: munge gets its own key and socket, SLURM its own ports,
state and spool, and clients find the cluster through ``SLURM_CONF``. Where the daemons are not
installed, or the cluster does not come up in time, the tests that need it skip and say why.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo")


@dataclass
class Slurm:
    conf: Path  # the slurm.conf clients read (SLURM_CONF)
    folder: Path  # state, spool, logs
    cores: int  # CPUs of the one node
    memory_mb: int  # memory SLURM may hand out on it

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def jobs(self) -> list[tuple[str, str, str]]:
        """(job id, name, state) of every job SLURM still knows, running or pending."""
        out = subprocess.run(
            ["squeue", "-h", "-o", "%i %j %T"], env=self.env, capture_output=True, text=True,
            timeout=30, check=True,
        ).stdout  # fmt: skip
        return [tuple(line.split(None, 2)) for line in out.splitlines() if line.strip()]

    def logs(self) -> str:
        """The daemons' logs, to say why a test failed."""
        return "\n".join(
            f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted([*self.folder.glob("*.log"), *self.folder.glob("*.out")])
        )


def missing() -> list[str]:
    return [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exe(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def _config(folder: Path, host: str, cores: int, memory_mb: int) -> str:
    f = folder
    return f"""\
ClusterName=penulttest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser={_user()}
SlurmdUser={_user()}
StateSaveLocation={f}/state
SlurmdSpoolDir={f}/spool
SlurmctldPidFile={f}/slurmctld.pid
SlurmdPidFile={f}/slurmd.pid
SlurmctldLogFile={f}/slurmctld.log
SlurmdLogFile={f}/slurmd.log
AuthType=auth/munge
AuthInfo=socket={f}/munge.socket
CredType=cred/munge
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/builtin
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmctldTimeout=30
SlurmdTimeout=30
KillWait=5
DefMemPerCPU={memory_mb // cores}
NodeName={host} NodeAddr=127.0.0.1 CPUs={cores} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


@contextlib.contextmanager
def one_node(folder: Path, start_timeout: float = 60.0):
    """A SLURM cluster of this machine alone, for the ``with`` block; yields :class:`Slurm`.
    Raises ``RuntimeError`` (with the daemons' logs) if it is not up in ``start_timeout``."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)  # munged refuses a key or socket in a folder others may write
    for sub in ("state", "spool"):
        (folder / sub).mkdir(exist_ok=True)
    key = folder / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    host = socket.gethostname().split(".")[0]
    cores = len(os.sched_getaffinity(0))
    memory_mb = int(_memory_mb() * 0.8)
    conf = folder / "slurm.conf"
    conf.write_text(_config(folder, host, cores, memory_mb))
    slurm = Slurm(conf, folder, cores, memory_mb)
    env = slurm.env
    commands = [
        [_exe("munged"), "--foreground", "--force", f"--key-file={key}",
         f"--socket={folder}/munge.socket", f"--pid-file={folder}/munged.pid",
         f"--log-file={folder}/munged.log", f"--seed-file={folder}/munged.seed"],
        [_exe("slurmctld"), "-D", "-i", "-f", str(conf)],
        [_exe("slurmd"), "-D", "-f", str(conf), "-N", host],
    ]  # fmt: skip
    procs: list[subprocess.Popen] = []
    try:
        for i, cmd in enumerate(commands):
            out = open(folder / f"{Path(cmd[0]).name}.out", "wb")  # noqa: SIM115 -- the daemon's
            procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT))
            if i == 0:  # slurmctld needs munge's socket
                _wait(lambda: (folder / "munge.socket").exists(), start_timeout, slurm)
        _wait(lambda: _idle(slurm), start_timeout, slurm)
        yield slurm
    finally:
        with contextlib.suppress(Exception):
            subprocess.run(["scancel", "--user", _user()], env=env, timeout=30)
        for p in reversed(procs):  # slurmd first: it reports to slurmctld as it stops
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _idle(slurm: Slurm) -> bool:
    r = subprocess.run(
        ["sinfo", "-h", "-o", "%T"], env=slurm.env, capture_output=True, text=True, timeout=30
    )
    return r.returncode == 0 and r.stdout.strip() == "idle"


def _wait(ready, timeout: float, slurm: Slurm) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the one-node SLURM cluster did not start:\n{slurm.logs()}")
        time.sleep(0.2)
