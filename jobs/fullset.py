"""VQA-Constraints traced end to end on the two cluster paths an operator uses, each run checked against its input.

Ray: a head from `cluster/ray-up.sh` (`ray start --head`, every listener on 127.0.0.1), the trace sent with
`ray job submit` (its entrypoint joins the head through `RAY_ADDRESS`), the head stopped after. Slurm:
`cluster/slurm-up.sh`, then `mmtrace trace --backend slurm`. For each it prints the wall time, the samples
(total / ok / error), the cells against the count the samples imply, the peak memory and the addresses
its processes listened on.

Why the checks are made here and not taken from the run's own reduce: they compare the outputs with the
input independently of the code that wrote them. Every input row must have exactly one sample row, ok or an
error naming its row; the cells of each ok sample must number kinds x layers x traced positions
(`num_tokens - first_traced`, the engine's grid), each cell once.

    python -m mmtrace.jobs.fullset --data ../shared/data/vqa_constraints            # all 9,463 rows
    python -m mmtrace.jobs.fullset --data ../shared/data/vqa_constraints --limit 60 # the first 60 rows
    python -m mmtrace.jobs.fullset --data DIR --per-subset 10 --backends ray -- --no-plots
"""

from __future__ import annotations

import argparse
import csv
import ipaddress
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mmtrace.jobs.datasets import SUBSETS, resolve_dataset, span_variants

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
MMTRACE = Path(sys.executable).with_name("mmtrace")
RAY = Path(sys.executable).with_name("ray")
CLIENT_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}  # what cluster/ray-up.sh starts
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
SAMPLES_PER_UNIT = 16


# ------------------------------------------------------------------------------------------------- inputs


