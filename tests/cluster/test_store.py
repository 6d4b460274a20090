"""RunStore's exactly-once publication: what at-least-once backends (Ray retries, Slurm reruns) rely on."""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from mmtrace.cluster.store import STALE_AFTER_S, RunStore, atomic_path, host_tag, write_json


def write_text(text: str):
    def write(folder: Path) -> None:
        (folder / "data.txt").write_text(text)
    return write


def test_commit_twice_keeps_the_first(tmp_path):
    store = RunStore(tmp_path)
    assert store.commit("u1", write_text("first")) is True
    stamp = store.unit_dir("u1").stat().st_ino
    assert store.commit("u1", write_text("second")) is False
    assert (store.unit_dir("u1") / "data.txt").read_text() == "first"
    assert store.unit_dir("u1").stat().st_ino == stamp
    assert store.committed() == {"u1"}
    assert [p.name for p in store.units.iterdir()] == ["u1"]  # the loser's temporary folder is gone


def _racer(root: str, unit_id: str, tag: str, start_at: float, queue) -> None:
    """Commit the same unit as another process at the same instant; the write is slow enough to overlap."""
    def write(folder: Path) -> None:
        (folder / "data.txt").write_text(tag)
        time.sleep(0.3)  # both processes are inside their temporary folders now
    while time.time() < start_at:
        time.sleep(0.001)
    queue.put((tag, RunStore(root).commit(unit_id, write)))


@pytest.mark.parametrize("round_", range(3))
def test_concurrent_commits_publish_one_folder(tmp_path, round_):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    start_at = time.time() + 1.5  # spawned interpreters need a moment to import
    procs = [ctx.Process(target=_racer, args=(str(tmp_path), "u", tag, start_at, queue)) for tag in ("a", "b")]
    for p in procs:
        p.start()
    outcomes = dict(queue.get(timeout=30) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    store = RunStore(tmp_path)
    assert sorted(outcomes.values()) == [False, True]  # exactly one winner
    winner = next(tag for tag, won in outcomes.items() if won)
    assert (store.unit_dir("u") / "data.txt").read_text() == winner
    assert [p.name for p in store.units.iterdir()] == ["u"]
    assert store.committed() == {"u"}


def test_a_failed_write_publishes_nothing(tmp_path):
    store = RunStore(tmp_path)

    def crash(folder: Path) -> None:
        (folder / "half.txt").write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        store.commit("u", crash)
    assert store.committed() == set()
    assert list(store.units.iterdir()) == []
    assert store.commit("u", write_text("retry")) is True


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def temp_folder(store: RunStore, name: str, age_s: float = 0.0) -> Path:
    """A temporary folder as a commit leaves it when killed mid-write, last touched `age_s` ago."""
    folder = store.units / name
    folder.mkdir(parents=True)
    (folder / "data.txt").write_text("half")
    stamp = time.time() - age_s
    os.utime(folder, (stamp, stamp))
    return folder


def test_partial_temp_folders_are_ignored_then_cleaned(tmp_path):
    store = RunStore(tmp_path)
    store.commit("done", write_text("ok"))
    for unit in ("u1", "u2"):  # what a SIGKILL mid-commit leaves: this host, a pid that is gone
        temp_folder(store, f".{unit}.tmp-{host_tag()}-{dead_pid()}-abcdef12")
    assert store.committed() == {"done"}
    assert store.clean_partial() == 2
    assert sorted(p.name for p in store.units.iterdir()) == ["done"]
    assert store.clean_partial() == 0


def test_temp_folders_name_their_writer(tmp_path):
    names = []
    RunStore(tmp_path).commit("u", lambda folder: names.append(folder.name))
    assert re.fullmatch(rf"\.u\.tmp-{re.escape(host_tag())}-{os.getpid()}-[0-9a-f]{{8}}", names[0])


def test_clean_partial_spares_live_writers(tmp_path):
    store = RunStore(tmp_path)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        host = host_tag()
        live = [temp_folder(store, f".a.tmp-{host}-{sleeper.pid}-00000001"),
                temp_folder(store, f".b.tmp-{host}-{os.getpid()}-00000002"),
                temp_folder(store, f".c.tmp-elsewhere_ns1-{dead_pid()}-00000003"),  # another host's pid
                temp_folder(store, ".d.tmp-123-00000004")]  # an older name without a host: age only
        gone = [temp_folder(store, f".e.tmp-{host}-{dead_pid()}-00000005"),
                temp_folder(store, f".f.tmp-elsewhere_ns1-{os.getpid()}-00000006", age_s=STALE_AFTER_S + 60),
                temp_folder(store, ".g.tmp-123-00000007", age_s=STALE_AFTER_S + 60)]
        assert store.clean_partial() == len(gone)
        assert all(p.is_dir() for p in live) and not any(p.exists() for p in gone)
        assert store.clean_partial(max_age_s=0) == len(live)  # a shorter age reaches every folder
    finally:
        sleeper.kill()
        sleeper.wait()


def test_committed_ignores_files_and_hidden_entries(tmp_path):
    store = RunStore(tmp_path)
    store.units.mkdir()
    (store.units / "stray.txt").write_text("not a unit")
    (store.units / ".hidden").mkdir()
    store.commit("u", write_text("x"))
    assert store.committed() == {"u"}


def test_atomic_path_keeps_the_old_file_when_the_write_fails(tmp_path):
    target = tmp_path / "manifest.json"
    write_json(target, {"v": 1})
    with pytest.raises(ValueError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"v": 2, "trunc')
            raise ValueError("interrupted")
    assert target.read_text().replace(" ", "").replace("\n", "") == '{"v":1}'
    assert sorted(os.listdir(tmp_path)) == ["manifest.json"]


def test_manifest_round_trips(tmp_path):
    store = RunStore(tmp_path)
    assert store.read_manifest() is None
    store.write_manifest({"run_id": "abc", "units": ["u1", "u2"]})
    assert store.read_manifest() == {"run_id": "abc", "units": ["u1", "u2"]}


def test_reading_a_folder_writes_nothing_in_it(tmp_path):
    store = RunStore(tmp_path)
    assert store.committed() == set() and store.read_manifest() is None and store.clean_partial() == 0
    assert list(tmp_path.iterdir()) == []
