"""One writer per run directory: `<run dir>/.lock` names the process that holds it.

A second process on the same run directory refuses at once (`RunLocked`, naming PID and host). The lock
cannot outlive its holder for long: it is stale, and taken over, when
  - its process is gone (same host: the PID no longer exists),
  - it belongs to the same Slurm job (a requeued job resumes its own run, on whichever node), or
  - its heartbeat (the file's mtime, refreshed every `HEARTBEAT_S` by a daemon thread) is older than
    `STALE_S` (a crashed node on a shared file system, or a reused PID).
Created with O_EXCL and taken over by an atomic rename, so two starts cannot both win.
Re-entrant within one process (`train.py` holds the run directory, the stage runner the same one).
Only rank 0 of a data-parallel job (torchrun's RANK, srun's SLURM_PROCID) takes it: the ranks of one job
are one writer.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from cycle.errors import RunLocked, output_error

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0

_held: dict[Path, "RunLock"] = {}  # run dir -> the lock this process holds on it
_guard = threading.Lock()


def slurm_job() -> str | None:
    """This job's identity across requeues (array jobs: `<array job>_<task>`)."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    except ValueError:
        return 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """`with RunLock(run_dir): ...` holds `<run_dir>/.lock` for the duration."""

    def __init__(self, run_dir: str | os.PathLike):
        self.dir = Path(run_dir).resolve()
        self.path = self.dir / LOCK_NAME
        self.token = uuid.uuid4().hex
        self.depth = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def info(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "slurm_job": slurm_job(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": self.token}

    # ------------------------------------------------------------------ acquire / release
    def __enter__(self) -> "RunLock":
        with _guard:
            held = _held.get(self.dir)
            if held is not None:  # re-entrant in this process
                held.depth += 1
                self._outer = held
                return self
            self._outer = None
            if _rank() != 0:  # another rank of the job that rank 0 holds the lock for: nothing to take
                self.depth = 1
                return self
            self._acquire()
            self.depth = 1
            _held[self.dir] = self
        return self

    def __exit__(self, *exc) -> bool:
        with _guard:
            owner = self._outer or self
            owner.depth -= 1
            if owner.depth == 0 and _held.get(owner.dir) is owner:
                _held.pop(owner.dir, None)
                owner._release()
        return False

    def _acquire(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise output_error(self.dir, e, "run directory") from e
        for _ in range(5):
            if self._create():
                self._start_heartbeat()
                return
            holder = self._read()
            why = self._stale(holder)
            if why is None and "pid" not in holder:  # being written by a process starting right now
                time.sleep(0.5)
                continue
            if why is None:
                raise RunLocked(
                    f"{self.dir} is in use by PID {holder.get('pid')} on {holder.get('host')} (since "
                    f"{holder.get('started')}): the same command is already running there. Wait for it to end "
                    f"or stop it; a crashed holder's lock is taken over automatically (after {STALE_S:.0f} s "
                    f"without heartbeat when it ran on another host), or delete {self.path} if you are sure.")
            if self._take_over(holder) and not holder.get("gone"):
                log.warning("took over the stale lock of %s (PID %s on %s: %s)", self.dir, holder.get("pid"),
                            holder.get("host"), why)
        raise RunLocked(f"could not lock {self.dir}: other processes keep taking {self.path}; "
                        "is the same command starting several times at once?")

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise output_error(self.path, e, "run lock") from e
        with os.fdopen(fd, "w") as f:
            json.dump(self.info(), f)
        return True

    def _read(self) -> dict:
        try:
            holder = json.loads(self.path.read_text())
            holder = holder if isinstance(holder, dict) else {}
            holder["age_s"] = time.time() - self.path.stat().st_mtime
            return holder
        except FileNotFoundError:
            return {"gone": True}
        except (OSError, ValueError):  # half-written by a process that died at once: judge by its age
            try:
                return {"age_s": time.time() - self.path.stat().st_mtime}
            except OSError:
                return {"gone": True}

    @staticmethod
    def _stale(holder: dict) -> str | None:
        """Why the lock `holder` describes may be taken over; None while its holder is alive."""
        if holder.get("gone"):
            return "released meanwhile"
        if "pid" not in holder and holder.get("age_s", 0.0) > 10:
            return "an unreadable lock file (its process died while writing it)"
        here = holder.get("host") == socket.gethostname()
        if here and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]):
            return "the process is gone"
        if holder.get("slurm_job") and holder.get("slurm_job") == slurm_job():
            return "the same Slurm job, requeued"
        if holder.get("age_s", 0.0) > STALE_S:
            return f"no heartbeat for {holder['age_s']:.0f} s"
        return None

    def _take_over(self, holder: dict) -> bool:
        """Move the stale lock aside atomically; put it back if another process replaced it meanwhile."""
        if holder.get("gone"):
            return True
        aside = self.path.with_name(f"{LOCK_NAME}.stale.{self.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return True  # someone else moved it: race for the O_EXCL create again
        try:
            moved = json.loads(aside.read_text()).get("token")
        except (OSError, ValueError):
            moved = None
        if moved != holder.get("token"):  # we moved a fresh lock, not the stale one: restore it
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)
        return True

    def _release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if json.loads(self.path.read_text()).get("token") == self.token:
                self.path.unlink()
        except (OSError, ValueError):
            pass

    # ------------------------------------------------------------------ heartbeat
    def _start_heartbeat(self) -> None:
        def beat():
            while not self._stop.wait(HEARTBEAT_S):
                try:
                    os.utime(self.path)
                except OSError:
                    pass
        self._thread = threading.Thread(target=beat, name=f"lock-heartbeat:{self.dir.name}", daemon=True)
        self._thread.start()
