"""A real one-node Slurm cluster for tests: munged, slurmctld and slurmd on localhost, all in one folder.

Debian's ``slurmctld``, ``slurmd``, ``slurm-client`` and ``munge`` packages provide the daemons (.ci/run installs
them). Everything they write (munge key and socket, generated slurm.conf, state, spool, logs) lives in the given
folder and the daemons run in the foreground as children of the test process, so nothing of the machine's own
configuration is touched and stopping them leaves nothing running. Needs root (the daemons run as root).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "srun", "scancel")


@dataclass
class OneNodeSlurm:
    """A started cluster: ``env`` holds what a client needs (``SLURM_CONF``)."""

    root: Path
    env: dict[str, str]
    processes: list[subprocess.Popen] = field(default_factory=list)

    def logs(self) -> str:
        """The daemons' last log lines (for a skip or failure message)."""
        parts = []
        for name in ("munged.log", "slurmctld.log", "slurmd.log"):
            path = self.root / name
            text = path.read_text(errors="replace").strip().splitlines()[-4:] if path.exists() else ["(none)"]
            parts.append(f"{name}: " + " | ".join(text))
        return "; ".join(parts)

    def stop(self) -> None:
        """Cancel every job, then stop the daemons (TERM, then KILL after 10 s)."""
        if shutil.which("scancel"):
            subprocess.run(["scancel", "--user", "root"], env={**os.environ, **self.env}, capture_output=True,
                           timeout=30)
        for proc in reversed(self.processes):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.processes):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_conf(root: Path, host: str, node: str, cpus: int, munge_socket: Path) -> str:
    """A slurm.conf for one node on localhost: no accounting, no cgroups, a scheduler that looks every second."""
    return "\n".join([
        "ClusterName=otbrtest",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={_free_port()}",
        f"SlurmdPort={_free_port()}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket}",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "SwitchType=switch/none",
        "MpiDefault=none",
        "MailProg=/bin/true",
        "ReturnToService=2",
        "SchedulerType=sched/backfill",
        "SchedulerParameters=sched_interval=1,bf_interval=1",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "KillWait=5",
        "MinJobAge=600",
        f"NodeName={node} NodeAddr=127.0.0.1 NodeHostname={host} CPUs={cpus} RealMemory=500 State=UNKNOWN",
        f"PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


def start_one_node_slurm(root: Path, timeout_s: float = 60.0) -> OneNodeSlurm:
    """Start munged, slurmctld and slurmd in ``root`` and wait until the node is idle. Raises RuntimeError (with the
    daemons' logs) when the cluster does not come up."""
    missing = missing_tools()
    if missing:
        raise RuntimeError(f"not installed: {', '.join(missing)} (apt-get install slurmctld slurmd slurm-client munge)")
    if os.geteuid() != 0:
        raise RuntimeError("the one-node cluster's daemons need root")
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    for sub in ("state", "spool", "munge"):
        (root / sub).mkdir(exist_ok=True)
    (root / "munge").chmod(0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    sock = root / "munge" / "munge.socket"
    host = socket.gethostname().split(".")[0]
    node = "otbrnode"
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(root, host, node, os.cpu_count() or 1, sock))
    env = {"SLURM_CONF": str(conf)}
    full_env = {**os.environ, **env}
    cluster = OneNodeSlurm(root, env)
    try:
        cluster.processes.append(subprocess.Popen(
            ["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={sock}",
             f"--pid-file={root / 'munge' / 'munged.pid'}", f"--log-file={root / 'munged.log'}",
             f"--seed-file={root / 'munge' / 'munged.seed'}"],
            stdout=subprocess.DEVNULL, stderr=open(root / "munged.log", "a"), env=full_env))
        _wait_for(lambda: sock.exists(), 10, "munged did not create its socket", cluster)
        cluster.processes.append(subprocess.Popen(["slurmctld", "-D", "-i", "-f", str(conf)],
                                                  stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=full_env))
        cluster.processes.append(subprocess.Popen(["slurmd", "-D", "-N", node, "-f", str(conf)],
                                                  stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=full_env))

        def idle() -> bool:
            done = subprocess.run(["sinfo", "-h", "-n", node, "-o", "%t"], env=full_env, capture_output=True,
                                  text=True, timeout=20)
            return done.returncode == 0 and done.stdout.strip().rstrip("*") in ("idle", "mix", "alloc")

        _wait_for(idle, timeout_s, "the node did not become idle", cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait_for(check, timeout_s: float, what: str, cluster: OneNodeSlurm) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        dead = [p.args[0] for p in cluster.processes if p.poll() is not None]
        if dead:
            raise RuntimeError(f"{', '.join(dead)} exited at start; {cluster.logs()}")
        if check():
            return
        time.sleep(0.5)
    raise RuntimeError(f"{what} within {timeout_s:.0f} s; {cluster.logs()}")
