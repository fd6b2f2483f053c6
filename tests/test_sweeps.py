"""Sweeps across resolutions as users launch them, in subprocesses, and preemption/resume.

    python train.py -m res=16,24 hydra/launcher=submitit_local ...      (test_local_sweep...)
    python train.py -m res=16,24,32 hydra/launcher=submitit_slurm ...   (test_slurm_sweep..., on a real
                                                                          single-node Slurm cluster)
    a Slurm job cancelled mid-stage and re-submitted, then preempted (SIGUSR2, as Slurm sends before
    the time limit) and requeued by submitit, resumes from checkpoints/last.pt each time
                                                                         (test_slurm_killed_and_...)

The Slurm tests start Debian's slurmctld/slurmd/munge through tests/slurm_cluster.py (installing
them with apt-get when missing, as root; skipped otherwise or with VLR_SKIP_SLURM=1).
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import ClusterUnavailable, SlurmCluster, _alive

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "train.py")

# The Slurm launcher asks for one GPU, 8 CPUs and 32 GB per job: shrink it to this 1-node CPU cluster.
# The partition comes through cluster.partition, as from a per-machine conf/local/default.yaml.
SLURM_TEST_LAUNCHER = ["hydra/launcher=submitit_slurm", "cluster.partition=debug",
                       "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1",
                       "hydra.launcher.mem_gb=null", "hydra.launcher.timeout_min=15"]


def _env() -> dict[str, str]:
    # one thread per process: the sweeps run 2-3 jobs side by side on a 2-core machine
    return dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1",
                MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="1")


def _artifact(art_dir: Path, name: str) -> Path:
    """The manifest of the one artifact `name` in a resolution's artifact folder (file names carry the
    lineage key: <name>-<key>.json)."""
    found = list(art_dir.glob(f"{name}-*.json"))
    assert len(found) == 1, (art_dir, name, found)
    return found[0]


def _paths(base: Path, cache: Path) -> list[str]:
    return [f"paths.output_dir={base / 'outputs'}", f"paths.artifacts_dir={base / 'artifacts'}",
            f"paths.cache_dir={cache}", "device=cpu"]


def _train(args: list[str], *, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run train.py in a subprocess from the repository root; fail with its output on error."""
    r = subprocess.run([sys.executable, TRAIN, *args], cwd=ROOT, env=env or _env(), capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, (f"train.py {' '.join(args)} failed ({r.returncode}):\n"
                               f"{r.stdout[-4000:]}\n{r.stderr[-6000:]}")
    return r


def _results(sweep_dir: Path) -> dict[str, tuple]:
    """submitit's result pickles of a sweep: {job folder name: (status, value)}."""
    out = {}
    for p in sorted((sweep_dir / ".submitit").glob("*/*_result.pkl")):
        with p.open("rb") as f:
            out[p.parent.name] = pickle.load(f)
    return out


def _run_dirs(sweep_dir: Path) -> dict[str, Path]:
    """{res: run dir} of the jobs in a sweep, from each job's saved overrides."""
    dirs: dict[str, Path] = {}
    for ov in sorted(sweep_dir.glob("res*/**/.hydra/overrides.yaml")):
        res = [line.split("=", 1)[1].strip() for line in ov.read_text().splitlines() if "- res=" in line]
        assert len(res) == 1, ov
        assert res[0] not in dirs, f"two run dirs for res={res[0]}: {dirs[res[0]]} and {ov.parent.parent}"
        dirs[res[0]] = ov.parent.parent
    return dirs


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _ckpt_step(run_dir: Path) -> int:
    import torch

    p = run_dir / "checkpoints" / "last.pt"
    try:
        return int(torch.load(p, map_location="cpu", weights_only=True)["step"])
    except Exception:  # noqa: BLE001 - absent, or being replaced right now
        return -1


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One data cache for the module (the synthetic faces are rendered once)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def edgeface_weights(tmp_path_factory) -> Path:
    """A stand-in for official EdgeFace weights (random, fixed seed): what the DSR stages need as input."""
    import torch

    import edgeface
    from edgeface.loader import save

    path = tmp_path_factory.mktemp("weights") / "edgeface_xxs_random.pt"
    torch.manual_seed(0)
    save(edgeface.build("edgeface_xxs"), path)
    return path


@pytest.fixture
def cluster():
    """A fresh single-node Slurm cluster; afterwards every daemon it started must be gone."""
    c = SlurmCluster()
    try:
        c.start()
    except ClusterUnavailable as e:
        pytest.skip(str(e))
    pids = {name: p.pid for name, p in c.procs.items()}
    try:
        yield c
    finally:
        c.stop()
    alive = {name: pid for name, pid in pids.items() if _alive(pid)}
    assert not alive, f"daemons still running after stop(): {alive}"


# ---------------------------------------------------------------- submitit_local

def test_local_sweep_runs_one_job_per_res_without_collisions(tmp_path, cache, edgeface_weights):
    args = ["-m", "res=16,24", "hydra/launcher=submitit_local", "experiment=smoke", "stage=initial",
            f"edgeface.weights={edgeface_weights}", *_paths(tmp_path, cache)]
    _train(args, timeout=300)

    sweep = tmp_path / "outputs" / "smoke"
    dirs = _run_dirs(sweep)
    assert sorted(dirs) == ["16", "24"]
    assert len(set(dirs.values())) == 2
    for res, d in dirs.items():
        assert d.relative_to(sweep).parts[:2] == (f"res{res}", "initial"), d
        assert (d / "train.log").is_file() and (d / "checkpoints" / "last.pt").is_file()
        assert [r["step"] for r in _metrics(d) if "val/psnr" in r] == [2]  # smoke: 1 epoch of 2 steps
        manifest = json.loads(_artifact(tmp_path / "artifacts" / f"res{res}", "dsr_initial").read_text())
        assert "val/psnr" in manifest["metrics"]
    results = _results(sweep)
    assert len(results) == 2 and all(status == "success" for status, _ in results.values()), results
    # the sweep summary written at the end of the multirun: one row per job, res the distinguishing column
    rows = [r for r in (sweep / "summary.md").read_text().splitlines() if r.startswith("| ")]
    assert rows[0].startswith("| job | res | val/psnr |") and len(rows) == 3
    assert (sweep / "summary.png").is_file()


# ---------------------------------------------------------------- Optuna

def test_optuna_sweep_of_two_trials_returns_the_metric_and_records_the_best(tmp_path, cache, edgeface_weights):
    """python train.py -m hparams_search=cyclic_optuna: each trial returns optimized_metric from main()."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="needs the sweep extra: pip install -e .[sweep]")
    import yaml

    common = ["experiment=smoke", f"edgeface.weights={edgeface_weights}", *_paths(tmp_path, cache)]
    _train(["stage=cycle", "cycle.eval=false", *common])  # the inputs of the cyclic stage
    _train(["-m", "hparams_search=cyclic_optuna", "hydra.sweeper.n_trials=2",
            "hydra.sweeper.sampler.n_startup_trials=2", *common], timeout=300)

    sweep = tmp_path / "outputs" / "smoke" / "optuna" / "cyclic_res16"
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    trials = sorted(sweep.glob("res16/cyclic/*/final_metrics.json"))
    assert len(trials) == 2  # two trials, two run directories named by their sampled values
    assert all("stages.cyclic.lr=" in p.parent.name and "loss.identity=" in p.parent.name for p in trials)
    aucs = [json.loads(p.read_text())["val/auc"] for p in trials]
    assert best["best_value"] == pytest.approx(max(aucs))
    assert set(best["best_params"]) == {"stages.cyclic.lr", "stages.cyclic.loss.identity"}
    md = (sweep / "summary.md").read_text()
    header = [r for r in md.splitlines() if r.startswith("| job")][0]
    assert "stages.cyclic.lr" in header and header.split("|")[4].strip() == "val/auc"  # optimized metric first


# ---------------------------------------------------------------- Slurm

def test_slurm_sweep_runs_three_jobs_with_three_sets_of_artifacts(tmp_path, cache, cluster):
    args = ["-m", "res=16,24,32", *SLURM_TEST_LAUNCHER, "experiment=smoke", "stage=cycle",
            *_paths(tmp_path, cache)]
    t0 = time.time()
    _train(args, env=dict(cluster.env, **{k: v for k, v in _env().items() if k != "PATH"}), timeout=420)
    cluster.wait_empty(timeout=30)
    print(f"slurm sweep took {time.time() - t0:.1f}s")

    jobs = [j for j in cluster.jobs() if j.get("ArrayTaskId") not in (None, "")]
    assert len(jobs) == 3, jobs
    assert {j["JobState"] for j in jobs} == {"COMPLETED"}, [(j["JobId"], j["JobState"]) for j in jobs]
    assert {j["ExitCode"] for j in jobs} == {"0:0"}
    assert len({j["JobId"] for j in jobs}) == 3  # one Slurm job per resolution

    sweep = tmp_path / "outputs" / "smoke"
    results = _results(sweep)
    assert len(results) == 3 and all(status == "success" for status, _ in results.values()), results
    dirs = _run_dirs(sweep)
    assert sorted(dirs) == ["16", "24", "32"] and len(set(dirs.values())) == 3
    for res in ("16", "24", "32"):
        art = tmp_path / "artifacts" / f"res{res}"
        for name in ("edgeface_pretrained", "dsr_initial", "edgeface_ft", "dsr_cyclic"):
            man_path = _artifact(art, name)
            assert man_path.with_suffix(".pt").is_file(), (res, name)
            manifest = json.loads(man_path.read_text())
            assert str(manifest["res"]) == res
            assert Path(manifest["run_dir"]).parent == dirs[res]  # published by this resolution's job
        results = json.loads((dirs[res] / "eval" / "results.json").read_text())
        assert {"bicubic", "initial", "cyclic"} <= set(results[res]), results[res].keys()
    # the summary, written by the submitting process once the Slurm jobs are done: the cycle's metrics per res
    rows = [r for r in (sweep / "summary.md").read_text().splitlines() if r.startswith("| ")]
    assert rows[0].startswith("| job | res | ") and "cyclic/auc" in rows[0] and len(rows) == 4


def test_slurm_killed_and_preempted_job_resumes_instead_of_restarting(
        tmp_path, cache, cluster, edgeface_weights):
    """A DSR stage on Slurm, interrupted twice, ends where an uninterrupted run ends:
    1. `scancel` mid-epoch (SIGTERM): the job saves checkpoints/last.pt and stops; the user re-submits
       the same command, and the new job resumes from the checkpoint;
    2. SIGUSR2 in a later epoch (what Slurm sends `signal_delay_s` before the time limit, and what a
       preemption with submitit sends): the job saves, requeues itself through submitit, and the
       requeued job resumes.
    The step counter continues each time and the final metrics equal an uninterrupted run's."""
    stage = ["experiment=smoke", "stage=initial", "res=16", f"edgeface.weights={edgeface_weights}",
             "trainer.limit_train_batches=null", "stages.initial.epochs=3", "trainer.ckpt_every=1"]
    total = 3 * 6  # 3 epochs x 6 batches of 8 of the smoke train split
    env = dict(cluster.env, **{k: v for k, v in _env().items() if k != "PATH"})
    ref_base, slurm_base = tmp_path / "ref", tmp_path / "slurm"
    sweep_cmd = [sys.executable, TRAIN, "-m", *SLURM_TEST_LAUNCHER, *stage, *_paths(slurm_base, cache)]
    procs: list[subprocess.Popen] = []

    def start(cmd):
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(p)
        return p

    def wait_for_step(sweep, at_least: int) -> tuple[Path, str]:
        deadline = time.time() + 240
        while time.time() < deadline:
            assert sweep.poll() is None, f"sweep ended early:\n{sweep.stdout.read()[-6000:]}"
            found = list((slurm_base / "outputs" / "smoke").glob("res16/initial/*/checkpoints/last.pt"))
            if found and _ckpt_step(found[0].parent.parent) >= at_least:
                queue = cluster.queue()
                assert len(queue) == 1 and queue[0]["state"] == "RUNNING", queue
                return found[0].parent.parent, queue[0]["id"]
            time.sleep(0.2)
        pytest.fail(f"the Slurm job never reached step {at_least}\n{cluster.queue()}\n{cluster.logs()}")

    try:
        # the uninterrupted reference: a plain local run, side by side with the Slurm jobs
        ref = start([sys.executable, TRAIN, *stage, *_paths(ref_base, cache)])

        # 1. cancelled mid-epoch 1, then re-submitted with the same command
        first = start(sweep_cmd)
        run_dir, first_job = wait_for_step(first, 3)
        cluster.cmd("scancel", first_job)
        cluster.wait_empty(timeout=60)
        first.kill()  # without accounting submitit cannot tell the job is gone: stop waiting, as a user would
        first.wait()
        stopped_at = _ckpt_step(run_dir)
        assert 3 <= stopped_at < total, stopped_at
        assert cluster.job(first_job).get("JobState") == "CANCELLED"

        # 2. the re-submitted job gets SIGUSR2 in epoch 2 or 3, requeues itself and finishes
        second = start(sweep_cmd)
        _, job_id = wait_for_step(second, max(stopped_at + 2, 8))
        assert job_id != first_job
        cluster.cmd("scancel", "--signal=USR2", job_id)
        out, _ = second.communicate(timeout=300)
        assert second.returncode == 0, out[-6000:]
        ref_out, _ = ref.communicate(timeout=300)
        assert ref.returncode == 0, ref_out[-6000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    cluster.wait_empty(timeout=60)  # the launcher returns once the result is written, the job ends just after
    info = cluster.job(job_id)
    assert info.get("JobState") == "COMPLETED" and int(info.get("Restarts", 0)) == 1, info

    log_text = (run_dir / "train.log").read_text()
    assert "received signal 15" in log_text and "received signal 12" in log_text, log_text[-3000:]
    resumed_at = [int(line.rsplit("at step", 1)[1].split()[0]) for line in log_text.splitlines()
                  if "resumed initial" in line]
    assert len(resumed_at) == 2 and resumed_at[0] == stopped_at < resumed_at[1] < total, resumed_at
    rows = _metrics(run_dir)
    steps = [r["step"] for r in rows if "train/loss" in r and "epoch" not in r]
    assert steps == sorted(steps), steps  # continued each time, never restarted from step 1
    assert set(steps) == set(range(1, total + 1)), steps
    assert _ckpt_step(run_dir) == total

    ref_dir = next((ref_base / "outputs" / "smoke").glob("res16/initial/*/metrics.jsonl")).parent
    final = [r for r in rows if "val/psnr" in r][-1]
    ref_final = [r for r in _metrics(ref_dir) if "val/psnr" in r][-1]
    assert final["step"] == ref_final["step"] == total
    for key in ("train/loss", "val/psnr", "val/loss", "val/identity_cos"):
        assert final[key] == pytest.approx(ref_final[key], rel=1e-4, abs=1e-5), (key, final, ref_final)
    published = json.loads(next((slurm_base / "artifacts" / "res16").glob("dsr_initial-*.json")).read_text())
    ref_published = json.loads(next((ref_base / "artifacts" / "res16").glob("dsr_initial-*.json")).read_text())
    assert published["key"] == ref_published["key"]  # same settings and data: the same lineage
    published, ref_published = published["metrics"], ref_published["metrics"]
    assert published["val/psnr"] == pytest.approx(ref_published["val/psnr"], rel=1e-4, abs=1e-5)


def test_slurm_two_task_job_trains_data_parallel(tmp_path, cache, cluster, edgeface_weights):
    """One Slurm job of 2 tasks (submitit's srun: ranks from SLURM_PROCID/SLURM_NTASKS), gloo on the CPU."""
    launcher = ["hydra/launcher=submitit_slurm_ddp", *SLURM_TEST_LAUNCHER[1:], "hydra.launcher.tasks_per_node=2"]
    args = ["-m", "res=16", *launcher, "experiment=smoke", "stage=initial", f"edgeface.weights={edgeface_weights}",
            *_paths(tmp_path, cache)]
    _train(args, env=dict(cluster.env, **{k: v for k, v in _env().items() if k != "PATH"}), timeout=300)
    cluster.wait_empty(timeout=30)
    jobs = cluster.jobs()  # one sweep point: a plain job, not an array
    assert len(jobs) == 1 and jobs[0]["JobState"] == "COMPLETED" and jobs[0]["NumTasks"] == "2", jobs
    manifest = json.loads(_artifact(tmp_path / "artifacts" / "res16", "dsr_initial").read_text())
    assert manifest["world_size"] == 2
    run_dir = _run_dirs(tmp_path / "outputs" / "smoke")["16"]
    rows = _metrics(run_dir)
    assert [r["meta"] for r in rows if "meta" in r] == [{"world_size": 2}]
    assert [r["step"] for r in rows if "val/psnr" in r] == [2]  # rank 0 alone logged
