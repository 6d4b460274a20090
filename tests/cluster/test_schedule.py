"""`mmtrace rerun` recomputes only what changed; `mmtrace schedule` writes one tagged crontab/scrontab entry.

The crontab tests put fake `crontab` / `scrontab` scripts first on PATH, writing to a temporary file: the
real user's table is never touched.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from mmtrace.cluster import schedule
from mmtrace.jobs import rerun as rr
from mmtrace.jobs.config import make_config
from mmtrace.jobs.run import run_trace

DATASET = f"vqa-constraints:{Path(__file__).resolve().parents[3] / 'shared' / 'data' / 'vqa_constraints'}"
if not Path(DATASET.split(":", 1)[1]).is_dir():  # CI: a fresh clone with shared/ beside it
    DATASET = "vqa-constraints:" + str(Path(__file__).resolve().parents[3] / "shared/data/vqa_constraints")

FAKE_CRONTAB = """#!/bin/sh
# crontab -l prints the table (or fails like cron does without one); crontab - replaces it from stdin.
case "$1" in
  -l) if [ -f "$FAKE_TABLE" ]; then cat "$FAKE_TABLE"; else echo "no crontab for $(id -un)" >&2; exit 1; fi ;;
  -) cat > "$FAKE_TABLE" ;;
  *) echo "fake crontab: unexpected $*" >&2; exit 2 ;;
esac
"""
FAKE_SCRONTAB = """#!/bin/sh
# scrontab -l prints the table; scrontab FILE replaces it.
case "$1" in
  -l) if [ -f "$FAKE_TABLE" ]; then cat "$FAKE_TABLE"; else echo "no crontab for $(id -un)" >&2; exit 1; fi ;;
  -*) echo "fake scrontab: unexpected $*" >&2; exit 2 ;;
  *) cp "$1" "$FAKE_TABLE" ;;
