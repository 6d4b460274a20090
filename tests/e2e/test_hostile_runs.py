"""`mmtrace trace` under hostile conditions, each through the real CLI, on the tiny LLaVA and real OK-VQA rows.

Each case checks what the user is told (the file or field, and what to do), that the other samples' results
equal a clean run's, and that nothing half-written is left: no temporary file or folder, every Parquet file
readable. Where a separate process is needed (two drivers at once, SIGKILL), the driver is a subprocess that
pauses inside a unit's commit on a named pipe the test holds, so no case depends on timing or machine load.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_determinism import assert_bit_identical  # tests/e2e is on sys.path (pytest's prepend import mode)

from mmtrace.cluster import store
from mmtrace.jobs.cli import build_parser, main
from mmtrace.jobs.config import config_from_args

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data" / "vqa_constraints"
DATASET = f"vqa-constraints:{DATA}:okvqa"
CELL_KEY = ["sample_id", "kind", "layer", "position"]
POLL_LIMIT_S = 300  # only bounds a failing test; no outcome depends on it

# A driver that pauses inside its n-th unit commit (files written, not yet published) until the test writes
# to the named pipe: the test's hook, not the product's.
PAUSING_DRIVER = """
import sys
from pathlib import Path
from mmtrace.jobs import reduce
from mmtrace.jobs.cli import main

marker, gate, nth = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
real, calls = reduce.write_unit, []

def paused(folder, result):
    real(folder, result)
    calls.append(folder)
    if len(calls) == nth:
        marker.write_text(str(folder))
        with open(gate) as fh:
            fh.read()

reduce.write_unit = paused
sys.exit(main(sys.argv[4:]))
"""


def trace_args(model: Path | str, out: Path, *extra: str, limit: int = 3) -> list[str]:
    return ["trace", "--model", str(model), "--dataset", DATASET, "--limit", str(limit), "--missing-images",
            "blank", "--kinds", "mlp", "--out", str(out), "--no-progress", "--no-plots", *extra]


def cells_of(out: Path) -> pa.Table:
    return pq.read_table(out / "cells").sort_by([(k, "ascending") for k in CELL_KEY])


def samples_of(out: Path) -> pa.Table:
    return pq.read_table(out / "samples.parquet")


def committed(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "units").iterdir() if not p.name.startswith("."))


def assert_tidy(out: Path) -> None:
    """Nothing half-written: no temporary file or folder, one cells version (the linked one), every Parquet
    file readable in full."""
    leftovers = [p for p in out.rglob("*") if store.TMP_MARK in p.name or ".link-" in p.name]
    assert not leftovers, leftovers
    versions = [p.name for p in out.glob(".cells-*")]
    assert versions == ([os.readlink(out / "cells")] if (out / "cells").is_symlink() else []), versions
    for path in out.rglob("*.parquet"):
        pq.read_table(path)


def assert_same_results(out: Path, clean: Path) -> None:
    """Every cell present exactly once and equal to the clean run's; the sample rows equal too."""
    cells = cells_of(out)
    assert cells.num_rows == cells.group_by(CELL_KEY).aggregate([]).num_rows  # no cell twice
    assert_bit_identical(cells, cells_of(clean), "cells")
    assert_bit_identical(samples_of(out), samples_of(clean), "samples")


