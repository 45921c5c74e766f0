"""Weights kept in their storage format (issue 12): the formats, the C kernels against PyTorch, GGUF
blocks taken as they are, the fused decode against the PyTorch forward, and the options."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from kvcache import kernels
from kvcache.config import SamplingParams, parse_weights_dtype
from kvcache.engine.engine import LLMEngine, build_model, resolve_dtype
from kvcache.models import fused_decode
from kvcache.models import packed as packed_module
from kvcache.models.loader import LoadedModel, native_blocks
from kvcache.models.packed import (WEIGHT_FORMATS, PackedWeight, dequantize, matmul, prepare_weights, quantize,
                                   weight_format)
from tiny_models import tiny_llama

needs_kernels = pytest.mark.skipif(kernels.library() is None, reason="no C compiler here: the PyTorch path only")


def _use_build(target, monkeypatch):
    """Run this test on the kernels built for ``target`` (kernels.TARGET_FLAGS): "native" is the
    library every caller loads; "avx2" is this CPU's build without AVX-512, so the AVX2 paths an AVX2
    machine takes are checked here too (skipped where the CPU has no AVX-512: its native build is that)."""
    if target == "native":
        return
    if kernels._compiler() is None:
        pytest.skip("no C compiler here")
    if target == "avx2" and "avx512f" not in kernels._cpu_flags().split():
        pytest.skip("no AVX-512 here: the native build already takes the AVX2 paths")
    monkeypatch.setattr(kernels, "_library", kernels.library_for(target))
    monkeypatch.setattr(kernels, "_tried", True)


@pytest.fixture
def torch_only(monkeypatch):
    """Make every caller take its PyTorch path, as on a machine without a C compiler."""
    monkeypatch.setattr(kernels, "_library", None)
    monkeypatch.setattr(kernels, "_tried", True)


# --- the formats ------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["q8_0", "q4_1"])
@pytest.mark.parametrize("data", ["normal", "outliers"])
def test_quantization_error_is_at_most_half_a_step(fmt, data):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=gen)
    if data == "outliers":
        w[:, 7] *= 40  # one outlier channel, as real weights have
    packed = quantize(w, fmt)
    err = (dequantize(packed) - w).abs().reshape(64, -1, 32)
    step = packed.scale.float().unsqueeze(-1)
    # half a step, plus the fp16 rounding of the scale (and minimum) carried over 15 or 127 steps
    assert (err <= step * 0.5 + w.abs().reshape(64, -1, 32).amax(-1, keepdim=True) * 2e-3).all()
    assert packed.nbytes == {"q8_0": 64 * 256 + 64 * 8 * 2, "q4_1": 64 * 128 + 2 * 64 * 8 * 2}[fmt]


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])
def test_gguf_blocks_are_taken_exactly(kind):
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize as gguf_dequantize, quantize as gguf_quantize

    rows = np.random.default_rng(0).standard_normal((12, 96)).astype(np.float32)
    blocks = gguf_quantize(rows, T[kind])

    class Tensor:  # what GGUFReader hands out: the raw blocks and their type
        data, tensor_type = blocks, T[kind]
    packed = native_blocks(Tensor)
    assert packed.fmt == ("q8_0" if kind == "Q8_0" else "q4_1")
    assert torch.equal(dequantize(packed), torch.from_numpy(gguf_dequantize(blocks, T[kind])))


@pytest.mark.parametrize("fmt", WEIGHT_FORMATS)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 13, 16, 40])
def test_kernel_equals_pytorch(fmt, rows, monkeypatch):
    gen = torch.Generator().manual_seed(rows)
    # K = 352: 11 blocks, a run of 8 (read 8 scales at a time) and 3 more
    w, x, bias = torch.randn(577, 352, generator=gen), torch.randn(rows, 352, generator=gen), torch.randn(577, generator=gen)
    packed = quantize(w, fmt)
    exact = x.double() @ dequantize(packed).double().T + bias.double()
    ours = matmul(x, packed, bias)
    monkeypatch.setattr(kernels, "_library", None)
    monkeypatch.setattr(kernels, "_tried", True)
    plain = matmul(x, packed, bias)
    for y in (ours, plain):
        assert y.dtype == torch.float32
        torch.testing.assert_close(y.double(), exact, atol=1e-4, rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize("fmt", ["float32", "bfloat16"])
@pytest.mark.parametrize("rows", range(1, 17))
def test_float_kernel_takes_any_width_and_row_count(fmt, rows):
    """Float weights need no blocks: a row length that is no multiple of 8 (the vector tail) and an
    odd number of output rows (the last register block's spare row) against the float64 product,
    for as many rows as a fused step carries (more than six take several passes)."""
    assert packed_module.uses_kernel(torch.zeros(rows, 99), fmt)
    gen = torch.Generator().manual_seed(100 + rows)
    w, x = torch.randn(75, 99, generator=gen), torch.randn(rows, 99, generator=gen)
    packed = quantize(w, fmt)
    torch.testing.assert_close(matmul(x, packed).double(), x.double() @ dequantize(packed).double().T,
                               atol=1e-4, rtol=1e-5)


def test_weight_format_rules():
    layer = "model.layers.3.mlp.down_proj.weight"
    assert weight_format(layer, "q4_1", "auto", "float32") == "q4_1"  # the file's own blocks
    assert weight_format(layer, None, "auto", "bfloat16") == "bfloat16"
    assert weight_format(layer, "q4_1", "int8", "float32") == "q8_0"
    assert weight_format("model.embed_tokens.weight", None, "int4", "float32") == "q8_0"  # vocab stays 8-bit
    assert weight_format("model.embed_tokens.weight", None, "auto", "float32") is None  # a plain tensor
    assert weight_format("model.layers.3.input_layernorm.weight", None, "int4", "float32") is None
    bf16 = prepare_weights({layer: torch.zeros(8, 64, dtype=torch.bfloat16)}, "auto", "float32")[layer]
    assert bf16.fmt == "bfloat16"  # a file's bfloat16 weights stay bfloat16 under auto
    with pytest.raises(ValueError, match="int3"):
        parse_weights_dtype("int3")
    with pytest.raises(ValueError, match="blocks of 32"):
        prepare_weights({layer: torch.zeros(8, 40)}, "int8", "float32")


def test_auto_dtype_follows_the_cpu(torch_only):
    # without the kernels: bfloat16 where the CPU multiplies it natively
    assert resolve_dtype("auto") == ("bfloat16" if kernels.native_bf16() else "float32")
    assert resolve_dtype("fp32") == "float32"


@needs_kernels
def test_auto_dtype_is_float32_where_the_fused_decode_runs():
    assert resolve_dtype("auto") == "float32"


# --- whole models -----------------------------------------------------------------------------

def _tiny(window=None, **extra) -> LoadedModel:
    return tiny_llama(window=window, **extra)


def _decode_logits(loaded, weights_dtype, fused=True, kv_cache_dtype="auto", monkeypatch=None,
                   lengths=(5, 23, 11), **engine_kwargs):
    """Three prompts of different lengths decoded together; every sampled step's logits."""
    from tiny_models import run_recording_logits
    if not fused:
        monkeypatch.setattr(fused_decode, "MAX_TOKENS", 0)
    engine = LLMEngine(loaded=loaded, weights_dtype=weights_dtype, kv_cache_dtype=kv_cache_dtype, block_size=4,
                       num_blocks=128, **engine_kwargs)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in lengths]
    prompts[2][5:] = prompts[2][:6]  # a repeat for prompt lookup to draft from
    out = run_recording_logits(engine, prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    if monkeypatch:
        monkeypatch.undo()
    return out


@needs_kernels
@pytest.mark.parametrize("weights_dtype", ["float32", "bfloat16", "int8", "int4"])
@pytest.mark.parametrize("kv", ["auto", "bfloat16"])
@pytest.mark.parametrize("window", [None, 9])
def test_fused_decode_equals_the_pytorch_forward(weights_dtype, kv, window, monkeypatch):
    loaded = _tiny(window)
    fused = _decode_logits(loaded, weights_dtype, True, kv)
    plain = _decode_logits(loaded, weights_dtype, False, kv, monkeypatch)
    atol = 2e-4
    if kv == "bfloat16":
        # float32 keys that differ in the last bit (the paths sum in different orders) can round to
        # neighbouring bfloat16 values, 2^-8 apart: the paths must agree well within what the bf16
        # cache itself changes against a float32 one
        exact = _decode_logits(loaded, weights_dtype, False, "float32", monkeypatch)
        format_error = max((b[1] - e[1]).abs().max().item() for b, e in zip(plain, exact))
        atol = 2e-4 + 0.25 * format_error
    for (tokens_a, logits_a), (tokens_b, logits_b) in zip(fused, plain):
        assert tokens_a == tokens_b
        torch.testing.assert_close(logits_a, logits_b, atol=atol, rtol=1e-4)


@needs_kernels
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 4, 32), (4, 2, 12), (4, 2, 64), (8, 2, 40), (7, 1, 64), (6, 2, 80)])
@pytest.mark.parametrize("kv", ["auto", "bfloat16"])
@pytest.mark.parametrize("build", ["native", "avx2"])
def test_fused_attention_takes_any_group_and_head_size(heads, kv_heads, head_dim, kv, build, monkeypatch):
    """The kernel's attention handles query heads three at a time and head_dim in runs of 64 and 16
    (AVX-512), 32 and 8 (AVX2) and 1, and splits a long context into parts, its keys in four runs and a
    tail: groups of 1, 2, 3, 4 and 7 heads, head_dim 12, 32, 40, 64 and 80, and a 300-token prompt (more
    than one part) against the PyTorch forward, on this CPU's build and on its build without AVX-512."""
    _use_build(build, monkeypatch)
    loaded = _tiny(heads=heads, kv_heads=kv_heads, head_dim=head_dim)
    fused = _decode_logits(loaded, "float32", True, kv, lengths=(300, 9, 40))
    plain = _decode_logits(loaded, "float32", False, kv, monkeypatch, lengths=(300, 9, 40))
    for (tokens_a, logits_a), (tokens_b, logits_b) in zip(fused, plain):
        assert tokens_a == tokens_b
        torch.testing.assert_close(logits_a, logits_b, atol=2e-3 if kv == "bfloat16" else 2e-4, rtol=1e-4)


