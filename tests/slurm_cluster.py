"""A throw-away single-node Slurm cluster for the sweep tests (Debian's slurmctld, slurmd, munge).

    with SlurmCluster() as cluster:          # installs the packages when missing (root only)
        subprocess.run([...], env=cluster.env)   # SLURM_CONF points at the generated slurm.conf

What it does, in order:
- installs `munge slurmctld slurmd slurm-client` with apt-get when a binary is missing (only as
  root; otherwise `pytest.skip` with the reason);
- stops the daemons that an earlier run recorded in `<state>/pids.json` and did not stop (a crash,
  a killed pytest), checking each PID's command line names that state folder before signalling it;
- writes a private munge key, a munge socket and a `slurm.conf` in a state folder (node = this
  host's short name, CPUs = nproc, RealMemory = MemTotal minus a margin, free ports, no accounting,
  partition `debug`), so neither a system-wide munged nor a real cluster is touched;
- starts munged, slurmctld and slurmd in the foreground (-F / -D) as children of this process,
  records their PIDs, and waits until `sinfo` shows the node idle (a few seconds);
- on exit cancels what is still queued, stops exactly the daemons it started (by PID: TERM, then
  KILL) and removes the state folder.

The state folder is `$VLR_SLURM_DIR` or `<tmp>/vlr-slurm-<uid>`; a lock file beside it serialises
concurrent users (two pytest runs on one machine).
"""
from __future__ import annotations

import fcntl
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ("munge", "slurmctld", "slurmd", "slurm-client")
BINARIES = ("munged", "slurmctld", "slurmd", "sinfo", "sbatch", "squeue", "scontrol", "scancel")
SBIN = ("/usr/sbin", "/sbin", "/usr/bin", "/bin", "/usr/local/sbin", "/usr/local/bin")


class ClusterUnavailable(RuntimeError):
    """The cluster cannot be had here (not root and packages missing, or opted out)."""


def _which(name: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN])
    return shutil.which(name, path=path)


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if _which(b) is None]