@pytest.fixture(scope="module")
def clean(llava_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "trace"
    assert main(trace_args(llava_dir, out)) == 0
    assert len(committed(out)) == 3 and samples_of(out).num_rows == 3
    return out


# ------------------------------------------------------------------------------------------------ the model


def test_a_model_path_that_does_not_exist_is_named_before_any_work(tmp_path, capsys):
    missing, out = tmp_path / "no-such-model", tmp_path / "out"
    assert main(trace_args(missing, out)) == 2
    err = capsys.readouterr().err
    assert f"model folder {missing} does not exist" in err and "hub id" in err and "Traceback" not in err
    assert not out.exists()


def test_a_text_only_model_on_image_questions_is_refused_before_any_work(llama_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(trace_args(llama_dir, out)) == 2
    err = capsys.readouterr().err
    assert f"model {llama_dir} is text-only" in err and "have images" in err and "organism:text" in err
    assert not out.exists()


def pickled_copy(model: Path, dest: Path) -> Path:
    """The checkpoint with its weights as `pytorch_model.bin` (pickle) and no safetensors."""
    import torch
    from safetensors.torch import load_file

    dest.mkdir()
    for path in model.iterdir():
        if path.suffix != ".safetensors":
            (dest / path.name).write_bytes(path.read_bytes())
    torch.save(load_file(model / "model.safetensors"), dest / "pytorch_model.bin")
    return dest


def test_pickle_weights_are_refused_unless_the_user_opts_in(llava_dir, clean, tmp_path, capsys):
    model = pickled_copy(llava_dir, tmp_path / "pickled")
    out = tmp_path / "out"
    assert main(trace_args(model, out)) == 2
    err = capsys.readouterr().err
    assert "pytorch_model.bin" in err and "can run code" in err and "--allow-pickle" in err
    assert "allow_pickle: true" in err and not out.exists()
    opt_in = tmp_path / "opt-in.yaml"
    opt_in.write_text("allow_pickle: true\n")
    assert main([*trace_args(model, out), "--config", str(opt_in)]) == 0
    assert_same_results(out, clean)
    assert_tidy(out)


def test_trust_remote_code_and_pickle_are_off_unless_asked(tmp_path, capsys):
    """The defaults, and a checkpoint that names its own code: refused, and the code never runs."""
    cfg = config_from_args(build_parser(["trace"]).parse_args(["trace"]))
    assert cfg.trust_remote_code is False and cfg.allow_pickle is False
    model = tmp_path / "custom-code"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "mmtrace-remote", '
                                       '"auto_map": {"AutoConfig": "remote_config.RemoteConfig"}}')
    (model / "remote_config.py").write_text('from pathlib import Path\nPath(__file__).with_name("ran").touch()\n')
    out = tmp_path / "out"
    assert main(trace_args(model, out)) == 2
    err = capsys.readouterr().err
    assert f"model {model} needs its own Python code" in err and "--trust-remote-code" in err
    assert not (model / "ran").exists() and not out.exists()


def test_a_corruption_that_moves_nothing_gives_nan_not_inf(llava_dir, tmp_path, capsys):
    """`--replacement this` on questions whose constraint is the single token " this": the corrupted run is
    the clean run, p_clean == p_corrupt, so ie_norm is NaN (0/0), and the summaries skip it."""
    out = tmp_path / "out"
    assert main(trace_args(llava_dir, out, "--replacement", "this", limit=4)) == 0
    samples = samples_of(out).to_pandas().set_index("sample_id")
    unmoved = samples.index[(samples.status == "ok") & (samples.p_clean == samples.p_corrupt)]
    assert "okvqa/0" in unmoved and 0 < len(unmoved) < (samples.status == "ok").sum()  # some moved, some not
    cells = cells_of(out).to_pandas()
    mine = cells.sample_id.isin(unmoved)
    assert cells.loc[mine, "ie_norm"].isna().all()
    assert cells.loc[~mine, "ie_norm"].notna().all()
    summary = pq.read_table(out / "summary.parquet").to_pandas()
    numeric = summary.select_dtypes("number")
    assert not numeric.isin([float("inf"), float("-inf")]).any().any()
    assert (summary.n_norm == summary.n - len(unmoved)).all()
    assert summary.loc[summary.n_norm > 0, "mean_ie_norm"].notna().all()
    assert "nan" not in (out / "summary.md").read_text().lower()
    assert_tidy(out)


# ------------------------------------------------------------------------------------------------ the folder


@pytest.fixture()
def read_only(tmp_path, monkeypatch) -> Path:
    """A folder nothing can be written under: its mode where permissions bind; for root (whom modes do not
    bind) the kernel's answer, EACCES, given to every mkdir and open for writing under it."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    real_mkdir, real_open = os.mkdir, os.open

    def denied(path) -> bool:
        return Path(os.fsdecode(path)).absolute().is_relative_to(folder)

    def mkdir(path, *args, **kwargs):
        if denied(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))
        return real_mkdir(path, *args, **kwargs)

    def open_(path, flags, *args, **kwargs):
        if denied(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)
    yield folder


def test_a_read_only_output_folder_is_named_before_any_work(llava_dir, read_only, capsys, monkeypatch):
    monkeypatch.setattr("mmtrace.jobs.run.TraceWorker", lambda *a, **k: pytest.fail("a worker was built"))
    out = read_only / "trace"
    assert main(trace_args(llava_dir, out)) == 2
    err = capsys.readouterr().err
    assert f"cannot write to the output folder {out}" in err and "make it writable" in err
    assert "Traceback" not in err and not out.exists()


def test_an_output_path_that_is_a_file_is_named(llava_dir, tmp_path, capsys):
    out = tmp_path / "a-file"
    out.write_text("not a folder")
    assert main(trace_args(llava_dir, out)) == 2
    assert f"the output folder {out} exists and is not a folder" in capsys.readouterr().err


def test_a_full_disk_leaves_nothing_half_written_and_a_later_run_completes(llava_dir, clean, tmp_path, capsys,
                                                                          monkeypatch):
    """The disk fills while the second unit is written: that unit and the third are not committed, the
    reduce cannot publish either; the error says so, and `--resume` with space completes the run."""
    from mmtrace.jobs import reduce

    out = tmp_path / "out"
    real_write, real_replace = reduce.write_unit, os.replace
    writes = []

    def full() -> OSError:
        """As pyarrow raises it: the errno, and no file name."""
        return OSError(errno.ENOSPC, f"Error writing bytes to file. Detail: [errno {errno.ENOSPC}] "
                                     f"{os.strerror(errno.ENOSPC)}")

    def write_unit(folder, result):
        writes.append(folder)
        if len(writes) == 1:
            return real_write(folder, result)
        (folder / reduce.UNIT_CELLS).write_bytes(b"PAR1 half a file")
        raise full()

    def replace(src, dst, **kwargs):
        if len(writes) > 1 and Path(os.fsdecode(dst)).is_relative_to(out):
            raise full()
        return real_replace(src, dst, **kwargs)

    monkeypatch.setattr(reduce, "write_unit", write_unit)
    monkeypatch.setattr(os, "replace", replace)
    assert main(trace_args(llava_dir, out)) == 2
    err = capsys.readouterr().err
    assert f"cannot write to the output folder {out}: " in err and "No space left on device" in err
    assert "free space" in err and "--resume" in err and "Traceback" not in err
    assert len(committed(out)) == 1 and not (out / "cells").exists()
    assert_tidy(out)

    monkeypatch.setattr(reduce, "write_unit", real_write)
    monkeypatch.setattr(os, "replace", real_replace)
    assert main(["trace", "--resume", "--out", str(out), "--no-progress"]) == 0
    assert "2 units computed, 1 already committed" in capsys.readouterr().err
    assert_same_results(out, clean)
    assert_tidy(out)


# ------------------------------------------------------------------------------------------------ the config


@pytest.mark.parametrize(("text", "said"), [
    ("windw: 3\n", "unknown config key(s) ['windw']"),
    ("window: abc\n", "config key 'window' wants an integer, got 'abc' (str)"),
    ("window: [1]\n", "config key 'window' wants an integer, got [1] (list)"),
    ("window: true\n", "config key 'window' wants an integer, got True (bool)"),
    ("kinds: 3\n", "config key 'kinds' wants a list (each item a string), got 3 (int)"),
    ("plots: maybe\n", "config key 'plots' wants true or false, got 'maybe' (str)"),
    ("images: 3\n", "config key 'images' wants a mapping, got 3 (int)"),
])
def test_a_config_file_with_an_unknown_key_or_a_wrong_type_is_refused_before_any_work(tmp_path, capsys, text,
                                                                                       said):
    config, out = tmp_path / "run.yaml", tmp_path / "out"
    config.write_text(text)
    assert main(["trace", "--config", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"mmtrace: error: {config}: {said}" in err
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ processes


def subprocess_env() -> dict:
    """One thread, as the in-process clean run (conftest), so the numbers agree bit for bit."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


class PausedDriver:
    """`mmtrace trace` in a subprocess, paused inside its n-th unit commit until `release()` or killed."""

    def __init__(self, tmp_path: Path, argv: list[str], nth: int):
        self.marker, self.gate = tmp_path / "paused", tmp_path / "gate"
        os.mkfifo(self.gate)
        script = tmp_path / "driver.py"
        script.write_text(PAUSING_DRIVER)
        self.log = tmp_path / "driver.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, str(script), str(self.marker), str(self.gate), str(nth),
                                          *argv], cwd=REPO, env=subprocess_env(), stdout=log, stderr=log)

    def wait_paused(self) -> Path:
        """The temporary folder of the commit it paused in, once it is there."""
        deadline = time.monotonic() + POLL_LIMIT_S
        while not (self.marker.exists() and self.marker.read_text()):
            assert self.proc.poll() is None, f"the driver ended before pausing:\n{self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the driver never reached its commit"
            time.sleep(0.05)
        return Path(self.marker.read_text())

    def release(self) -> int:
        with open(self.gate, "w"):
            pass
        return self.proc.wait(timeout=POLL_LIMIT_S)

    def kill(self) -> int:
        self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait(timeout=POLL_LIMIT_S)


