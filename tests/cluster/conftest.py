"""Ray fixtures: one private loopback Ray per test module, and a real `ray start --head` for the cluster path.

Every Ray here binds 127.0.0.1 (see cluster/ray.py) and keeps its files under pytest's tmp folder, so runs
stay apart and nothing is left in /tmp/ray. A head started with `ray start` is stopped by killing its own
process group: `ray stop` would stop every Ray on this shared machine, not just ours.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

RAY_BIN = Path(sys.executable).with_name("ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_group(pgid: int, leader: subprocess.Popen | None = None, grace_s: float = 3.0) -> None:
    """SIGTERM a process group we started, then SIGKILL what is left; return once it is gone.

    The leader, if it is our child, is reaped as we go: a zombie still counts as a member of its group.
    """
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 20.0)):
        if leader is not None:
            leader.poll()
        if not group_alive(pgid):
            return
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if leader is not None:
                leader.poll()
            if not group_alive(pgid):
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
def kill_group_fn():
    """`kill_group`, for tests that start drivers in their own sessions."""
    return kill_group


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """A private loopback Ray with 2 CPUs in this process, shared by the module's tests, always shut down."""
    ray = pytest.importorskip("ray", reason="ray is not installed")
    from cluster.ray import RayExecutor

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
        pytest.skip(f"no ray command beside {sys.executable}")
    port = free_port()
    temp = tmp_path_factory.mktemp("rayhead")
    from cluster.ray import LOOPBACK_ENV

    env = {**os.environ, **LOOPBACK_ENV, "RAY_AUTH_MODE": "disabled"}
    cmd = [str(RAY_BIN), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
           "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"]
    log = open(temp / "ray-start.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(port, proc)
        yield f"127.0.0.1:{port}"
    finally:
        kill_group(proc.pid, proc)
        proc.wait(timeout=30)
        log.close()