def test_fused_decode_is_taken_for_decodes(monkeypatch):
    if kernels.library() is None:
        pytest.skip("no C compiler here")
    calls = []
    run = fused_decode.FusedDecode.run
    monkeypatch.setattr(fused_decode.FusedDecode, "run",
                        lambda self, *a, **k: calls.append(a[0].shape[0]) or run(self, *a, **k))
    _decode_logits(_tiny(), "int4")
    assert calls and max(calls) == 3  # the three prompts' decodes, together


@needs_kernels
@pytest.mark.parametrize("weights_dtype", ["float32", "bfloat16", "int8", "int4"])
@pytest.mark.parametrize("tied", [True, False])
def test_fused_step_computes_the_head_in_the_same_call(weights_dtype, tied, monkeypatch):
    """Decode steps take their logits from the fused call (the final norm and the output head, tied to
    the embedding or not, after the layers), and they equal the PyTorch forward's."""
    asked = []
    run = fused_decode.FusedDecode.run
    monkeypatch.setattr(fused_decode.FusedDecode, "run",
                        lambda self, *a, **k: asked.append(k.get("logits", False)) or run(self, *a, **k))
    loaded = _tiny(tied=tied)
    fused = _decode_logits(loaded, weights_dtype, True)
    monkeypatch.undo()
    assert asked and all(asked)
    plain = _decode_logits(loaded, weights_dtype, False, "auto", monkeypatch)
    for (tokens_a, logits_a), (tokens_b, logits_b) in zip(fused, plain):
        assert tokens_a == tokens_b
        torch.testing.assert_close(logits_a, logits_b, atol=2e-4, rtol=1e-4)


