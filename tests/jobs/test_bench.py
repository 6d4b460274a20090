"""`mmtrace bench`: the FLOP floor's arithmetic by hand, and one quick bench on the toy shape."""

import math

import pyarrow as pa
import pytest
from transformers import LlamaConfig

from mmtrace.jobs.bench import (
    SHAPES,
    VQA_CONSTRAINTS_QUESTIONS,
    DecoderShape,
    EngineRun,
    bench_trace,
    cell_flops,
    floor_flops,
)
from mmtrace.jobs.cli import BENCH_SHAPES, build_parser

# 3 layers, width 8, 4 query heads of 2 dims sharing 2 key/value heads (GQA), MLP 12.
TINY = DecoderShape(layers=3, width=8, heads=4, kv_heads=2, head_dim=2, intermediate=12)
# Per layer and query (2 FLOPs per multiply-add):
#   q: 2*8*(4*2) = 128   k: 2*8*(2*2) = 64   v: 64   o: 2*(4*2)*8 = 128
#   gate: 2*8*12 = 192   up: 192   down: 2*12*8 = 192            -> 960
# Attention per (query, key) pair: QK^T 2*4*2 = 16, PV 16            -> 32
PER_QUERY, PER_KEY = 960, 32


def test_cell_flops_of_a_full_cell_by_hand():
    # layer_lo 0, position 0, length 5: 5 queries; query q sees keys 0..q, 1+2+3+4+5 = 15 pairs; 3 layers.
    assert PER_QUERY * 5 + PER_KEY * 15 == 5280
    assert int(cell_flops(TINY, 0, 0, 5)) == 3 * 5280 == 15840


def test_cell_flops_of_a_cell_entering_mid_stack_by_hand():
    # layer_lo 1, position 3, length 5: queries 3 and 4 see 4 + 5 = 9 keys; layers 1 and 2 run.
    assert PER_QUERY * 2 + PER_KEY * 9 == 2208
    assert int(cell_flops(TINY, 1, 3, 5)) == 2 * 2208 == 4416
    # layer_lo 2, position 4: the last query (5 keys) through the last layer only.
    assert int(cell_flops(TINY, 2, 4, 5)) == PER_QUERY + PER_KEY * 5 == 1120


def test_cell_flops_is_vectorised_over_cells():
    assert cell_flops(TINY, [0, 1, 2], [0, 3, 4], 5).tolist() == [15840, 4416, 1120]


def test_gqa_makes_key_and_value_projections_narrower():
    mha = DecoderShape(layers=1, width=8, heads=4, kv_heads=4, head_dim=2, intermediate=12)
    # k and v each widen from 2*8*4 = 64 to 2*8*8 = 128 FLOPs per query: 128 more per query, 5 queries.
    assert int(cell_flops(mha, 0, 0, 5)) - int(cell_flops(TINY, 0, 0, 5)) // 3 == 2 * 64 * 5


def test_decoder_shape_reads_a_llama_config():
    config = LlamaConfig(hidden_size=8, num_attention_heads=4, num_key_value_heads=2, intermediate_size=12,
                         num_hidden_layers=3)
    assert DecoderShape.of(config) == TINY


def test_floor_counts_only_computed_cells():
    table = pa.table({"layer_lo": [0, 1, 2], "position": [0, 3, 4], "computed": [False, True, True]})
    run = EngineRun(length=5, image_tokens=0, p_clean=0.5, p_corrupt=0.1, prepare_s=1.0, cells_s=1.0, table=table,
                    reference_s=1.0, reference_cells=1, max_abs_dp=0.0)
    assert floor_flops(run, TINY) == 4416 + 1120


def test_cli_offers_every_shape_and_keeps_the_old_flags():
    assert BENCH_SHAPES == tuple(SHAPES)
    args = build_parser().parse_args(["bench", "--shape", "llava-7b", "--layers", "2", "--device", "cpu", "--dtype",
                                      "bfloat16", "--reference-cells", "3", "--threads", "1", "--json"])
    assert (args.shape, args.layers, args.dtype, args.reference_cells, args.threads, args.json) == \
        ("llava-7b", 2, "bfloat16", 3, 1, True)
    assert build_parser().parse_args(["bench"]).layers is None


@pytest.fixture(scope="module")
def toy_bench():
    return bench_trace(shape="toy", layers=2, reference_cells=4, threads=1, repeats=1)


def test_toy_bench_reports_every_figure(toy_bench):
    figures = ["fast_cells_per_s", "reference_cells_per_s", "ratio", "max_abs_dp", "prepare_s", "sample_s",
               "floor_flops", "matmul_flops_per_s", "floor_s", "cells_over_floor", "total_over_floor",
               "peak_memory_bytes", "projection_hours"]
    for name in figures:
        assert math.isfinite(toy_bench[name]) and toy_bench[name] >= 0, name
    assert toy_bench["max_abs_dp"] <= 1e-5
    assert (toy_bench["layers"], toy_bench["kv_heads"], toy_bench["image_tokens"]) == (2, 2, 576)
    assert toy_bench["reference_cells"] == 4 and toy_bench["computed_cells"] > 0 and toy_bench["floor_flops"] > 0
    assert toy_bench["total_over_floor"] > toy_bench["cells_over_floor"] > 0
    assert toy_bench["projection_hours"] == pytest.approx(toy_bench["sample_s"] * VQA_CONSTRAINTS_QUESTIONS / 3600)
    assert VQA_CONSTRAINTS_QUESTIONS == 9463
    assert toy_bench["projection_unit"] == "CPU-hours" and "CPU-hours, 1 thread" in toy_bench["text"]
    assert "cells / floor" in toy_bench["text"] and "peak memory" in toy_bench["text"]