esac
"""


@pytest.fixture()
def fake_tables(tmp_path, monkeypatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("crontab", FAKE_CRONTAB), ("scrontab", FAKE_SCRONTAB)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    table = tmp_path / "table.txt"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_TABLE", str(table))
    return table


@pytest.fixture()
def run_dir(tmp_path) -> Path:
    out = tmp_path / "run"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"config": {"model": "m"}}))
    return out


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mmtrace")
    rr.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


# -- the timer -------------------------------------------------------------------------------------------------

def test_crontab_entry_is_exact_idempotent_and_removable(fake_tables, run_dir, capsys):
    fake_tables.write_text("MAILTO=me\n15 * * * * /usr/bin/backup\n")
    assert cli(["schedule", str(run_dir), "--cron", "0 3 * * *"]) == 0
    script = Path(sys.executable).with_name("mmtrace").resolve()
    assert script.is_absolute() and script.is_file()  # the entry point, never `python -m` from a folder
    command = (f"cd {shlex.quote(os.getcwd())} && {shlex.quote(str(script))} rerun "
               f"{shlex.quote(str(run_dir.resolve()))} --no-progress")
    expected = ["MAILTO=me", "15 * * * * /usr/bin/backup", f"# mmtrace:rerun:{run_dir.resolve()}",
                f"0 3 * * * {command} >> {shlex.quote(str(run_dir.resolve() / 'rerun.log'))} 2>&1"]
    assert fake_tables.read_text().splitlines() == expected
    assert capsys.readouterr().out.splitlines() == expected[2:]

    assert cli(["schedule", str(run_dir), "--cron", "0 3 * * *"]) == 0  # twice: still one entry
    assert fake_tables.read_text().splitlines() == expected
    assert cli(["schedule", str(run_dir), "--cron", "30 4 * * 1"]) == 0  # a new time replaces the old one
    lines = fake_tables.read_text().splitlines()
    assert len(lines) == 4 and lines[3].startswith("30 4 * * 1 cd ")

    assert cli(["schedule", str(run_dir), "--remove"]) == 0
    assert fake_tables.read_text().splitlines() == expected[:2]  # other entries kept as they were
    assert cli(["schedule", str(run_dir), "--remove"]) == 0
    assert "no crontab entry" in capsys.readouterr().err


def test_dry_run_prints_and_changes_nothing(fake_tables, run_dir, capsys):
    assert cli(["schedule", str(run_dir), "--cron", "@daily", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"# mmtrace:rerun:{run_dir.resolve()}" and out[1].startswith("@daily cd ")
    assert not fake_tables.exists()


def test_scrontab_block_carries_sbatch_options(fake_tables, run_dir):
    assert cli(["schedule", str(run_dir), "--cron", "0 3 * * *", "--slurm", "--sbatch=--time=30"]) == 0
    lines = fake_tables.read_text().splitlines()
    log = run_dir.resolve() / "rerun.log"
    assert lines[:5] == [f"# mmtrace:rerun:{run_dir.resolve()}", "#SCRON --job-name=mmtrace-rerun",
                         f"#SCRON --output={log}", "#SCRON --open-mode=append", "#SCRON --time=30"]
    assert len(lines) == 6 and lines[5].startswith("0 3 * * * cd ") and lines[5].endswith("--no-progress")
    assert schedule.remove(f"rerun:{run_dir.resolve()}", slurm=True) is True
    assert fake_tables.read_text() == ""


def test_percent_signs_are_escaped_for_cron():
    entry = schedule.Entry(key="k", cron="0 3 * * *", command="date +%F", log="/tmp/l")
    assert entry.lines(slurm=False)[1] == r"0 3 * * * date +\%F >> /tmp/l 2>&1"


@pytest.mark.parametrize("bad", ["0 3 * *", "every day", "0 3 * * * ; rm -rf /", ""])
def test_bad_cron_is_rejected_before_the_table_is_touched(fake_tables, run_dir, bad):
    with pytest.raises(ValueError, match="five fields"):
        cli(["schedule", str(run_dir), "--cron", bad])
    assert not fake_tables.exists()


def test_schedule_and_rerun_refuse_a_folder_that_is_not_a_run_and_write_nothing_in_it(tmp_path, fake_tables):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        cli(["schedule", str(folder), "--cron", "0 3 * * *"])
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        cli(["rerun", str(folder)])
    assert [p.name for p in folder.iterdir()] == ["cat.jpg"] and not fake_tables.exists()


def test_missing_crontab_tool_is_a_clear_error(run_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="crontab not found"):
        schedule.install(rr.schedule_entry(run_dir, "0 3 * * *"))


# -- the rerun ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def traced(llava_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("rerun") / "run"
    cfg = make_config(model=str(llava_dir), dataset=DATASET, out=str(out), kinds="mlp", missing_images="blank",
                      limit=2, progress=False, plots=False)
    result = run_trace(cfg)
    assert (result.computed_units, result.skipped_units) == (2, 0)
    return out


def edit_config(run: Path, **changes) -> None:
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["config"].update(changes)
    (run / "manifest.json").write_text(json.dumps(manifest))


def test_rerun_of_an_unchanged_run_computes_nothing(traced):
    before = sorted(p.name for p in (traced / "units").iterdir())
    result, changed = rr.rerun(traced)
    assert (result.computed_units, result.skipped_units) == (0, 2)
    assert changed == [] and result.reduced.samples == 2
    assert sorted(p.name for p in (traced / "units").iterdir()) == before


def test_rerun_after_a_config_change_computes_only_new_units(traced):
    edit_config(traced, kinds=["mlp", "attn"])  # a new kind: one new slice per sample
    result, changed = rr.rerun(traced)
    assert (result.computed_units, result.skipped_units) == (2, 2) and changed == []
    edit_config(traced, limit=3)  # one more sample: its two slices only
    result, _ = rr.rerun(traced)
    assert (result.computed_units, result.skipped_units) == (2, 4)
    assert result.reduced.samples == 3
    assert len(list((traced / "units").iterdir())) == 6


def test_the_cron_line_runs_from_any_folder(traced, tmp_path):
    """What cron runs: the entry point by absolute path, from a folder holding a decoy `jobs/` package."""
    decoy = tmp_path / "elsewhere"
    (decoy / "jobs").mkdir(parents=True)
    (decoy / "jobs" / "__init__.py").write_text("raise SystemExit('the decoy jobs package was imported')\n")
    (decoy / "jobs" / "rerun.py").write_text("raise SystemExit('the decoy jobs.rerun was imported')\n")
    command = rr.rerun_command(traced).split(" && ", 1)[1]
    done = subprocess.run(command, shell=True, cwd=decoy, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "0 units computed" in done.stderr and "inputs changed: none" in done.stderr
    lost = subprocess.run(command.replace(shlex.quote(str(traced)), shlex.quote(str(decoy / "nowhere"))),
                          shell=True, cwd=decoy, capture_output=True, text=True, timeout=300)
    assert lost.returncode == 2 and "not a run folder" in lost.stderr
    assert not (decoy / "nowhere").exists()  # a folder that is not a run: nothing created in it


def test_the_entry_of_a_deleted_run_can_still_be_removed(fake_tables, run_dir):
    assert cli(["schedule", str(run_dir), "--cron", "0 3 * * *"]) == 0
    (run_dir / "manifest.json").unlink()
    assert cli(["schedule", str(run_dir), "--remove"]) == 0
    assert f"# mmtrace:rerun:{run_dir.resolve()}" not in fake_tables.read_text()


def test_a_hostile_run_path_is_one_quoted_word_of_the_cron_line(fake_tables, tmp_path, monkeypatch):
    """A run folder (and a working folder) named like shell code stays data: the cron line's shell sees each
    path as one word, runs nothing of it, and the log lands at the hostile path itself."""
    hostile = tmp_path / "a b;rm -rf x" / "$(touch pwned) `touch pwned` 100%"
    run_dir, cwd = hostile / "run", hostile / "cwd"
    run_dir.mkdir(parents=True)
    (cwd / "x").mkdir(parents=True)
    (run_dir / "manifest.json").write_text(json.dumps({"config": {"model": "m"}}))
    monkeypatch.chdir(cwd)
    assert cli(["schedule", str(run_dir), "--cron", "0 3 * * *"]) == 0
    line = fake_tables.read_text().splitlines()[-1]
    command = line.split(" ", 5)[5].replace(r"\%", "%")  # what cron hands to sh
    script = str(Path(sys.executable).with_name("mmtrace").resolve())
    log = run_dir.resolve() / "rerun.log"
    assert shlex.split(command) == ["cd", str(cwd.resolve()), "&&", script, "rerun", str(run_dir.resolve()),
                                    "--no-progress", ">>", str(log), "2>&1"]
    done = subprocess.run(["sh", "-c", command.replace(shlex.quote(script), "echo", 1)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert log.read_text() == f"rerun {run_dir.resolve()} --no-progress\n"
    assert (cwd / "x").is_dir() and not list(tmp_path.rglob("pwned"))
