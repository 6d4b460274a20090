"""Session fixtures: each tiny model is built from its config once, saved, and loaded like a real checkpoint."""

import pytest
import torch

from mmtrace.workers.adapters import load_adapter
from mmtrace.workers.toy import build_tiny_llama, build_tiny_llava, build_tiny_llava_phi

torch.set_num_threads(1)  # tiny models: a second thread buys little and oversubscribes a busy machine


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava"), layers=4)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), layers=3)


@pytest.fixture(scope="session")
def llava(llava_dir):
    return load_adapter(str(llava_dir))


@pytest.fixture(scope="session")
def llama(llama_dir):
    return load_adapter(str(llama_dir))


@pytest.fixture(scope="session")
def phi_dir(tmp_path_factory):
    return build_tiny_llava_phi(tmp_path_factory.mktemp("tiny-llava-phi"), layers=4)


@pytest.fixture(scope="session")
def phi(phi_dir):
    return load_adapter(str(phi_dir))


@pytest.fixture(scope="session")
def organism_dir(tmp_path_factory):
    """The trained organism (the default model), installed from the shipped weights into a private cache."""
    from mmtrace.jobs.organism import ensure_organism

    return ensure_organism(cache_dir=tmp_path_factory.mktemp("mmtrace-cache"))


@pytest.fixture(scope="session")
def organism(organism_dir):
    return load_adapter(str(organism_dir))
