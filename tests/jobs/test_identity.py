"""Every content hash changes when what it names changes, and only then."""

from __future__ import annotations

import pytest
from huggingface_hub import constants

from mmtrace.jobs import identity
from mmtrace.jobs.config import make_config
from mmtrace.workers.spec import Sample, TraceSpec

TEMPLATES = {"visual": "<image>\nUSER: {question} Answer in a few words.\nASSISTANT:",
             "text": "USER: {question} Answer in a few words.\nASSISTANT:"}


def base(**changes) -> str:
    args = {"model_fingerprint": "fp", "spec": TraceSpec(), "engine": "fast", "dtype": "float32",
            "templates": TEMPLATES, **changes}
    return identity.unit_base(args.pop("model_fingerprint"), args.pop("spec"), args.pop("engine"), **args)


@pytest.mark.parametrize("change", [
    {"dtype": "bfloat16"}, {"engine": "reference"}, {"model_fingerprint": "hub:org/m@" + "b" * 40},
    {"templates": {**TEMPLATES, "visual": "<image>\nQ: {question}\nA:"}},
    {"spec": TraceSpec(replacement="London")}, {"spec": TraceSpec(seed=1)}, {"spec": TraceSpec(noise_scale=2.0)},
    {"spec": TraceSpec(corruption="noise")}, {"spec": TraceSpec(window=3)},
    {"spec": TraceSpec(window_style="width")},
])
def test_the_unit_base_changes_with_everything_that_changes_numbers(change):
    assert base(**change) != base()


def test_the_unit_base_ignores_what_does_not_change_numbers():
    assert base(spec=TraceSpec(kinds=("mlp",), max_batch=3)) == base()


@pytest.mark.parametrize("flags", [{"dtype": "bfloat16"}, {"engine": "reference"}, {"replacement": "London"},
                                   {"seed": 7}, {"noise_scale": 1.0}, {"window": 2}])
def test_the_run_id_changes_with_the_config_fields_marked_identity(flags):
    def run_id(**f):
        return identity.run_id(make_config(**f).identity(), "fp", "data", TEMPLATES)

    assert run_id(**flags) != run_id()
    assert run_id(out="elsewhere", backend="ray", max_batch=3, device="cuda", progress=False) == run_id()


def test_the_run_id_changes_with_model_data_and_templates():
    ident = make_config().identity()
    ref = identity.run_id(ident, "fp", "data", TEMPLATES)
    assert identity.run_id(ident, "fp2", "data", TEMPLATES) != ref
    assert identity.run_id(ident, "fp", "data2", TEMPLATES) != ref
    assert identity.run_id(ident, "fp", "data", {**TEMPLATES, "text": "{question}"}) != ref


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    """A Hugging Face cache with one repo whose `main` and `v2` point at two commits; offline."""
    repo = tmp_path / "models--org--tiny"
    for ref, commit in (("main", "a" * 40), ("v2", "b" * 40)):
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return repo


def test_a_hub_id_is_fingerprinted_by_its_resolved_commit(hub_cache):
    assert identity.model_fingerprint("org/tiny") == "hub:org/tiny@" + "a" * 40
    assert identity.model_fingerprint("org/tiny", "v2") == "hub:org/tiny@" + "b" * 40
    (hub_cache / "refs" / "main").write_text("b" * 40)  # the branch moved: new weights, new fingerprint
    assert identity.model_fingerprint("org/tiny") == "hub:org/tiny@" + "b" * 40
    with pytest.raises(FileNotFoundError, match="org/absent"):
        identity.model_fingerprint("org/absent")


def test_every_process_of_a_run_loads_the_commit_its_ids_name(hub_cache, tmp_path):
    """A branch that moves mid-run must not put other weights behind the same unit ids."""
    pinned = identity.pinned_revision("org/tiny", "main")
    assert pinned == "a" * 40
    (hub_cache / "refs" / "main").write_text("b" * 40)
    assert identity.model_fingerprint("org/tiny", pinned) == "hub:org/tiny@" + "a" * 40
    assert identity.pinned_revision(str(tmp_path)) is None  # a local folder is fingerprinted by content


def test_a_local_folder_is_fingerprinted_by_content(tmp_path):
    (tmp_path / "config.json").write_text('{"a": 1}')
    (tmp_path / "model.safetensors").write_bytes(b"x" * 100)
    before = identity.model_fingerprint(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"y" * 100)
    assert identity.model_fingerprint(str(tmp_path)) != before


def test_dataset_digest_follows_every_field_and_the_order():
    a = [Sample(sample_id=f"d/{i}", subset="d", question=f"Q {i} this", constraint="this") for i in range(3)]
    assert identity.dataset_digest(a) == identity.dataset_digest(list(a))
    assert identity.dataset_digest(a[::-1]) != identity.dataset_digest(a)
    assert identity.dataset_digest([a[0].with_error("x"), *a[1:]]) != identity.dataset_digest(a)
