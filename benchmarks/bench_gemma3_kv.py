"""Gemma-3-270M: KV bytes held after 8,192 tokens of context, by kvcache, HF transformers and llama.cpp.

    flock /tmp/kvcache-bench.lock python benchmarks/bench_gemma3_kv.py [--tokens 8192] [--no-llamacpp]

Each engine really prefills the same ``--tokens`` token ids, then the bytes it holds are read off:
kvcache's ``stats()["kv_bytes_used"]`` (blocks held, every cache group; sliding layers keep only the
blocks their window still reaches), the sum of the tensors in HF's returned cache (its sliding layers
keep the last window of tokens), and llama.cpp's ``llama_state_seq_get_size`` for the sequence (the
cells it holds, in its SWA cache and its full cache, with ``--swa-full`` off as by default). A full
cache, every layer holding every token, is printed next to them: the planner's formula.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from bench_gemma3 import hf_gemma3
from common import cpu_description, prompt_ids
from kvcache import SamplingParams
from kvcache.engine.engine import LLMEngine
from kvcache.models.loader import LoadedModel, load_model


def ours(loaded: LoadedModel, ids: list[int]) -> int:
    """Blocks held by our engine, in bytes, once the context is prefilled and one more token decoded.

    The decode step is part of the measure: a sliding group gives back the blocks its window left
    when the request is next scheduled, so right after the last prefill chunk it still holds that
    chunk's blocks (2,048 tokens per sliding layer here).
    """
    engine = LLMEngine(loaded=loaded, kv_cache_memory="1GiB", device="cpu", enable_prefix_caching=False)
    engine.add_request("kv", ids, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    while engine.scheduler.running == [] or engine.scheduler.running[0].num_computed_tokens <= len(ids):
        engine.step()
    return int(engine.stats()["kv_bytes_used"])


def hf(loaded: LoadedModel, ids: list[int]) -> int:
    """Bytes of every tensor in the cache HF transformers returns after the prefill."""
    model = hf_gemma3(loaded)
    with torch.inference_mode():
        out = model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def llamacpp(path: Path, ids: list[int], threads: int) -> int:
    """llama.cpp's serialized state of the sequence after the prefill (its held KV cells, F16)."""
    from llamacpp_peer import LlamaCppBatched
    peer = LlamaCppBatched(path, n_ctx=len(ids) + 64, n_seq=1, threads=threads, swa_full=False)
    peer.prefill(ids)
    held = peer.seq_state_bytes(0)
    peer.close()
    return held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--no-llamacpp", action="store_true")
    args = parser.parse_args()
    print(f"CPU: {cpu_description()}; torch threads: {torch.get_num_threads()}")
    loaded = load_model("gemma3")
    ids = prompt_ids(loaded.tokenizer, args.tokens)
    c = loaded.config
    full = 2 * c.num_layers * c.num_kv_heads * c.head_dim * args.tokens * 1 * 4  # the six factors, float32
    rows = {"full cache, float32 (formula)": full, "kvcache (float32 KV)": ours(loaded, ids),
            "HF transformers (float32 KV)": hf(loaded, ids)}
    if not args.no_llamacpp:
        rows["llama.cpp (F16 KV, Q4_K_M weights)"] = llamacpp(Path(loaded.source), ids, os.cpu_count() or 1)
    print(f"\nKV bytes held after {args.tokens:,} tokens:\n")
    print("| engine | bytes held | MB | / full float32 cache | MB at 2 B per element (as llama.cpp's F16) |")
    print("|---|---|---|---|---|")
    for name, held in rows.items():
        width = 2 if "F16" in name else 4
        print(f"| {name} | {held:,} | {held / 1e6:.2f} | {held / full:.3f} | {held * 2 / width / 1e6:.2f} |")


if __name__ == "__main__":
    main()
