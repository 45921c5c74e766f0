"""Design variants of the quantized KV cache, simulated: which grouping of keys and values costs what.

    python benchmarks/bench_kv_quant_variants.py [--tokens 8192] K/V [K/V ...]
    e.g.  int8:block16/int8:token64  int8r:token64/int8:token64  fp8:block16/none  fp8c:block16/fp8:token64

Each K or V spec is FORMAT:GROUPING or ``none`` (kept in float32):
  FORMAT   int8 (symmetric), int4 (asymmetric, scale + zero), int4s (symmetric), fp8 (e4m3),
           fp8c (e4m3 centred on the group's midpoint, scale + zero), bf16; a trailing ``r``
           (int8r, int4r, fp8r) quantizes after a Hadamard rotation of head_dim (QuaRot)
  GROUPING tokenN: one group per N values of a token; blockN: one group per channel over N tokens

The cache is float32; each layer's keys and values are quantized and dequantized as they are
written (fp16 scales and zero points, the engine's rounding), so attention reads exactly what a
cache in that layout would return after a one-pass prefill. (The engine's own formats reproduce
their figures here: int8:block16/int8:token64 and fp8:block16/fp8:token64 gave the same PPL to
4 decimals as the engine's former layout.) Scored like ``bench_kv_quant.py accuracy``: Persuasion
in windows of --ctx tokens, PPL and KLD against float32 computed in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from bench_kv_quant import novel_text
from common import cpu_description
from kvcache.cache import storage
from kvcache.cache.quant import SCALE_DTYPE, _to_scale, hadamard_rotation
from kvcache.engine.engine import build_model
from kvcache.models.loader import load_model
from kvcache.runtime.scoring import Score, add, score_logits, window_logits, windows


def _range(x: torch.Tensor, dim: int, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    low = (x if valid is None else torch.where(valid, x, float("inf"))).amin(dim, keepdim=True)
    high = (x if valid is None else torch.where(valid, x, float("-inf"))).amax(dim, keepdim=True)
    return low, high


def fake_quantize(x: torch.Tensor, fmt: str, dim: int, valid: torch.Tensor | None) -> torch.Tensor:
    """x quantized and dequantized with groups running over ``dim`` (``valid`` entries count)."""
    low, high = _range(x, dim, valid)
    if fmt in ("int8", "int4s"):
        levels = 127 if fmt == "int8" else 7
        scale = _to_scale(torch.maximum(high.abs(), low.abs()) / levels).float()
        return (x / scale).round().clamp(-levels, levels) * scale
    if fmt == "int4":
        scale, zero = _to_scale((high - low) / 15).float(), low.to(SCALE_DTYPE).float()
        return ((x - zero) / scale).round().clamp(0, 15) * scale + zero
    if fmt in ("fp8", "fp8c"):
        zero = ((high + low) / 2).to(SCALE_DTYPE).float() if fmt == "fp8c" else torch.zeros(())
        low, high = _range(x - zero, dim, valid)
        scale = _to_scale(torch.maximum(high.abs(), low.abs()) / 448).float()
        return ((x - zero) / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale + zero
    if fmt == "bf16":
        return x.to(torch.bfloat16).float()
    raise ValueError(f"unknown format {fmt!r}")


def quantize(x: torch.Tensor, spec: str) -> torch.Tensor:
    """x [T, heads, hd] (a prefill's keys or values, slots 0..T-1) -> as the spec's cache returns it."""
    if spec == "none":
        return x
    fmt, grouping = spec.split(":")
    if fmt.endswith("r"):
        rot = hadamard_rotation(x.shape[-1])
        return quantize(x @ rot, f"{fmt[:-1]}:{grouping}") @ rot.T
    tokens, heads, hd = x.shape
    if grouping.startswith("token"):
        size = int(grouping.removeprefix("token"))
        return fake_quantize(x.reshape(tokens, heads, hd // size, size), fmt, -1, None).reshape(x.shape)
    size = int(grouping.removeprefix("block"))
    blocks = -(-tokens // size)
    padded = torch.zeros(blocks * size, heads, hd)
    padded[:tokens] = x
    valid = (torch.arange(blocks * size) < tokens).view(blocks, size, 1, 1)
    out = fake_quantize(padded.view(blocks, size, heads, hd), fmt, 1, valid)  # per channel over the block
    return out.reshape(-1, heads, hd)[:tokens]


class SimulatedGroup(storage.PlainGroup):
    """A float32 group that stores keys and values as the current variant would return them."""

    variant = ("none", "none")

    def write(self, layer, k, v, slot_mapping):
        if not torch.equal(slot_mapping, torch.arange(len(slot_mapping))):
            raise ValueError("the simulation covers one-pass prefills into slots 0..T-1 only")
        super().write(layer, quantize(k.float(), self.variant[0]), quantize(v.float(), self.variant[1]),
                      slot_mapping)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("variants", nargs="+", help="K/V specs, e.g. int8r:token64/int8:token64")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--ctx", type=int, default=1024)
    args = parser.parse_args()
    print(f"# {cpu_description()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    variants = [tuple(v.split("/")) for v in args.variants]
    storage.PlainGroup = SimulatedGroup  # the float32 cache every window below allocates
    loaded = load_model(None)
    model = build_model(loaded, "float32", torch.device("cpu"))
    parts = windows(loaded.tokenizer.encode(novel_text(), add_special_tokens=False), args.ctx, args.tokens)
    totals = {v: Score(0, 0.0) for v in variants}
    base = Score(0, 0.0)
    start = time.perf_counter()
    with torch.inference_mode():
        for i, window in enumerate(parts):
            SimulatedGroup.variant = ("none", "none")
            ref = window_logits(model, window, "fp32")
            base = add(base, score_logits(ref, window))
            for variant in variants:
                SimulatedGroup.variant = variant
                totals[variant] = add(totals[variant], score_logits(window_logits(model, window, "fp32"), window, ref))
            print(f"window {i + 1}/{len(parts)} done, {time.perf_counter() - start:.0f} s", file=sys.stderr)
    for (k, v), s in totals.items():
        print(json.dumps({"bench": "variants", "k": k, "v": v, "tokens": s.tokens, "ppl": s.ppl, "ppl_float32": base.ppl,
                          "delta_ppl_pct": 100 * (s.ppl / base.ppl - 1), "kld": s.mean_kld,
                          "top1_agreement": s.top1_agreement}))


if __name__ == "__main__":
    main()
