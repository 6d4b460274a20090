"""The config is declared once: YAML keys and CLI flags come from the dataclasses' fields."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from mmtrace.jobs.config import (
    ORGANISM_PRESETS,
    BackendConfig,
    TraceConfig,
    add_config_arguments,
    config_from_args,
    keys,
    make_config,
)
from mmtrace.workers.spec import TraceSpec


def parse(argv: list[str]) -> TraceConfig:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def test_every_leaf_field_is_a_key_and_a_flag():
    leaves = {f.name for f in dataclasses.fields(TraceSpec)} | {"backend", "backend_options"}
    leaves |= {f.name for f in dataclasses.fields(TraceConfig) if f.name not in ("trace", "backend")}
    assert set(keys()) == leaves
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    flags = {a.dest for a in parser._actions if a.dest != "help"}
    assert flags == leaves


def test_flags_reach_the_nested_spec_and_backend():
    cfg = parse(["--model", "m", "--kinds", "mlp,attn", "--window", "2", "--window-style", "width",
                 "--corruption", "noise", "--noise-scale", "1.5", "--backend", "ray",
                 "--backend-option", "num_actors=2", "--backend-option", "address=auto", "--no-progress",
                 "--trust-remote-code", "--images", "okvqa=/data/coco"])
    assert cfg.trace == TraceSpec(kinds=("mlp", "attn"), window=2, window_style="width", corruption="noise",
                                  noise_scale=1.5)
    assert cfg.backend == BackendConfig(name="ray", options={"num_actors": 2, "address": "auto"})
    assert cfg.progress is False and cfg.trust_remote_code is True and cfg.images == {"okvqa": "/data/coco"}


def test_choices_come_from_the_declarations():
    with pytest.raises(SystemExit):
        parse(["--corruption", "blur"])
    with pytest.raises(SystemExit):
        parse(["--engine", "turbo"])
    with pytest.raises(ValueError, match="kinds"):
        parse(["--kinds", "mlp,resid"])


def test_unknown_backend_options_fail_before_any_work():
    with pytest.raises(ValueError, match=r"\['bogus'\] unknown to the ray backend"):
        make_config(backend="ray", backend_options={"bogus": 1})
    assert make_config(backend="slurm", backend_options="partition=gpu").backend.options == {"partition": "gpu"}


def test_yaml_takes_the_cli_text_forms_too(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\nimages: okvqa=/data/coco\nbackend: ray\nbackend_options: [num_actors=2]\n")
    cfg = parse(["--config", str(path)])
    assert cfg.images == {"okvqa": "/data/coco"} and cfg.backend.options == {"num_actors": 2}


def test_help_shows_defaults_and_turned_off_switches():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    text = parser.format_help()
    assert "(default: fast)" in text and "(default: mlp,attn,hidden)" in text and "turn off: progress" in text


def test_yaml_flags_and_unknown_keys(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\nwindow: 5\nkinds: [mlp]\nbackend: slurm\nbackend_options: {partition: gpu}\n")
    cfg = parse(["--config", str(path), "--window", "2"])
    assert cfg.trace.window == 2 and cfg.trace.kinds == ("mlp",)  # the flag wins over the file
    assert cfg.backend == BackendConfig(name="slurm", options={"partition": "gpu"})
    path.write_text("model: m\nwindwo: 5\n")
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['windwo'\]"):
        parse(["--config", str(path)])


def test_the_flat_form_round_trips():
    cfg = make_config(model="m", kinds="mlp", window=3, backend="ray", backend_options={"num_actors": 2})
    assert make_config(cfg.to_flat()) == cfg


def test_identity_is_declared_beside_each_field():
    ident = make_config(model="m").identity()
    assert {"engine", "dtype", "window", "window_style", "corruption", "replacement", "noise_scale",
            "seed", "recheck"} == set(ident)


def test_the_organism_preset_fills_only_what_is_not_given():
    assert ORGANISM_PRESETS[2] == ({"window": 1}, {"limit": 100})  # version 2, the default: window 1
    assert make_config().trace == TraceSpec(window=1) and make_config().limit == 100
    v1 = make_config(model="organism-v1")  # version 1 shows its mechanism at a 3-layer window only
    assert (v1.trace.window, v1.trace.window_style, v1.limit) == (3, "width", 100)
    assert make_config(model="organism-v1", window=1).trace == TraceSpec(window=1)  # given: the authors' rule
    assert make_config(model="organism-v1", window_style="radius").trace == TraceSpec()
    assert make_config(all=True).limit is None
    assert make_config(model="m").trace.window == 1 and make_config(model="m").limit is None
    with pytest.raises(ValueError, match="unknown organism 'organism-v7'"):
        make_config(model="organism-v7")
    with pytest.raises(ValueError, match="--limit or --all"):
        make_config(all=True, limit=5)