def slice_dataset(src: str | Path, dst: str | Path, per_subset: int) -> Path:
    """The first `per_subset` records of each subset's CSV, written to `dst` with the authors' header.

    `--limit` takes the first rows overall (all OK-VQA for any small N); a slice of every subset exercises
    the three files' columns and their own row errors. Records are copied through the csv module, since a
    field may span lines.
    """
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for subset in SUBSETS:
        with open(Path(src) / f"{subset}.csv", newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            rows = [row for _, row in zip(range(per_subset + 1), reader)]
        with open(dst / f"{subset}.csv", "w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows(rows)
    return dst


def trace_args(dataset: str, out: Path, backend: str, limit: int | None, options: Sequence[str] = (),
               extra: Sequence[str] = ()) -> list[str]:
    """`mmtrace trace` with the organism (nothing to download) on blank images (the CSVs ship none), a few
    samples per unit (a unit's commit costs about as much as tracing one of these short questions)."""
    args = [str(MMTRACE), "trace", "--dataset", dataset, "--model", "organism", "--missing-images", "blank",
            "--backend", backend, "--out", str(out), "--samples-per-unit", str(SAMPLES_PER_UNIT)]
    args += ["--limit", str(limit)] if limit else ["--all"]
    for option in options:
        args += ["--backend-option", option]
    return args + list(extra)


# ------------------------------------------------------------------------------------------------- checks


@dataclass
class RunCheck:
    """A run folder held against its input: the counts, and what does not add up (`problems`)."""

    inputs: int
    samples: int = 0
    ok: int = 0
    errors: int = 0
    pending: int = 0
    cells: int = 0
    expected_cells: int = 0
    kinds: int = 0
    layers: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems


def names_its_row(sample_id: str, message: str) -> bool:
    """Whether an error names its row: the sample id (`okvqa/14`) or the dataset's label (`okvqa row 14`)."""
    subset, _, row = sample_id.partition("/")
    label = f"{subset} line {row[4:]}" if row.startswith("line") else f"{subset} row {row}"
    return sample_id in message or label in message


def model_layers(model_path: str | Path) -> int:
    """Decoder layers of the traced checkpoint, read from its config.json (a LLaVA's text_config, or a plain LM)."""
    config = json.loads((Path(model_path) / "config.json").read_text())
    return int(config.get("text_config", config)["num_hidden_layers"])


def check_run(out: str | Path, input_ids: Sequence[str]) -> RunCheck:
    """Hold `out`'s samples.parquet and cells/ against the ids that went in (see the module docstring)."""
    import pandas as pd
    import pyarrow.parquet as pq

    out = Path(out)
    check = RunCheck(inputs=len(input_ids))
    if not (out / "samples.parquet").is_file():
        check.problems.append(f"{out}/samples.parquet does not exist")
        return check
    samples = pd.read_parquet(out / "samples.parquet")
    manifest = json.loads((out / "manifest.json").read_text())
    check.kinds, check.layers = len(manifest["config"]["kinds"]), model_layers(manifest["model"]["path"])
    _check_rows(check, samples, input_ids)
    ok = samples[samples.status == "ok"]
    want = (check.kinds * check.layers * (ok.num_tokens - ok.first_traced)).astype(int)
    check.expected_cells = int(want.sum())
    cells = pq.read_table(out / "cells", columns=["sample_id", "kind", "layer", "window", "position"]).to_pandas()
    check.cells = len(cells)
    _check_cells(check, cells, dict(zip(ok.sample_id, want)))
    return check


def _check_rows(check: RunCheck, samples, input_ids: Sequence[str]) -> None:
    counts = samples.status.value_counts()
    check.samples, check.ok = len(samples), int(counts.get("ok", 0))
    check.errors, check.pending = int(counts.get("error", 0)), int(counts.get("pending", 0))
    ids = samples.sample_id.tolist()
    missing, extra = sorted(set(input_ids) - set(ids)), sorted(set(ids) - set(input_ids))
    repeated = len(ids) - len(set(ids))
    for what, items in (("input rows without a sample row", missing), ("sample rows not in the input", extra)):
        if items:
            check.problems.append(f"{len(items)} {what}: {', '.join(items[:5])}")
    if repeated:
        check.problems.append(f"{repeated} sample rows repeat an id")
    if check.pending or set(counts.index) - {"ok", "error"}:
        check.problems.append(f"statuses other than ok/error: {dict(counts)}")
    errors = samples[samples.status == "error"]
    silent = [s for s, e in zip(errors.sample_id, errors.error) if not isinstance(e, str) or not names_its_row(s, e)]
    if silent:
        check.problems.append(f"{len(silent)} error rows do not name their row: {', '.join(silent[:5])}")


def _check_cells(check: RunCheck, cells, want: dict[str, int]) -> None:
    if check.cells != check.expected_cells:
        check.problems.append(f"{check.cells} cells, expected {check.expected_cells}")
    got = cells.groupby("sample_id").size().to_dict()
    wrong = sorted(s for s in set(got) | set(want) if got.get(s, 0) != want.get(s, 0))
    if wrong:
        check.problems.append(f"{len(wrong)} samples with the wrong number of cells: {', '.join(wrong[:5])}")
    duplicated = int(cells.duplicated().sum())
    if duplicated:
        check.problems.append(f"{duplicated} cells repeat a (sample, kind, layer, window, position)")


# ------------------------------------------------------------------------------------------------- processes


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it, from /proc (Ray's workers run in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, stack = [pid], [pid]
    while stack:
        kids = children.get(stack.pop(), [])
        found += kids
        stack += kids
    return found


def naming(text: str) -> list[int]:
    """Processes whose command line holds `text` (a Slurm job's tasks name their submitit folder)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


def _kib(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")[:60]
    except OSError:
        return "?"


def _socket_inodes(pids: set[int]) -> dict[str, int]:
    inodes = {}
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(fd)
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes[link[8:-1]] = pid
    return inodes


def _address(hex_address: str) -> str:
    """/proc/net/tcp's `0100007F:1F90` (IPv4, or IPv6 as four little-endian words) as `127.0.0.1:8080`."""
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    ip = ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return f"[{ip}]:{int(port, 16)}" if ip.version == 6 else f"{ip}:{int(port, 16)}"


def listening(pids: set[int]) -> list[tuple[int, str]]:
    """(pid, "host:port") of every TCP socket these processes listen on, read from /proc (no `ss` needed)."""
    inodes = _socket_inodes(pids)
    found = []
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for parts in (line.split() for line in lines):
            if parts[3] == "0A" and parts[9] in inodes:  # 0A: LISTEN
                found.append((inodes[parts[9]], _address(parts[1])))
    return found


def is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address.rsplit(":", 1)[0].strip("[]")).is_loopback


class ProcessWatch:
    """Peak memory of a changing set of processes, and every address they listened on, sampled in a thread.

    Memory is two figures: the peak of their summed PSS (shared pages, torch's libraries among them, counted
    once across processes) and the largest peak RSS of any one of them (its VmHWM, so a peak between two
    samples still counts). Reading every process's page tables and sockets costs CPU the run is measured on,
    so memory is sampled every `every_s` and sockets every `sockets_every` samples. Listeners are kept by
    (process name, address): a trace actor's port shows up only while it lives. `select()` names the processes
    at each sample.
    """

    def __init__(self, select: Callable[[], list[int]], every_s: float = 2.0, sockets_every: int = 5):
        self.select, self.every_s, self.sockets_every, self._samples = select, every_s, sockets_every, 0
        self.total_kib, self.largest_kib, self.largest, self.processes = 0, 0, "", 0
        self.listeners: set[tuple[str, str]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProcessWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every_s)

    def sample(self) -> None:
        pids = set(self.select())
        total = sum(_kib(Path(f"/proc/{p}/smaps_rollup"), "Pss") for p in pids)
        self.total_kib = max(self.total_kib, total)
        self.processes = max(self.processes, len(pids))
        for pid in pids:
            peak = _kib(Path(f"/proc/{pid}/status"), "VmHWM")
            if peak > self.largest_kib:
                self.largest_kib, self.largest = peak, process_name(pid)
        if self._samples % self.sockets_every == 0 or self._stop.is_set():
            self.listeners |= {(process_name(pid), address) for pid, address in listening(pids)}
        self._samples += 1

    def exposed(self) -> list[tuple[str, str]]:
        """Listeners seen on an address other than loopback."""
        return sorted((name, a) for name, a in self.listeners if not is_loopback(a))

    def describe_memory(self, what: str) -> str:
        return (f"{self.total_kib / 2**20:.2f} GiB PSS summed over {what} (at most {self.processes} processes); "
                f"largest process {self.largest_kib / 2**10:.0f} MiB peak RSS ({self.largest})")

    def describe_listeners(self) -> str:
        exposed = self.exposed()
        if not exposed:
            return f"{len(self.listeners)} listening sockets seen, all on 127.0.0.1"
        return f"{len(exposed)} of {len(self.listeners)} listening sockets NOT on loopback: {exposed[:5]}"


# ------------------------------------------------------------------------------------------------- Ray


@dataclass
class Head:
    """A head started by cluster/ray-up.sh: its state folder, job server URL and `ray start` pid."""

    state: Path
    url: str
    pid: int
    seconds: float


def ray_up(state: Path, cpus: int | None = None, env: dict[str, str] | None = None) -> Head:
    """Start a loopback head with its job server (cluster/ray-up.sh) under `state` (a short path).

    `env` is added to the head's environment, which every job's entrypoint inherits.
    """
    env = {**os.environ, **(env or {}), "MMTRACE_RAY_DIR": str(state), "RAY": str(RAY)}
    if cpus:
        env["MMTRACE_RAY_CPUS"] = str(cpus)
    started = time.perf_counter()
    done = subprocess.run(["bash", str(CLUSTER / "ray-up.sh")], env=env, stdout=subprocess.PIPE, text=True,
                          check=True, timeout=180)
    pid = int((state / "ray.pid").read_text())
    return Head(state, done.stdout.strip().splitlines()[-1], pid, time.perf_counter() - started)


def ray_down(state: Path, purge: bool = False) -> None:
    """Stop the head under `state` and every process it left (cluster/ray-down.sh); `purge` deletes its logs."""
    subprocess.run(["bash", str(CLUSTER / "ray-down.sh"), *(["--purge"] if purge else [])],
                   env={**os.environ, "MMTRACE_RAY_DIR": str(state)}, check=False, timeout=120)


def submit(head: Head, entrypoint: list[str], log: Path, submission_id: str | None = None) -> str:
    """`ray job submit` the entrypoint and wait for it (the CLI streams the job's output into `log`);
    the job's own status is read from the job server after."""
    submission_id = submission_id or f"mmtrace-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    cmd = [str(RAY), "job", "submit", "--address", head.url, "--submission-id", submission_id, "--", *entrypoint]
    with open(log, "w") as handle:
        subprocess.run(cmd, env={**os.environ, **CLIENT_ENV}, stdout=handle, stderr=subprocess.STDOUT, check=False)
    return submission_id


def job_info(head: Head, submission_id: str, wait_s: float = 60.0) -> dict:
    """The job's status, message and its own start/end times (ms) from the job server's REST API, once the job
    reached a terminal status (read over plain HTTP: no Ray client, so no auth setting in this process)."""
    deadline = time.monotonic() + wait_s
    while True:
        with urllib.request.urlopen(f"{head.url}/api/jobs/{submission_id}", timeout=10) as response:
            info = json.load(response)
        if info["status"] in TERMINAL or time.monotonic() > deadline:
            return {key: info.get(key) for key in ("status", "message", "start_time", "end_time")}
        time.sleep(1)


def run_ray(dataset: str, out: Path, limit: int | None, options: Sequence[str], extra: Sequence[str],
            cpus: int | None) -> dict:
    """The trace as a Ray job on a fresh loopback head, stopped after whatever happens; the head's logs are
    kept (and named) only when the job did not succeed."""
    state = Path(tempfile.mkdtemp(prefix="mmtrace-ray-", dir="/tmp"))
    info: dict = {}
    try:
        head = ray_up(state, cpus)
        entry = trace_args(dataset, out, "ray", limit, options, extra)
        print(f"fullset ray: head up in {head.seconds:.1f} s at {head.url}; job log {out}.log\n  $ ray job submit "
              f"--address {head.url} -- {' '.join(entry)}", file=sys.stderr)
        started = time.perf_counter()
        with ProcessWatch(lambda: descendants(head.pid)) as watch:
            job = submit(head, entry, Path(f"{out}.log"))
        wall = time.perf_counter() - started
        info = job_info(head, job)
    finally:
        succeeded = info.get("status") == "SUCCEEDED"
        ray_down(state, purge=succeeded)
        if not succeeded:
            print(f"fullset ray: the head's logs are in {state}", file=sys.stderr)
    job_s = (info["end_time"] - info["start_time"]) / 1000 if info["end_time"] and info["start_time"] else None
    return {"backend": "ray", "job": job, **info, "wall_s": wall, "job_s": job_s, "head_s": head.seconds,
            "memory": watch.describe_memory("the Ray head's processes: GCS, raylet, dashboard, the job's driver "
                                            "and its actors"), "listeners": watch.describe_listeners()}


# ------------------------------------------------------------------------------------------------- Slurm


def slurm_up() -> float:
    """Start (or find) the single-node Slurm cluster (cluster/slurm-up.sh, root); its seconds."""
    started = time.perf_counter()
    subprocess.run(["bash", str(CLUSTER / "slurm-up.sh")], check=True, timeout=600)
    return time.perf_counter() - started


def run_slurm(dataset: str, out: Path, limit: int | None, options: Sequence[str], extra: Sequence[str]) -> dict:
    """The trace's driver here, its units as a Slurm job array, its reduce a Slurm job."""
    up = slurm_up()
    entry = trace_args(dataset, out, "slurm", limit, options, extra)
    print(f"fullset slurm: cluster up in {up:.1f} s; log {out}.log\n  $ {' '.join(entry)}", file=sys.stderr)
    started = time.perf_counter()
    with ProcessWatch(lambda: naming(str(out))) as watch, open(f"{out}.log", "w") as log:
        done = subprocess.run(entry, stdout=log, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - started
    status = "SUCCEEDED" if done.returncode == 0 else f"FAILED (exit {done.returncode})"
    return {"backend": "slurm", "status": status, "wall_s": wall, "job_s": None, "head_s": up,
            "memory": watch.describe_memory(f"the driver and the Slurm tasks naming {out}"),
            "listeners": watch.describe_listeners()}


# ------------------------------------------------------------------------------------------------- report


def report(result: dict, check: RunCheck, out: Path) -> str:
    """The printout of one backend's run."""
    job = f" job {result['job']}" if result.get("job") else ""
    own = f"; the job's own time {result['job_s']:.1f} s" if result.get("job_s") else ""
    verdict = "ok" if check.passed else "MISMATCH"
    lines = [
        f"== {result['backend']}:{job} {result['status']} in {result['wall_s']:.1f} s wall{own} "
        f"(cluster start {result['head_s']:.1f} s, not included)",
        f"  samples: {check.samples} total, {check.ok} ok, {check.errors} error, {check.pending} pending "
        f"(input rows: {check.inputs})",
        f"  cells: {check.cells:,}, expected {check.expected_cells:,} = sum over ok samples of {check.kinds} kinds x "
        f"{check.layers} layers x (num_tokens - first_traced): {verdict}",
        f"  peak memory: {result['memory']}",
        f"  listeners: {result['listeners']}",
        f"  run folder: {out}  (log: {out}.log)",
    ]
    return "\n".join(lines + [f"  problem: {p}" for p in check.problems])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mmtrace.jobs.fullset", description=__doc__.split("\n\n")[0],
                                epilog="arguments after -- go to `mmtrace trace` as they are (e.g. -- --no-plots)")
    p.add_argument("--data", required=True, help="folder holding okvqa.csv, multimodal_known.csv, "
                                                 "multimodal_movies.csv")
    p.add_argument("--limit", type=int, help="the first N rows overall (subset then file order); default: all")
    p.add_argument("--per-subset", type=int, help="the first N rows of each subset (written under --out)")
    p.add_argument("--backends", default="ray,slurm", help="ray, slurm or both (default ray,slurm)")
    p.add_argument("--out", default="runs/fullset", help="parent of the run folders <out>/ray and <out>/slurm")
    p.add_argument("--cpus", type=int, help="CPUs the Ray head offers, Ray actors and Slurm array tasks "
                                            "(default: every core)")
    p.add_argument("--ray-option", action="append", default=[], metavar="KEY=VALUE", help="a Ray backend option")
    p.add_argument("--slurm-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a Slurm backend option")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.extra = extra
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the set on each backend asked for; exit 0 only when every job succeeded and every check held."""
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = slice_dataset(args.data, out / "data", args.per_subset) if args.per_subset else Path(args.data)
    dataset = f"vqa-constraints:{data.resolve()}/"
    ids = [s.sample_id for s in span_variants(resolve_dataset(dataset, missing_images="blank", limit=args.limit))]
    cpus = args.cpus or os.cpu_count() or 1
    ray_options = [f"num_actors={cpus}", *args.ray_option]
    slurm_options = [f"max_tasks={cpus}", *args.slurm_option]  # one model load per array task: few, long tasks
    passed = True
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        run_out = out / backend
        if backend == "ray":
            result = run_ray(dataset, run_out, args.limit, ray_options, args.extra, cpus)
        elif backend == "slurm":
            result = run_slurm(dataset, run_out, args.limit, slurm_options, args.extra)
        else:
            raise SystemExit(f"unknown backend {backend!r}; use ray, slurm or both")
        check = check_run(run_out, ids)
        print(report(result, check, run_out), flush=True)
        passed &= result["status"] == "SUCCEEDED" and check.passed
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
