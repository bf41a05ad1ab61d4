"""Slurm, through submitit: the job options of a grid, submission with dependencies, and the state of jobs.

submitit (``pip install submitit``) pickles a Python call into the job folder and writes the sbatch script. The
state of a job comes from ``squeue`` while it is queued or running and, once it has ended, from the JSON outcome the
job writes itself (``<folder>/<job id>/outcome.json``), so a cluster without accounting (no ``sacct``) works too.
submitit's result pickle is never read back: a results folder is untrusted input.
"""

from __future__ import annotations

import datetime as _dt
import getpass
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..io import read_regular, write_json

__all__ = ["SlurmOptions", "JobState", "Submitter", "time_minutes", "live_jobs", "finished_outcome", "log_tail",
           "require_slurm", "check_job_id", "outcome_path", "write_outcome", "current_job_id"]

OUTCOME_FILE = "outcome.json"
_JOB_ID = re.compile(r"[0-9]+(_[0-9]+)?")  # used with fullmatch: no trailing newline
_MAX_OUTCOME_BYTES = 1 << 20
_ERROR_TAIL = 2000

_TIME = re.compile(r"^(\d+|\d+-\d{1,2}(:\d{2}){0,2}|\d{1,2}(:\d{2}){1,2})$")  # sbatch --time formats
_MEM = re.compile(r"^\d+[KMGT]?$")
_SBATCH_KEY = re.compile(r"^[a-z][a-z0-9-]*$")