@needs_kernels
@pytest.mark.parametrize("case", ["real", "all equal", "one NaN", "two NaNs"])
def test_fused_step_takes_the_argmax_as_torch_does(case, monkeypatch):
    """The fused step's argmax of each row (each thread over the head rows it computed, then merged)
    is ``logits.argmax(-1)``: on real logits, on ties (all 256 equal: the first, across the threads'
    shares) and with NaN (the first NaN, in the second thread's share or in both)."""
    loaded = _tiny(tied=False)
    head = loaded.weights["lm_head.weight"]  # [256, hidden]
    if case == "all equal":
        head[:] = head[7]
    elif case == "one NaN":
        head[170] = float("nan")
    elif case == "two NaNs":
        head[[90, 170]] = float("nan")
    pairs = []
    run = fused_decode.FusedDecode.run
    monkeypatch.setattr(fused_decode.FusedDecode, "run",
                        lambda self, *a, **k: pairs.append(run(self, *a, **k)) or pairs[-1])
    _decode_logits(loaded, "float32", True)
    monkeypatch.undo()
    assert pairs and all(isinstance(p, tuple) for p in pairs)
    for logits, best in pairs:
        assert torch.equal(best, logits.argmax(dim=-1))
    if case != "real":
        expected = {"all equal": 0, "one NaN": 170, "two NaNs": 90}[case]
        assert all(best.eq(expected).all() for _, best in pairs)


