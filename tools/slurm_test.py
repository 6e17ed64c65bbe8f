"""`make test-slurm`: the Slurm array on a real one-node Slurm cluster started on this machine.

Installs Debian's `slurm-wlm` and `munge` when missing (as root, with apt-get), starts munged,
slurmctld and slurmd with a private configuration under build/slurm-test/ (nothing in /etc is
changed), then:
1. writes the array for three CPU recipes with `python -m cxr_fast.sweep --slurm`, submits it,
   cancels one job once its first epoch is written, waits for the rest;
2. resubmits the same file: the two finished recipes are skipped, the cancelled one resumes;
3. submits it once more while this process holds one recipe's lock: that job names the holder
   and exits 0;
4. checks that every recipe trained each epoch once, and that its per-epoch validation metrics and
   best.safetensors equal, bit for bit, those of a direct run (`deterministic=true` on CPU).
Skips (exit 0, with the reason) where it cannot run: not root, no apt-get, no network, or a
Slurm controller that this test did not start already answers. Stops the daemons it started.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "build" / "slurm-test"
DATA = ROOT / "build" / "slurm-test-data"  # kept between runs: the phantom and its shards
RECIPES = ["effusion_test_resnet", "edema_test_resnet", "pneumonia_test_resnet"]
EPOCHS = 3
SETTINGS = [f"epochs={EPOCHS}", "batch_size=16", "image_size=64", "logger=none", "deterministic=true",
            "compile=off", f"shards={DATA / 'shards'}"]
TIMEOUT_S = 360  # for each wait on the cluster; the whole test takes a few minutes


class Skip(Exception):
    pass


def say(text: str) -> None:
    print(f"[test-slurm] {text}", flush=True)


def run(*command: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=check, text=True, capture_output=True, **kwargs)


# ------------------------------------------------------------------ the cluster


def install_slurm() -> None:
    if all(shutil.which(tool) for tool in ("sbatch", "slurmctld", "slurmd", "munged")):
        return
    if os.geteuid() != 0:
        raise Skip("slurm-wlm/munge are not installed and installing them needs root")
    if not shutil.which("apt-get"):
        raise Skip("slurm-wlm/munge are not installed and there is no apt-get to install them")
    say("installing slurm-wlm and munge with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
        done = subprocess.run(command, env=env, text=True, capture_output=True)
        if done.returncode != 0:
            raise Skip(f"`{' '.join(command)}` failed (no network to the Debian mirrors?): "
                       f"{(done.stderr or done.stdout).strip().splitlines()[-1:]}")


class Cluster:
    """munged (unless one runs), slurmctld and slurmd on this machine, stopped on exit."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.host = socket.gethostname()
        self.started: list[Path] = []  # pid files of the daemons we started
        self.env = dict(os.environ, SLURM_CONF=str(folder / "slurm.conf"))

    def __enter__(self) -> "Cluster":
        if os.geteuid() != 0:
            raise Skip("starting slurmctld/slurmd needs root")
        if run("scontrol", "ping", check=False).returncode == 0 and "UP" in run("scontrol", "ping", check=False).stdout:
            raise Skip("a Slurm controller already runs on this machine; not touching it")
        shutil.rmtree(WORK, ignore_errors=True)
        for sub in ("state", "spool"):
            (self.folder / sub).mkdir(parents=True)
        self._start_munge()
        self._write_config()
        for daemon in ("slurmctld", "slurmd"):
            pid_file = self.folder / f"{daemon}.pid"
            subprocess.run([daemon, "-f", self.env["SLURM_CONF"]], env=self.env, check=True)
            self.started.append(pid_file)
        self._wait_idle()
        return self

    def _start_munge(self) -> None:
        if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
            return
        Path("/run/munge").mkdir(exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        key = Path("/etc/munge/munge.key")
        if not key.is_file():
            run("runuser", "-u", "munge", "--", "mungekey", "--create", "--keyfile", str(key))
        run("runuser", "-u", "munge", "--", "munged")
        self.started.append(Path("/run/munge/munged.pid"))
        for _ in range(50):
            if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError("munged started but does not answer")

    def _write_config(self) -> None:
        cpus = min(2, os.cpu_count() or 1)
        memory_mb = min(16000, int(_mem_total_kb() / 1024 * 0.9))
        self.cpus = cpus
        (self.folder / "slurm.conf").write_text(f"""\
ClusterName=cxrtest
SlurmctldHost={self.host}
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmUser=root
SlurmdUser=root
MpiDefault=none
ReturnToService=2
StateSaveLocation={self.folder / 'state'}
SlurmdSpoolDir={self.folder / 'spool'}
SlurmctldPidFile={self.folder / 'slurmctld.pid'}
SlurmdPidFile={self.folder / 'slurmd.pid'}
SlurmctldLogFile={self.folder / 'slurmctld.log'}
SlurmdLogFile={self.folder / 'slurmd.log'}
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
KillWait=5
NodeName={self.host} CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=test Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
""")

    def _wait_idle(self) -> None:
        for _ in range(150):
            states = run("sinfo", "-h", "-o", "%T", env=self.env, check=False).stdout.split()
            if "idle" in states:
                say(f"cluster up: node {self.host} idle ({self.cpus} CPUs)")
                return
            time.sleep(0.2)
        raise RuntimeError(f"the node did not become idle; see {self.folder}/slurmd.log and slurmctld.log")

    def submit(self, script: Path, *extra: str) -> str:
        out = run("sbatch", "--parsable", *extra, str(script), env=self.env, cwd=ROOT).stdout.strip()
        return out.split(";")[0]

    def jobs(self, job: str) -> dict[str, str]:
        """array task -> state, for the tasks still known to squeue."""
        lines = run("squeue", "-h", "-r", "-j", job, "-o", "%K %T", env=self.env, check=False).stdout.splitlines()
        return dict(line.split() for line in lines if len(line.split()) == 2)

    def wait(self, job: str) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while self.jobs(job):
            if time.monotonic() > deadline:
                raise RuntimeError(f"job {job} still in the queue after {TIMEOUT_S} s")
            time.sleep(1)

    def __exit__(self, *exc) -> None:
        subprocess.run(["scancel", "--user", "root"], env=self.env, capture_output=True)
        for pid_file in reversed(self.started):
            try:
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
            except (OSError, ValueError):
                pass
        say("daemons stopped")


def _mem_total_kb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1])
    return 16000 * 1024