@dataclass(frozen=True)
class SlurmOptions:
    """What every job of a grid asks Slurm for (the grid YAML's ``slurm:`` section, then the command line).

    ``time``: minutes (int) or an sbatch time ("2:00:00", "1-00:00:00"), per job. ``mem``: per node, e.g. "16G".
    ``sbatch``: extra ``#SBATCH --KEY=VALUE`` lines (e.g. ``{account: lab, qos: high, gres: "gpu:1"}``).
    ``setup``: shell lines run in the job before Python starts (``module load cuda``, ``source venv/bin/activate``).
    """

    partition: str | None = None
    time: int | str = 60
    gpus_per_task: int = 0
    cpus_per_task: int = 1
    mem: str | None = None
    sbatch: dict[str, str] = field(default_factory=dict)
    setup: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"slurm.{name} must be {expected}, got {getattr(self, name)!r}")

        if self.partition is not None and (not isinstance(self.partition, str) or not self.partition.strip()):
            raise bad("partition", "a partition name")
        if isinstance(self.time, bool) or not (
                (isinstance(self.time, int) and self.time > 0) or (isinstance(self.time, str) and _TIME.match(self.time))):
            raise bad("time", "minutes (an integer > 0) or an sbatch time such as '2:00:00' or '1-00:00:00'")
        for name, low in (("gpus_per_task", 0), ("cpus_per_task", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise bad(name, f"an integer >= {low}")
        if self.mem is not None and (not isinstance(self.mem, str) or not _MEM.match(self.mem)):
            raise bad("mem", "memory per node such as '16G' or '4000M'")
        if not isinstance(self.sbatch, Mapping) or not all(
                isinstance(k, str) and _SBATCH_KEY.match(k) and isinstance(v, (str, int)) and not isinstance(v, bool)
                for k, v in self.sbatch.items()):
            raise bad("sbatch", "a mapping of sbatch option names (without '--') to values, e.g. {account: lab}")
        if not all(isinstance(line, str) for line in self.setup):
            raise bad("setup", "a list of shell lines")

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any] | None, where: str = "slurm") -> "SlurmOptions":
        """Options from a grid's ``slurm:`` section (unknown keys are an error naming the valid ones)."""
        raw = dict(raw or {})
        valid = sorted(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - set(valid))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; valid keys: {', '.join(valid)}")
        if isinstance(raw.get("setup"), str):
            raw["setup"] = [raw["setup"]]
        if "setup" in raw:
            if not isinstance(raw["setup"], (list, tuple)):
                raise ValueError(f"{where}.setup must be a list of shell lines, got {raw['setup']!r}")
            raw["setup"] = tuple(raw["setup"])
        if "sbatch" in raw and isinstance(raw["sbatch"], Mapping):
            raw["sbatch"] = {str(k).lstrip("-"): v for k, v in raw["sbatch"].items()}
        return cls(**raw)

    def updated(self, **changes: Any) -> "SlurmOptions":
        """A copy with the given options changed (``None`` leaves an option as it is; ``sbatch`` entries are added
        to the existing ones, ``setup`` lines appended)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if "sbatch" in changes:
            changes["sbatch"] = {**self.sbatch, **changes["sbatch"]}
        if "setup" in changes:
            changes["setup"] = (*self.setup, *changes["setup"])
        return replace(self, **changes)

    @property
    def minutes(self) -> int:
        """``time`` in whole minutes (submitit also uses it to foresee a job's time-out)."""
        return time_minutes(self.time)

    def submitit_parameters(self) -> dict[str, Any]:
        """The parameters of ``submitit.SlurmExecutor.update_parameters``."""
        params: dict[str, Any] = {"time": self.minutes, "cpus_per_task": self.cpus_per_task}
        if self.partition:
            params["partition"] = self.partition
        if self.gpus_per_task:
            params["gpus_per_task"] = self.gpus_per_task
        if self.mem:
            params["mem"] = self.mem
        if self.sbatch:
            params["additional_parameters"] = {k: str(v) for k, v in self.sbatch.items()}
        if self.setup:
            params["setup"] = list(self.setup)
        return params


def time_minutes(value: int | str) -> int:
    """An sbatch time in whole minutes, rounded up: minutes as an int, or "MM", "MM:SS", "HH:MM:SS", "D-HH",
    "D-HH:MM", "D-HH:MM:SS"."""
    if isinstance(value, int):
        return value
    days, hours = 0, 0
    if "-" in value:
        day_text, value = value.split("-")
        days = int(day_text)
        hours, minutes, seconds = ([int(p) for p in value.split(":")] + [0, 0])[:3]
    else:
        parts = [int(p) for p in value.split(":")]
        if len(parts) == 3:
            hours, minutes, seconds = parts
        else:
            minutes, seconds = (parts + [0])[:2]
    return days * 1440 + hours * 60 + minutes + (1 if seconds else 0)


def require_slurm() -> None:
    """A clear error when this machine cannot submit Slurm jobs (no submitit, or no sbatch/squeue)."""
    missing = [tool for tool in ("sbatch", "squeue", "srun") if shutil.which(tool) is None]
    if missing:
        raise ValueError(f"--executor slurm needs the Slurm commands on this machine: {', '.join(missing)} not "
                         "found on PATH (run it on a login node of the cluster, or use --executor local)")
    try:
        import submitit  # noqa: F401
    except ImportError as err:
        raise ValueError("--executor slurm needs the Python package submitit: pip install submitit") from err


@dataclass(frozen=True)
class JobState:
    """Where one submitted job stands: "pending" or "running" (in the queue), "done" (its call returned),
    "failed" (its call raised, or the job ended without a result: cancelled, out of time or memory)."""

    state: str
    error: str | None = None


class Submitter:
    """Submits Python calls as Slurm jobs through submitit, one ``sbatch`` each; logs and pickles go to
    ``folder/<job id>/``."""

    def __init__(self, folder: Path, options: SlurmOptions) -> None:
        import submitit

        self._executor = submitit.SlurmExecutor(folder=Path(folder) / "%j")
        self._parameters = options.submitit_parameters()

    def submit(self, name: str, fn: Callable[..., Any], args: tuple, after: str | None = None) -> str:
        """Submit ``fn(*args)`` as job ``name`` and return its job id. ``after``: the job id it waits for; it starts
        once that one has ended, whatever its outcome (``afterany``), and records itself what it misses."""
        self._executor.update_parameters(**self._parameters, job_name=name,
                                         dependency=f"afterany:{after}" if after else None)
        return str(self._executor.submit(fn, *args).job_id)


def live_jobs(job_ids: Sequence[str]) -> dict[str, str]:
    """The jobs among ``job_ids`` still in the queue: job id -> "pending" or "running" (one ``squeue`` call)."""
    if not job_ids:
        return {}
    try:
        out = subprocess.run(["squeue", "-h", "-o", "%i|%T", "-u", getpass.getuser()], capture_output=True,
                             text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise RuntimeError(f"squeue failed ({err}); cannot tell which jobs are still running") from err
    wanted = set(job_ids)
    states = {}
    for line in out.splitlines():
        job_id, _, state = line.strip().partition("|")
        if job_id in wanted:
            states[job_id] = "pending" if state in ("PENDING", "CONFIGURING", "REQUEUED") else "running"
    return states


def check_job_id(value: Any, where: str = "job id") -> str:
    """``value`` when it is a Slurm job id as this tool writes them down: digits, or ``<digits>_<digits>`` (an array
    task); else a one-line ValueError (a job id becomes a folder name, so nothing else may pass)."""
    if not isinstance(value, str) or not _JOB_ID.fullmatch(value):
        raise ValueError(f"{where} must be a Slurm job id (digits, or <digits>_<digits>), got {str(value)[:40]!r}")
    return value


def outcome_path(folder: Path, job_id: str) -> Path:
    """Where the job ``job_id`` leaves its outcome: ``<folder>/<job id>/outcome.json``, beside its logs."""
    return Path(folder) / check_job_id(job_id) / OUTCOME_FILE


def current_job_id() -> str | None:
    """The id of the Slurm job this process runs in (submitit's form, ``<id>`` or ``<array id>_<task>``), or None
    outside a job."""
    try:
        import submitit

        job_id = str(submitit.JobEnvironment().job_id)
    except Exception:  # noqa: BLE001 - not inside a submitit job: the plain Slurm variable, if any
        job_id = os.environ.get("SLURM_JOB_ID", "")
    return job_id if _JOB_ID.fullmatch(job_id) else None


def write_outcome(folder: Path, job_id: str, task: str, status: str, *, result: str | None = None,
                  error: str | None = None, record: str | None = None) -> Path:
    """Write (atomically) how a job ended, as JSON: ``status`` "done" or "failed", what its call returned, the tail
    of its error, the record it was to write (relative to the output folder). The job itself writes it; nothing
    ever reads submitit's result pickle back."""
    if status not in ("done", "failed"):
        raise ValueError(f"a job outcome is 'done' or 'failed', got {status!r}")
    data = {"job_id": check_job_id(job_id), "task": task, "status": status, "result": result,
            "error": None if error is None else error[-_ERROR_TAIL:], "record": record,
            "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    return write_json(outcome_path(folder, job_id), data)


def finished_outcome(folder: Path, job_id: str, task: str | None = None) -> JobState:
    """The outcome of a job that has left the queue, from the JSON outcome it wrote itself (:func:`write_outcome`)
    in ``<folder>/<job id>/``. Only that file is read: a regular file of bounded size whose resolved path is inside
    ``folder``, for this job id (and ``task``, when given); anything else is a failed job, said so. The result
    pickle submitit leaves there is never read (anyone who can write the folder could have planted it)."""
    folder = Path(folder)
    path = outcome_path(folder, job_id)
    stderr = folder / job_id / f"{job_id}_0_log.err"
    try:
        data = json.loads(read_regular(path, _MAX_OUTCOME_BYTES, inside=folder).decode())
    except FileNotFoundError:
        return JobState("failed", f"Slurm job {job_id} ended without a result (cancelled, out of time or memory, or "
                                  f"the node failed); its log {stderr}: {log_tail(stderr, inside=folder)}")
    except (OSError, ValueError, RecursionError) as err:  # includes bad JSON and undecodable text
        return JobState("failed", f"Slurm job {job_id}: its outcome file {path} cannot be read ({err})")
    if (not isinstance(data, dict) or data.get("job_id") != job_id or data.get("status") not in ("done", "failed")
            or (task is not None and data.get("task") != task)):
        return JobState("failed", f"Slurm job {job_id}: its outcome file {path} is not the outcome of this job "
                                  f"({'task ' + task if task else 'job ' + job_id}); run the grid again")
    if data["status"] == "done":
        return JobState("done")
    lines = str(data.get("error") or "").strip().splitlines()
    return JobState("failed", f"Slurm job {job_id} raised: {lines[-1][:_ERROR_TAIL] if lines else 'an error'}")


def log_tail(path: Path, lines: int = 3, inside: Path | None = None) -> str:
    """The last lines of a job log, on one line ("(no log)" when there is none or it is not a regular file inside
    ``inside``); only its last 64 KiB are read."""
    try:
        text = read_regular(path, 1 << 16, inside=inside, tail=True).decode(errors="replace").strip().splitlines()
    except (OSError, ValueError):
        return "(no log)"
    return " | ".join(line[:500] for line in text[-lines:]) or "(empty log)"