@needs_kernels
@pytest.mark.parametrize("table", ["float32", "bfloat16", "q8_0", "q4_1"])
def test_fused_step_embeds_the_tokens_as_the_model_does(table, monkeypatch):
    """The fused step widens the embedding's rows of its token ids itself (a float32, bfloat16, Q8_0 or
    Q4_1 table): every step's logits and argmax equal those of the same step handed the model's own
    embeddings, bit for bit. A token id outside the table (either side) and a negative position are
    refused before anything is computed, so the step after them still matches."""
    loaded = _tiny(tied=False)
    weights_dtype = {"float32": "float32", "bfloat16": "bfloat16", "q8_0": "int8", "q4_1": "auto"}[table]
    if table == "q4_1":  # as a Q4_1 GGUF would store it (weights_dtype auto keeps a file's blocks)
        loaded.weights["model.embed_tokens.weight"] = quantize(loaded.weights["model.embed_tokens.weight"], "q4_1")
    compared = []
    run = fused_decode.FusedDecode.run

    def both(self, tokens, positions, metas, logits=False, h=None):
        assert h is None and self.embed is not None and self.embed.fmt == table  # the C step embeds
        for bad_tokens, bad_positions, refusal in ((torch.full_like(tokens, self.embed.shape[0]), positions, "outside"),
                                                   (torch.full_like(tokens, -1), positions, "outside"),
                                                   (tokens, positions - positions.max() - 1, "negative position")):
            with pytest.raises(ValueError, match=refusal):
                run(self, bad_tokens, bad_positions, metas, logits)
        given = run(self, tokens, positions, metas, logits, h=self.owner.embed_tokens(tokens))
        mine = run(self, tokens, positions, metas, logits)  # writes the same keys and values again
        compared.append((given, mine))
        return mine

    monkeypatch.setattr(fused_decode.FusedDecode, "run", both)
    _decode_logits(loaded, weights_dtype, True)
    assert compared
    for (logits_a, best_a), (logits_b, best_b) in compared:
        assert torch.equal(logits_a, logits_b) and torch.equal(best_a, best_b)


@needs_kernels
def test_an_embedding_that_does_more_than_look_up_keeps_its_own_forward(monkeypatch):
    """A llama-family model whose embedding module scales its rows (or has hooks) is embedded by the
    module itself, not by the C step reading its table: the fused step still equals PyTorch's."""
    from torch import nn

    class ScaledEmbedding(nn.Embedding):
        def forward(self, tokens):
            return super().forward(tokens) * 4.0

    def scaled(*args, **kwargs):
        model = build_model(*args, **kwargs)
        plain = model.embed_tokens
        assert type(plain) is nn.Embedding
        model.embed_tokens = ScaledEmbedding(plain.num_embeddings, plain.embedding_dim, _weight=plain.weight.data)
        return model

    monkeypatch.setattr("kvcache.engine.engine.build_model", scaled)
    loaded = _tiny(tied=False)
    fused = _decode_logits(loaded, "float32", True)
    plain = _decode_logits(loaded, "float32", False, "auto", monkeypatch)
    for (tokens_a, logits_a), (tokens_b, logits_b) in zip(fused, plain):
        assert tokens_a == tokens_b
        torch.testing.assert_close(logits_a, logits_b, atol=2e-4, rtol=1e-4)


@needs_kernels
def test_a_dropped_engine_frees_its_model_without_waiting_for_the_cycle_collector():
    """The fused step the model keeps refers back to the model weakly: dropping the engine frees the
    model and its weights at once, not at the cyclic collector's next pass."""
    import gc
    import weakref
    engine = LLMEngine(loaded=_tiny(), block_size=4, num_blocks=64)
    engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=4, temperature=0.0))
    while engine.has_unfinished_requests():
        engine.step()
    assert any(f is not None for f in engine.model._fused.values())  # the fused step was built
    model = weakref.ref(engine.model)
    gc.disable()
    try:
        del engine
        assert model() is None
    finally:
        gc.enable()