def ensure_installed(log=print) -> float:
    """Install the Debian packages when a binary is missing; returns the seconds it took (0 if none)."""
    missing = missing_binaries()
    if not missing:
        return 0.0
    if os.geteuid() != 0:
        raise ClusterUnavailable(f"Slurm binaries missing ({', '.join(missing)}) and not root: "
                                 f"install {' '.join(PACKAGES)} or run the tests as root")
    if _which("apt-get") is None:
        raise ClusterUnavailable(f"Slurm binaries missing ({', '.join(missing)}) and no apt-get here")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    t0 = time.time()
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    log(f"installing {' '.join(PACKAGES)} with apt-get")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:  # a fresh machine may have no package lists yet
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0 or missing_binaries():
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {r.returncode}); still missing: "
                           f"{missing_binaries()}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    log(f"installed {' '.join(PACKAGES)} in {time.time() - t0:.1f}s")
    return time.time() - t0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _real_memory_mb() -> int:
    kb = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                kb = int(line.split()[1])
    mb = kb // 1024
    return max(256, mb - max(512, mb // 10))


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child still "exists": reap it if it is ours
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        stat = Path(f"/proc/{pid}/stat")
        try:
            return stat.read_text().split(")")[-1].split()[0] != "Z"
        except OSError:
            return False


def _terminate(pid: int, timeout: float = 10.0) -> None:
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.05)


class SlurmCluster:
    """Context manager for a single-node Slurm cluster; see the module docstring."""

    def __init__(self, state_dir: str | os.PathLike | None = None, startup_timeout: float = 60.0,
                 log=print):
        default = Path(tempfile.gettempdir()) / f"vlr-slurm-{os.getuid()}"
        self.root = Path(state_dir or os.environ.get("VLR_SLURM_DIR") or default).resolve()
        self.startup_timeout = startup_timeout
        self.log = log
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.install_s = 0.0
        self.startup_s = 0.0
        self._lock = None

    # ------------------------------------------------------------------ public
    @property
    def env(self) -> dict[str, str]:
        """The environment for client commands and for jobs (sbatch exports it to them)."""
        extra = [d for d in SBIN if d not in os.environ.get("PATH", "").split(os.pathsep)]
        return dict(os.environ, SLURM_CONF=str(self.conf),
                    PATH=os.pathsep.join([os.environ.get("PATH", ""), *extra]).strip(os.pathsep))

    def cmd(self, *args: str, check: bool = True, timeout: float = 30.0) -> str:
        """Run a Slurm client command against this cluster; returns stdout."""
        r = subprocess.run([_which(args[0]) or args[0], *args[1:]], env=self.env, capture_output=True,
                           text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}\n{self.logs()}")
        return r.stdout

    def queue(self) -> list[dict[str, str]]:
        """Jobs slurmctld still lists as pending/running (squeue)."""
        out = self.cmd("squeue", "-h", "-o", "%i|%T|%j|%r")
        rows = []
        for line in out.splitlines():
            jid, state, name, reason = (line.split("|") + ["", "", "", ""])[:4]
            rows.append({"id": jid, "state": state, "name": name, "reason": reason})
        return rows

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (works for finished jobs until MinJobAge)."""
        out = self.cmd("scontrol", "show", "job", "-o", str(job_id), check=False)
        info: dict[str, str] = {}
        for tok in out.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                info.setdefault(k, v)
        return info

    def jobs(self) -> list[dict[str, str]]:
        """Every job slurmctld still remembers (running, pending and recently finished)."""
        out = self.cmd("scontrol", "show", "job", "-o", check=False)
        jobs = []
        for line in out.splitlines():
            if not line.strip() or line.startswith("No jobs"):
                continue
            info: dict[str, str] = {}
            for tok in line.split():
                if "=" in tok:
                    k, v = tok.split("=", 1)
                    info.setdefault(k, v)
            jobs.append(info)
        return jobs

    def wait_empty(self, timeout: float = 120.0, poll: float = 0.5) -> None:
        deadline = time.time() + timeout
        while self.queue():
            if time.time() > deadline:
                raise TimeoutError(f"jobs still queued after {timeout:.0f}s: {self.queue()}\n{self.logs()}")
            time.sleep(poll)

    def logs(self, lines: int = 30) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*.log")):
            tail = f.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {f.name} ---\n" + "\n".join(tail))
        return "\n".join(out)

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "SlurmCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False

    def start(self) -> "SlurmCluster":
        if os.environ.get("VLR_SKIP_SLURM"):
            raise ClusterUnavailable("VLR_SKIP_SLURM is set")
        if os.geteuid() != 0:
            raise ClusterUnavailable("the single-node Slurm cluster needs root "
                                     "(slurmd runs jobs as their user)")
        self.install_s = ensure_installed(self.log)
        t0 = time.time()
        self.root.parent.mkdir(parents=True, exist_ok=True)
        self._lock = open(str(self.root) + ".lock", "w")
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        try:
            self.stop_recorded()
            shutil.rmtree(self.root, ignore_errors=True)
            for sub in ("munge", "ctld", "spool", "log"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            os.chmod(self.root, 0o700)
            os.chmod(self.root / "munge", 0o700)
            key = self.root / "munge" / "munge.key"
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(1024))
            self.conf.write_text(self._slurm_conf())
            self._start_munged(key)
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-f", str(self.conf)])
            self._wait(lambda: self.cmd("scontrol", "ping", check=False, timeout=10).find("UP") >= 0,
                       "slurmctld to answer")
            self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf), "-N", self.node])
            self._wait(self._node_idle, f"node {self.node} to become idle")
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.time() - t0
        self.log(f"slurm cluster up in {self.startup_s:.1f}s (node {self.node}, conf {self.conf})")
        return self

    def stop(self) -> None:
        """Cancel what is left, stop exactly the daemons recorded for this state folder, clean up."""
        try:
            ctld = self.procs.get("slurmctld")
            if ctld is not None and ctld.poll() is None:
                self._cancel_all()
            for name in ("slurmd", "slurmctld", "munged"):  # reverse start order
                p = self.procs.get(name)
                if p is not None and p.poll() is None:
                    _terminate(p.pid)
                if p is not None:
                    try:
                        p.wait(timeout=1)
                    except subprocess.TimeoutExpired:
                        pass
            self.procs.clear()
            self.stop_recorded()
            shutil.rmtree(self.root, ignore_errors=True)
        finally:
            if self._lock is not None:
                fcntl.flock(self._lock, fcntl.LOCK_UN)
                self._lock.close()
                self._lock = None

    def stop_recorded(self) -> list[int]:
        """Stop daemons recorded in <state>/pids.json that are still alive: those of an earlier run
        that crashed or was killed before stopping them (its jobs are cancelled first)."""
        record = self.root / "pids.json"
        if not record.is_file():
            return []
        try:
            pids = {name: int(pid) for name, pid in json.loads(record.read_text()).items()}
        except (OSError, ValueError):
            return []
        # only a process whose command line names this state folder: a reused PID is someone else's
        live = {name: pid for name, pid in pids.items() if _alive(pid) and str(self.root) in _cmdline(pid)}
        if "slurmctld" in live and self.conf.is_file():
            self._cancel_all()
        stopped = []
        for name in ("slurmd", "slurmctld", "munged"):
            if name in live:
                self.log(f"stopping leftover {name} (pid {live[name]}) of an earlier run")
                _terminate(live[name])
                stopped.append(live[name])
        record.unlink(missing_ok=True)
        return stopped

    def _cancel_all(self, timeout: float = 15.0) -> None:
        """scancel every job of this user and wait (briefly) for the queue to drain."""
        try:
            self.cmd("scancel", f"--user={pwd.getpwuid(os.getuid()).pw_name}", check=False, timeout=10)
            deadline = time.time() + timeout
            while time.time() < deadline and self.cmd("squeue", "-h", check=False, timeout=10).strip():
                time.sleep(0.3)
        except (subprocess.SubprocessError, OSError):
            pass  # stopping must go on

    # ------------------------------------------------------------------ internals
    def _slurm_conf(self) -> str:
        r = self.root
        cpus = os.cpu_count() or 1
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:
            pass
        return "\n".join([
            "# generated by tests/slurm_cluster.py: single node, no accounting",
            "ClusterName=vlrtest",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire also delays the restart of a requeued job (default 120 s)
            f"AuthInfo=socket={r / 'munge' / 'munge.socket'},cred_expire=5",
            f"StateSaveLocation={r / 'ctld'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"PlugStackConfig={r / 'plugstack.conf'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=bf_interval=1,sched_interval=2",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",
            "MinJobAge=600",
            "KillWait=5",
            "InactiveLimit=0",
            "Waittime=0",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=60",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={_real_memory_mb()}"
            " State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            "",
        ])

    def _start_munged(self, key: Path) -> None:
        m = self.root / "munge"
        self._spawn("munged", [_which("munged"), "--foreground", "--force", f"--key-file={key}",
                               f"--socket={m / 'munge.socket'}", f"--pid-file={m / 'munged.pid'}",
                               f"--log-file={self.root / 'log' / 'munged.log'}",
                               f"--seed-file={m / 'munged.seed'}"])
        self._wait(lambda: (m / "munge.socket").exists(), "munged's socket")

    def _spawn(self, name: str, argv: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.out.log", "ab")
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                             env=self.env, start_new_session=True)
        out.close()
        self.procs[name] = p
        record = self.root / "pids.json"
        pids = json.loads(record.read_text()) if record.is_file() else {}
        pids[name] = p.pid
        record.write_text(json.dumps(pids))

    def _node_idle(self) -> bool:
        out = self.cmd("sinfo", "-h", "-N", "-n", self.node, "-o", "%t", check=False, timeout=10).strip()
        return out.startswith("idle")

    def _wait(self, ok, what: str) -> None:
        deadline = time.time() + self.startup_timeout
        while True:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode} while waiting for {what}\n"
                                       f"{self.logs()}")
            try:
                if ok():
                    return
            except (subprocess.TimeoutExpired, OSError):
                pass
            if time.time() > deadline:
                raise TimeoutError(f"timed out after {self.startup_timeout:.0f}s waiting for {what}\n"
                                   f"{self.logs()}")
            time.sleep(0.1)


def cluster_or_skip(log=print):
    """Start a cluster for a pytest fixture; skip (with the reason) where none can be had."""
    import pytest

    cluster = SlurmCluster(log=log)
    try:
        cluster.start()
    except ClusterUnavailable as e:
        pytest.skip(str(e))
    return cluster