def test_a_second_run_into_the_same_folder_is_refused_while_the_first_writes(llava_dir, clean, tmp_path):
    out = tmp_path / "out"
    first = PausedDriver(tmp_path, trace_args(llava_dir, out), nth=1)
    try:
        first.wait_paused()
        second = subprocess.run([str(Path(sys.executable).with_name("mmtrace")), *trace_args(llava_dir, out)],
                                cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                                timeout=POLL_LIMIT_S)
        assert second.returncode == 2, second.stderr[-3000:]
        said = re.search(r"another mmtrace run \(pid (\d+), host (\S+)\) is writing to (\S+); wait for it or use "
                         r"another --out", second.stderr)
        assert said and int(said.group(1)) == first.proc.pid and said.group(3) == str(out), second.stderr
        assert "Traceback" not in second.stderr
    finally:
        rc = first.release()
    assert rc == 0, first.log.read_text()[-3000:]
    assert committed(out) == committed(clean)
    assert_same_results(out, clean)
    assert_tidy(out)


def test_a_driver_killed_mid_commit_resumes_to_the_clean_result(llava_dir, clean, tmp_path, capsys):
    """SIGKILL while the second unit's files sit in their temporary folder, not yet renamed: the unit is not
    committed, the lock dies with the process, and `--resume` redoes exactly what is missing."""
    out = tmp_path / "out"
    driver = PausedDriver(tmp_path, trace_args(llava_dir, out), nth=2)
    try:
        half = driver.wait_paused()
    finally:
        assert driver.kill() == -signal.SIGKILL
    assert half.is_dir() and half.parent == out / "units" and store.TMP_MARK in half.name
    assert len(committed(out)) == 1
    assert main(["trace", "--resume", "--out", str(out), "--no-progress"]) == 0
    assert "2 units computed, 1 already committed" in capsys.readouterr().err
    assert not half.exists()
    assert committed(out) == committed(clean)
    assert_same_results(out, clean)
    assert_tidy(out)


# ------------------------------------------------------------------------------------------------ servers


def test_every_server_the_project_starts_listens_on_loopback():
    """Ray started by the executor, the `ray-up.sh` head with its dashboard, and the Slurm daemons' clients are
    pinned to 127.0.0.1 (tests/cluster/test_fullset.py checks the live listeners of a ray-up.sh head)."""
    ray_py = (REPO / "cluster" / "ray.py").read_text()
    assert 'include_dashboard=False, _node_ip_address="127.0.0.1"' in ray_py
    ray_up = (REPO / "cluster" / "ray-up.sh").read_text()
    assert "HOST=127.0.0.1" in ray_up
    assert '--node-ip-address="$HOST"' in ray_up and '--dashboard-host="$HOST"' in ray_up
    slurm_up = (REPO / "cluster" / "slurm-up.sh").read_text()
    for line in ("--bind-address=127.0.0.1", "NodeAddr=127.0.0.1", "DbdAddr=127.0.0.1", "StorageHost=127.0.0.1",
                 "AccountingStorageHost=127.0.0.1", "CommunicationParameters=NoInAddrAny"):
        assert line in slurm_up, line