def test_the_rope_table_is_tables_for_row_by_row_through_growth_and_resets():
    """RotaryEmbedding.table(n) holds exactly the rows tables_for computes (so the fused step and the
    PyTorch path rotate alike), grows past its first 256 rows computing only the new ones, and is
    rebuilt when inv_freq is another tensor (a reset, a cast and back)."""
    from kvcache.models.layers import RotaryEmbedding
    rope = RotaryEmbedding(64, 100000.0, scaling=2.0)

    def check(length):
        cos, sin = rope.table(length)
        assert cos.shape[0] >= length and cos.dtype == torch.float32
        want_cos, want_sin = rope.tables_for(torch.arange(cos.shape[0]), torch.float32)  # [rows, 1, hd]
        assert torch.equal(cos, want_cos.squeeze(1)) and torch.equal(sin, want_sin.squeeze(1))
        return cos

    first = check(5)
    assert first.shape[0] == 256 and check(200) is first  # kept, not recomputed
    grown = check(700)
    assert grown.shape[0] == 700 and torch.equal(grown[:256], first)
    assert check(701).shape[0] == 1400  # at least doubling
    rope.to(torch.bfloat16).to(torch.float32)  # inv_freq rounded to bfloat16: other angles
    check(10)
    rope.theta = 10000.0
    rope.reset_tables()
    check(10)


@needs_kernels
@pytest.mark.parametrize("weights_dtype", ["float32", "int4"])
def test_chunked_prefill_and_verification_equal_the_pytorch_forward(weights_dtype, monkeypatch):
    """8-token prompt chunks (PyTorch's GEMM either way) and verifications of drafted tokens (the fused
    step: each token sees exactly its own prefix) agree with the PyTorch forward."""
    from kvcache.config import SchedulerConfig
    loaded = _tiny(9)
    kwargs = dict(scheduler_config=SchedulerConfig(max_num_batched_tokens=8), speculative="ngram",
                  num_speculative_tokens=3, adaptive_speculation=False)
    fused = _decode_logits(loaded, weights_dtype, True, **kwargs)
    plain = _decode_logits(loaded, weights_dtype, False, "auto", monkeypatch, **kwargs)
    for (tokens_a, logits_a), (tokens_b, logits_b) in zip(fused, plain):
        assert tokens_a == tokens_b
        torch.testing.assert_close(logits_a, logits_b, atol=2e-4, rtol=1e-4)


@pytest.mark.slow
def test_a_short_tail_after_a_prefix_hit_equals_computing_from_scratch(smollm_engine_factory):
    """fp8 keys have 3 mantissa bits, so a last-bit difference in a key can change its code: a prompt's
    KV must be computed the same way whether it comes whole or as a prefix hit plus a short tail (a
    tail of at most 16 tokens once went through our kernel while a whole prompt went through GEMM)."""
    document = ("def merge(a, b):\n    out = []\n    while a and b:\n"
                "        out.append(a.pop(0) if a[0] < b[0] else b.pop(0))\n    return out + a + b\n") * 4
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    outputs = []
    for warm in (False, True):
        engine = smollm_engine_factory(num_blocks=64, kv_cache_dtype="fp8")
        doc = engine.tokenizer.encode(document)[:112]  # 7 whole blocks of 16
        prompt = doc + engine.tokenizer.encode(" Summarize this.", add_special_tokens=False)
        if warm:
            engine.add_request("doc", doc, SamplingParams(max_tokens=1))
            while engine.has_unfinished_requests():
                engine.step()
        engine.add_request("q", prompt, params)
        done = None
        while engine.has_unfinished_requests():
            done = [o for o in engine.step() if o.finished] or done
        if warm:
            assert done[0].metrics["num_cached_prompt_tokens"] == 112  # the tail: the question's 4 tokens
        outputs.append(done[0].outputs[0].token_ids)
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("weights_dtype", ["int8", "int4", "bfloat16"])
def test_packed_model_equals_its_dequantized_float_twin(weights_dtype):
    """int8/int4/bf16 weights are another model; it must be exactly the float32 model of the same
    (dequantized) values, through prefill and decode."""
    loaded = _tiny()
    as_packed = prepare_weights(loaded.weights, weights_dtype, "float32")
    twin = {k: dequantize(v) if isinstance(v, PackedWeight) else v for k, v in as_packed.items()}
    a = _decode_logits(LoadedModel(loaded.config, as_packed, loaded.tokenizer, "packed"), "auto")
    b = _decode_logits(LoadedModel(loaded.config, twin, loaded.tokenizer, "twin"), "float32")
    for (tokens_a, logits_a), (tokens_b, logits_b) in zip(a, b):
        assert tokens_a == tokens_b
        torch.testing.assert_close(logits_a, logits_b, atol=2e-4, rtol=1e-4)
    held = build_model(loaded, "float32", torch.device("cpu"), weights_dtype).weight_bytes()
    assert held < build_model(loaded, "float32", torch.device("cpu"), "float32").weight_bytes()


