import json
import math

import pytest
from hypothesis import given, strategies as st

from kvcache.cli import main
from kvcache.sizing import (KVShape, PRESETS, capacity, group_size_for, human_bytes, kv_bytes, kv_dtype, num_blocks_for_budget,
                            block_bytes, parse_bytes, preset)


def test_textbook_example_is_exact():
    shape = KVShape(80, 64, 128)
    assert kv_bytes(shape, 4096, 1, "fp16").total_bytes == 10_737_418_240
    batch32 = kv_bytes(shape, 4096, 32, "fp16").total_bytes
    assert batch32 == 343_597_383_680
    assert human_bytes(batch32) == "343.6 GB"


@given(layers=st.integers(1, 128), heads=st.integers(1, 64), hd=st.sampled_from([32, 64, 128, 256]),
       seq=st.integers(1, 10**6), batch=st.integers(1, 256))
def test_plain_formats_follow_the_formula(layers, heads, hd, seq, batch):
    shape = KVShape(layers, heads, hd)
    for dtype, width in (("fp32", 4), ("fp16", 2), ("bf16", 2)):
        assert kv_bytes(shape, seq, batch, dtype).total_bytes == 2 * layers * heads * hd * seq * batch * width


def test_quantized_formats_pay_for_scales_and_packing():
    # V scales per group of a token; int8's K the same, fp8's and int4's K per channel per block (KIVI)
    shape = KVShape(32, 8, 128)
    codes = 2 * 32 * 8 * 128 * 1000  # one byte per value at 8 bits
    v_scales = 32 * 8 * 1000 * (128 // 64) * 2
    int8 = kv_bytes(shape, 1000, 1, "int8")
    assert int8.total_bytes == codes + 2 * v_scales
    assert kv_bytes(shape, 1024, 1, "int8", block_size=7).bytes_per_element == pytest.approx(1 + 2 / 64)
    k_params = 32 * 8 * 128 * -(-1000 // 16) * 4  # fp16 scale + zero point; 63 blocks of 16 (the last one started)
    assert kv_bytes(shape, 1000, 1, "fp8").total_bytes == codes + v_scales + k_params
    int4 = kv_bytes(shape, 1024, 1, "int4", block_size=32)  # 16 packed bytes + fp16 scale + fp16 zero per 32
    assert int4.total_bytes == 2 * 32 * 8 * 128 * 1024 // 32 * (16 + 4)
    assert int4.bytes_per_element == pytest.approx(0.625)
    assert kv_bytes(shape, 1024, 1, "int4", group_size=128, block_size=32).bytes_per_element == \
        pytest.approx(0.5 + (4 / 32 + 4 / 128) / 2)
    with pytest.raises(ValueError, match="divisor"):
        kv_bytes(shape, 1000, 1, "int4", group_size=48)
    # a head_dim the format's group does not divide takes its largest divisor below the group
    assert [group_size_for(kv_dtype(f), 96, None) for f in ("int8", "fp8", "int4")] == [48, 48, 32]
    assert [group_size_for(kv_dtype(f), 80, None) for f in ("int8", "fp8", "int4")] == [40, 40, 20]
    assert kv_bytes(KVShape(2, 4, 96), 10, 1, "int8").total_bytes == 2 * 2 * 4 * 96 * 10 + 2 * 2 * 4 * 10 * 2 * 2
    with pytest.raises(ValueError, match="no scales"):
        kv_bytes(shape, 1000, 1, "fp16", group_size=32)


def test_mla_caches_one_latent_vector_per_layer():
    ds = preset("deepseek-v3")
    assert kv_bytes(ds.shape, 1000, 1, "bf16").total_bytes == 61 * (512 + 64) * 1000 * 2


def test_hybrid_sliding_layers_cost_at_most_their_window():
    g = preset("gemma-3-27b").shape
    sliding = sum(1 for i in range(62) if g.window_of(i))
    assert (sliding, 62 - sliding) == (52, 10)
    per_token_layer = 2 * 16 * 128 * 2
    est = kv_bytes(g, 32768, 1, "bf16")
    assert est.total_bytes == per_token_layer * (10 * 32768 + 52 * 1024)
    assert est.full_context_bytes == per_token_layer * 62 * 32768
    assert kv_bytes(g, 500, 1, "bf16").total_bytes == per_token_layer * 62 * 500  # under the window: all layers


def test_presets_cover_the_well_known_models():
    for name in ("llama-2-70b", "llama-3-8b", "llama-3-70b", "mistral-7b", "qwen2.5-7b", "gemma-3-27b",
                 "deepseek-v3", "smollm2-135m"):
        assert name in PRESETS
    assert kv_bytes(preset("llama-3-8b").shape, 8192, 1, "fp16").total_bytes == 2 * 32 * 8 * 128 * 8192 * 2


def test_capacity_answers_are_consistent():
    shape = preset("llama-3-8b").shape
    weights = 16 * 10**9
    cap = capacity(shape, 80 * 10**9, weights, 8192, 1, "fp16")
    per_seq = kv_bytes(shape, 8192, 1, "fp16").total_bytes
    assert cap.max_batch_at_seq_len == (64 * 10**9) // per_seq
    assert kv_bytes(shape, cap.max_seq_len_at_batch, 1, "fp16").total_bytes <= cap.kv_budget_bytes
    assert kv_bytes(shape, cap.max_seq_len_at_batch + 1, 1, "fp16").total_bytes > cap.kv_budget_bytes
    cross = cap.crossover_seq_len_at_batch
    assert kv_bytes(shape, cross, 1, "fp16").total_bytes > weights >= kv_bytes(shape, cross - 1, 1, "fp16").total_bytes
    with pytest.raises(ValueError, match="do not fit"):
        capacity(shape, 10 * 10**9, weights, 8192, 1, "fp16")


def test_engine_pool_sizing_uses_the_formula():
    shape = KVShape(30, 3, 64)
    assert block_bytes(shape, 16, "fp32") == kv_bytes(shape, 16, 1, "fp32").total_bytes == 16 * 46080
    assert num_blocks_for_budget(shape, 1 << 30, 16, "fp32") == (1 << 30) // (16 * 46080)
    with pytest.raises(ValueError, match="holds no block"):
        num_blocks_for_budget(shape, 1000, 16, "fp32")


def test_parse_bytes():
    assert parse_bytes("2GB") == 2 * 10**9
    assert parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("80", "g") == 80 * 10**9
    with pytest.raises(ValueError, match="Cannot read"):
        parse_bytes("lots")


def test_size_cli_json_and_text(capsys, tmp_path):
    assert main(["size", "--layers", "80", "--kv-heads", "64", "--head-dim", "128", "--seq-len", "4096",
                 "--batch", "32", "--dtype", "fp16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bytes"] == 343_597_383_680 and out["bytes_per_token"] == 2_621_440
    plot = tmp_path / "kv.png"
    assert main(["size", "--preset", "llama-3-8b", "--memory", "24", "--plot", str(plot)]) == 0
    text = capsys.readouterr().out
    assert "largest batch at 8,192 tokens" in text and "KV outweighs the weights" in text
    assert plot.stat().st_size > 10_000


@pytest.mark.parametrize("argv,message", [
    (["size", "--preset", "nope"], "Unknown preset"),
    (["size", "--layers", "2"], "missing --kv-heads --head-dim"),
    (["size", "--preset", "llama-3-8b", "--dtype", "fp7"], "Unknown KV dtype"),
    (["size", "--preset", "llama-3-70b", "--memory", "10"], "do not fit"),
])
def test_size_cli_bad_input(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
