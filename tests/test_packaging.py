"""The distribution adds one import name, `mmtrace`, installed or editable, and its console script works."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_only_the_mmtrace_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT),
                    "-w", str(tmp_path)], check=True, capture_output=True, timeout=600)
    [wheel] = tmp_path.glob("mmtrace-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    assert {n.split("/")[0] for n in names} == {"mmtrace", dist_info}
    for module in ("mmtrace/__init__.py", "mmtrace/jobs/cli.py", "mmtrace/workers/trace.py",
                   "mmtrace/cluster/store.py", "mmtrace/cluster/slurm-up.sh",
                   "mmtrace/jobs/organism/weights/organism-v1-seed0/model.safetensors",
                   "mmtrace/jobs/organism/weights/organism-v2-seed0/model.safetensors"):
        assert module in names, module
    assert not any(n.startswith(("mmtrace/tests/", "mmtrace/docker/")) for n in names)


def test_the_installed_environment_has_no_generic_top_level_names(tmp_path):
    """Run from a folder without the repository on the path: only `mmtrace` resolves (editable or not)."""
    probe = ("import importlib.util as u; import mmtrace.jobs.cli, mmtrace.workers.trace, mmtrace.cluster.store; "
             "print([n for n in ('jobs', 'workers', 'cluster') if u.find_spec(n)])")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    script = Path(sys.executable).with_name("mmtrace")
    help_text = subprocess.run([str(script), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert help_text.returncode == 0 and "trace" in help_text.stdout
