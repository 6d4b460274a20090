"""Ray fixtures: one private loopback Ray per test module, and a real `ray start --head` for the cluster path;
and the skip of `slurm` tests where no Slurm cluster runs.

Every Ray here binds 127.0.0.1 (see cluster/ray.py) and keeps its files under pytest's tmp folder, so runs
stay apart and nothing is left in /tmp/ray. A head started with `ray start` is stopped by signalling its own
process tree: `ray stop` would stop every Ray on this shared machine, not just ours.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

RAY_BIN = Path(sys.executable).with_name("ray")
SLURM_UP = "bash cluster/slurm-up.sh"


@functools.cache
def slurm_problem() -> str | None:
    from mmtrace.cluster.slurm import cluster_problem

    return cluster_problem()


def pytest_runtest_setup(item):
    """A test marked `slurm` runs only where a Slurm cluster answers; its skip says how to start one."""
    if item.get_closest_marker("slurm") is None:
        return
    problem = slurm_problem()
    if problem:
        hint = "" if SLURM_UP in problem else f"; start one with `{SLURM_UP}` (root, about 15-30 s)"
        pytest.skip(f"no Slurm cluster: {problem}{hint}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Every process below `pid`. Ray's workers start in process groups of their own, so a group kill misses
    them; collected before the driver dies, the tree names each process we started."""
    from mmtrace.jobs.fullset import descendants as tree

    return [p for p in tree(pid) if p != pid]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited; only its parent's wait is missing
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def kill_tree(leader: subprocess.Popen, first: int = signal.SIGTERM, grace_s: float = 3.0,
              tree: list[int] | None = None) -> None:
    """Stop a process we started and everything below it: `first`, then SIGKILL; return once all are gone.

    Pass `tree` (from `descendants`, taken while the leader lived) when the leader may already be dead,
    since its orphans are then re-parented and no longer found below it.
    """
    pids = [leader.pid, *(tree if tree is not None else descendants(leader.pid))]
    for sig, wait in ((first, grace_s), (signal.SIGKILL, 20.0)):
        signal_all([p for p in pids if alive(p)], sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            leader.poll()
            if not any(alive(p) for p in pids):
                return
            time.sleep(0.1)


def wait_for_port(port: int, proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"no Ray head on 127.0.0.1:{port} after {timeout_s} s")


@pytest.fixture
def process_tree():
    """(descendants, kill_tree), for tests that start and kill drivers."""
    return descendants, kill_tree


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """A private loopback Ray with 2 CPUs in this process, shared by the module's tests, always shut down."""
    ray = pytest.importorskip("ray", reason="ray is not installed")
    from mmtrace.cluster.ray import RayExecutor

    if ray.is_initialized():
        ray.shutdown()
    executor = RayExecutor(num_actors=2, temp_dir=str(tmp_path_factory.mktemp("ray")))
    executor.connect()
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A real head: `ray start --head --block` on loopback, auth off; yields "127.0.0.1:PORT"."""
    pytest.importorskip("ray", reason="ray is not installed")
    if not RAY_BIN.exists():
        pytest.skip(reason=f"no ray command beside {sys.executable}")
    port = free_port()
    temp = tmp_path_factory.mktemp("rayhead")
    from mmtrace.cluster.ray import LOOPBACK_ENV

    env = {**os.environ, **LOOPBACK_ENV, "RAY_AUTH_MODE": "disabled"}
    cmd = [str(RAY_BIN), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
           "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"]
    log = open(temp / "ray-start.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(port, proc)
        yield f"127.0.0.1:{port}"
    finally:
        kill_tree(proc)
        proc.wait(timeout=30)
        log.close()