# ------------------------------------------------------------------ the study


def python(*arguments: str, **kwargs) -> subprocess.CompletedProcess:
    return run(sys.executable, *arguments, cwd=ROOT, **kwargs)


def build_shards() -> None:
    if (DATA / "shards" / "manifest.parquet").is_file():
        return
    data = DATA
    say("building a small phantom and its shards")
    python("-m", "cxr_fast.data.phantom", "--out", str(data / "phantom"), "--n-images", "400", "--seed", "0",
           "--image-size", "128", "--workers", "2")
    python("tools/shard_dataset.py", "--source", "mimic", "--root", str(data / "phantom" / "mimic-cxr-jpg"),
           "--demographics", str(data / "phantom" / "mimic-iv"), "--out", str(data / "shards"), "--size", "80",
           "--shard-size", "64", "--workers", "2", "--no-progress")


def status(recipe: str) -> dict:
    path = WORK / "weights" / recipe / "status.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def cancel_after_first_epoch(cluster: Cluster, job: str) -> str:
    """scancel the first array task whose recipe has written an epoch but not finished."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        running = [task for task, state in cluster.jobs(job).items() if state == "RUNNING"]
        for task in running:
            recipe = RECIPES[int(task)]
            if status(recipe).get("epoch", 0) >= 1 and not status(recipe).get("finished"):
                run("scancel", f"{job}_{task}", env=cluster.env)
                say(f"cancelled {job}_{task} ({recipe}) after epoch {status(recipe)['epoch']}")
                return recipe
        if not cluster.jobs(job):
            break
        time.sleep(0.2)
    raise RuntimeError("no job could be cancelled between its first and last epoch")


def log_of(recipe: str) -> str:
    return (WORK / "logs" / f"{recipe}.log").read_text()


def check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def metrics_without_timing(run: Path) -> list[dict]:
    timing = ("images_per_second", "data_wait_share", "epoch_seconds")
    return [{key: value for key, value in json.loads(line).items() if key not in timing}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def same_weights(first: Path, second: Path) -> bool:
    from safetensors.numpy import load_file

    a, b = load_file(str(first)), load_file(str(second))
    return a.keys() == b.keys() and all((a[name] == b[name]).all() and a[name].dtype == b[name].dtype for name in a)


def test(cluster: Cluster) -> None:
    settings = [*SETTINGS, f"weights_dir={WORK / 'weights'}", f"runs_dir={WORK / 'runs'}"]
    script = WORK / "study.sbatch"
    python("-m", "cxr_fast.sweep", "--tasks", "effusion,edema,pneumonia", "--archs", "test_resnet",
           "--slurm", str(script), "--gpus-per-task", "0", "--cpus-per-task", "1", "--time", "30:00",
           "--logs", str(WORK / "logs"), *settings)
    order = [line for line in script.read_text().split("RECIPES=(\n")[1].split("\n)")[0].splitlines()]
    check(order == RECIPES, f"array order {order} != {RECIPES}")

    # The direct run, alongside the cluster's jobs (same settings, own folders).
    direct = subprocess.Popen([sys.executable, "-m", "cxr_fast.sweep", "--in-process", "--tasks",
                               "effusion,edema,pneumonia", "--archs", "test_resnet", *SETTINGS,
                               f"weights_dir={WORK / 'direct' / 'weights'}", f"runs_dir={WORK / 'direct' / 'runs'}"],
                              cwd=ROOT, stdout=open(WORK / "direct.log", "w"), stderr=subprocess.STDOUT)

    job = cluster.submit(script)
    say(f"submitted array {job}")
    cancelled = cancel_after_first_epoch(cluster, job)
    cluster.wait(job)
    check(not status(cancelled).get("finished"), f"{cancelled} finished although cancelled")
    for recipe in RECIPES:
        if recipe != cancelled:
            check(status(recipe).get("finished"), f"{recipe} did not finish in the first array:\n{log_of(recipe)}")

    job = cluster.submit(script)
    say(f"resubmitted the same file: array {job}")
    cluster.wait(job)
    for recipe in RECIPES:
        text = log_of(recipe)
        check(status(recipe).get("finished") and status(recipe)["epoch"] == EPOCHS, f"{recipe} unfinished:\n{text}")
        check("on " in text and "GPUs: none" in text, f"{recipe}: the log does not name node and GPUs")
        if recipe == cancelled:
            check("resuming after epoch" in text, f"{recipe} did not resume:\n{text}")
        else:
            check(f"{recipe}: already finished" in text, f"{recipe} was not skipped on resubmission:\n{text}")
        epochs = [json.loads(line)["epoch"] for line in (WORK / "runs" / recipe / "metrics.jsonl").read_text().splitlines()]
        check(epochs == list(range(1, EPOCHS + 1)), f"{recipe}: metrics.jsonl epochs {epochs}")

    # One writer per recipe: a job for a recipe whose lock is held names the holder and exits 0.
    from cxr_fast.locks import exclusive_lock

    os.environ["SLURM_JOB_ID"] = "held-by-test-slurm"
    with exclusive_lock(WORK / "weights" / RECIPES[0], what="test holder"):
        job = cluster.submit(script, "--array=0")
        cluster.wait(job)
    del os.environ["SLURM_JOB_ID"]
    last = log_of(RECIPES[0]).strip().splitlines()[-1]
    check(f"{RECIPES[0]}: skipped, running (held by pid {os.getpid()} on {cluster.host}, Slurm job held-by-test-slurm"
          in last, f"the held recipe was not skipped by name: {last!r}")

    say("waiting for the direct run")
    check(direct.wait(timeout=TIMEOUT_S) == 0, f"the direct run failed: see {WORK / 'direct.log'}")
    for recipe in RECIPES:  # the cancelled recipe's best epoch may predate the cancel: compare every epoch too
        check(metrics_without_timing(WORK / "runs" / recipe) == metrics_without_timing(WORK / "direct" / "runs" / recipe),
              f"{recipe}: metrics.jsonl differs from the direct run's")
        check(same_weights(WORK / "weights" / recipe / "best.safetensors",
                           WORK / "direct" / "weights" / recipe / "best.safetensors"),
              f"{recipe}: best.safetensors differs from the direct run's")
    table = python("-m", "cxr_fast.sweep", "--status", "--tasks", "effusion,edema,pneumonia", "--archs",
                   "test_resnet", "--logs", str(WORK / "logs"), *settings).stdout
    print(table, end="")
    check(table.count("finished") >= len(RECIPES), "--status does not show the recipes finished")


def main() -> int:
    os.chdir(ROOT)
    # One thread per process in both the cluster's jobs (inherited through sbatch) and the
    # direct run: the same reductions, so the same bits.
    os.environ.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONPATH=str(ROOT))
    started = time.monotonic()
    try:
        install_slurm()
        build_shards()
        with Cluster(WORK / "cluster") as cluster:
            test(cluster)
    except Skip as reason:
        say(f"SKIPPED: {reason}")
        return 0
    except (AssertionError, RuntimeError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or ""
        say(f"FAILED: {error}\n{detail}")
        return 1
    say(f"passed in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