def test_engine_runs_without_the_kernels(torch_only):
    out = _decode_logits(_tiny(), "int4")
    assert all(len(tokens) == 12 for tokens, _ in out)


# --- options ----------------------------------------------------------------------------------

def test_bad_weights_dtype_is_one_sentence():
    r = subprocess.run([sys.executable, "-m", "kvcache", "generate", "hi", "--weights-dtype", "int3"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "int3" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(ValueError, match="weights dtype"):
        LLMEngine(loaded=_tiny(), weights_dtype="int3", num_blocks=8)


@pytest.mark.slow
@pytest.mark.parametrize("weights_dtype", ["auto", "float32", "bfloat16", "int8", "int4"])
def test_size_plans_the_weight_bytes_the_engine_holds(weights_dtype, smollm_engine_factory):
    """`kvcache size --model` reads the file's header and prints the bytes the engine then holds."""
    import json

    from kvcache.models.loader import default_model_path
    engine = smollm_engine_factory(num_blocks=4, weights_dtype=weights_dtype, dtype="auto")  # as the CLI runs it
    r = subprocess.run([sys.executable, "-m", "kvcache", "size", "--model", str(default_model_path()), "--json",
                        "--weights-dtype", weights_dtype], capture_output=True, text=True, timeout=300)
    planned = json.loads(r.stdout)
    assert planned["weights_bytes"] == engine.stats()["weight_bytes"]
    assert planned["weights_formats"] == engine.stats()["weights_dtype"]


@needs_kernels
@needs_kernels
@pytest.mark.parametrize("fmt", WEIGHT_FORMATS)
def test_one_row_reads_rows_side_by_side_and_the_split_does_not_change_a_bit(fmt):
    """A decode row reads a quarter of each thread's weight rows side by side (matmul.c, STREAMS).
    Row counts that leave every remainder (one to three rows read alone), rows of nine quantized
    blocks (a group of eight and a tail) or a float row with a vector tail, equal the float64
    product; and one thread, two or three (other splits, other row groupings) give the same bits."""
    lib = kernels.library()
    gen = torch.Generator().manual_seed(7)
    cols = 291 if fmt in ("float32", "bfloat16") else 288
    for rows in (1, 5, 67, 1031):
        packed = quantize(torch.randn(rows, cols, generator=gen), fmt)
        x = torch.randn(1, cols, generator=gen)
        exact = x.double() @ dequantize(packed).double().T
        results = []
        for threads in (1, 2, 3):
            y = torch.empty(1, rows)
            status = lib.kv_matmul(kernels.FORMAT_CODES[fmt], 1, rows, cols, x.data_ptr(), packed.data.data_ptr(),
                                   packed.scale.data_ptr() if packed.scale is not None else None,
                                   packed.minimum.data_ptr() if packed.minimum is not None else None, None,
                                   y.data_ptr(), threads)
            assert status == 0
            torch.testing.assert_close(y.double(), exact, atol=1e-4, rtol=1e-5)
            results.append(y)
        assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


@pytest.mark.parametrize("build", ["portable", "avx2"])
def test_other_builds_compute_the_same(build, monkeypatch):
    """The C paths a CPU without AVX2 takes (built without -march=native), and those of one with AVX2
    but no AVX-512, give the same numbers."""
    _use_build(build, monkeypatch)
    gen = torch.Generator().manual_seed(5)
    for fmt in WEIGHT_FORMATS:
        packed = quantize(torch.randn(70, 96, generator=gen), fmt)
        for x in (torch.randn(3, 96, generator=gen), torch.randn(1, 96, generator=gen)):
            torch.testing.assert_close(matmul(x, packed).double(), x.double() @ dequantize(packed).double().T,
                                       atol=1e-4, rtol=1e-5)
    loaded = _tiny(9)
    fused = _decode_logits(loaded, "int4", True)
    plain = _decode_logits(loaded, "int4", False, "auto", monkeypatch)  # (undoes the patches when done)
    for (tokens_a, logits_a), (tokens_b, logits_b) in zip(fused, plain):
        assert tokens_a == tokens_b
        torch.testing.assert_close(logits_a, logits_b, atol=2e-4, rtol=1e-4)
