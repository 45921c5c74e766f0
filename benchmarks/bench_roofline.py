"""Batch-1 decode and prefill against llama.cpp per weight format, and the memory roofline (issue 12).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_roofline.py [--repeats 3] [--contexts 128,2048]
        [--new 64] [--rows f32,bf16,q8_0,q4_1] [--kernels native] [--json out.json]

Rows (same weights on both sides, the embedded SmolLM2-135M-Instruct, whose GGUF is Q4_1 with a
Q8_0 embedding):
  f32   ours --weights-dtype float32    llama.cpp: the GGUF requantized to F32 (llama_model_quantize)
  bf16  ours --weights-dtype bfloat16   llama.cpp: BF16
  q8_0  ours --weights-dtype int8       llama.cpp: Q8_0 (both quantize the same float values)
  q4_1  ours --weights-dtype auto       llama.cpp: the GGUF itself (Q4_1, Q8_0 embedding)
Our activations are float32 in every row (weight-only quantization); llama.cpp rounds them to
8 bits for its quantized rows.

Both engines are timed the same way, alternating, ours in this process and llama.cpp in its own
(llamacpp_peer.start: OpenMP as llama.cpp's users have it, its weights repacked for this CPU where
that runs; the repack column says): one N-token generation each,
its time to the first token giving prefill tokens/s and the time from the first to the last token
the decode rate of N - 1 tokens. Prefix caching off,
greedy, EOS ignored. The roofline fraction is (weight bytes held + KV bytes read at the mean
context) x decode tokens/s / the read bandwidth measured just before and just after the row, with the
same threads: the best of a 1 GiB torch sum and sums of 2, 4 and 8 streams per thread side by side
(common.memory_read_bandwidth; the machines here are shared and their bandwidth drifts by 20% over
minutes, so each row has its own, and the best of both probes makes the fraction conservative). The CPU model and flags are printed first, with the instruction sets each engine's build uses.

On an AVX-512 machine, both engines can be held to AVX2 (what an AVX2-only CPU runs, though not its
memory system): ``--kernels avx2`` builds our C kernels without AVX-512 (kvcache.kernels.TARGET_FLAGS),
``ATEN_CPU_CAPABILITY=avx2`` holds PyTorch's own kernels (our prefill) to AVX2, and ``PYTHONPATH`` can
point llama.cpp's process at a llama-cpp-python built with ``CMAKE_ARGS="-DGGML_NATIVE=OFF
-DGGML_AVX512=OFF"``; the header prints what each side runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# What our process's OpenMP runs with: it reads OMP_WAIT_POLICY as torch loads, before importing
# kvcache could set it (kvcache/__init__.py); ours measured the same either way (BENCHMARKS.md).
OMP_POLICY_AT_LOAD = os.environ.get("OMP_WAIT_POLICY", "unset")

import torch  # noqa: E402

from common import cpu_description, median, memory_read_bandwidth, prompt_ids  # noqa: E402
from kvcache import LLM, SamplingParams, kernels  # noqa: E402
from kvcache.models.loader import cache_dir, default_model_path  # noqa: E402

ROWS = {  # row -> (our weights_dtype, llama.cpp's format)
    "f32": ("float32", "float32"), "bf16": ("bfloat16", "bfloat16"), "q8_0": ("int8", "q8_0"), "q4_1": ("auto", "native")}


class Ours:
    def __init__(self, weights_dtype: str, kv_cache_dtype: str) -> None:
        self.llm = LLM(weights_dtype=weights_dtype, dtype="float32", enable_prefix_caching=False,
                       kv_cache_dtype=kv_cache_dtype, kv_cache_memory="512MB")
        self.weight_bytes = self.llm.engine.weight_bytes
        self.kv_per_token = self.llm.engine.storage.bytes_per_token

    def generate(self, ids: list[int], n: int) -> tuple[float, float]:
        """(seconds to the first token, seconds from it to the last)."""
        out = self.llm.generate([ids], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))[0]
        assert len(out.outputs[0].token_ids) == n
        m = out.metrics
        return m["first_token_time"] - m["arrival_time"], m["finish_time"] - m["first_token_time"]


class LlamaCpp:
    """llama.cpp in a process of its own (llamacpp_peer.start: its own OpenMP settings, and its weight
    repacking where it runs here)."""

    def __init__(self, fmt: str, context: int) -> None:
        import llamacpp_peer as peer
        peer.FTYPES.update({"q8_0": 7})  # LLAMA_FTYPE_MOSTLY_Q8_0
        self.peer, self.repack = peer.start(peer.convert(default_model_path(), fmt, cache_dir() / "llamacpp"),
                                            n_ctx=context + 512, n_seq=1, threads=torch.get_num_threads())
        self.weight_bytes = self.peer.model_bytes()

    def generate(self, ids: list[int], n: int) -> tuple[float, float]:
        tokens, ttft, finish = self.peer.run([("r", ids, n, 0.0)])["r"]
        assert len(tokens) == n
        return ttft, finish - ttft

    def close(self) -> None:
        self.peer.close()


def time_pair(engine, ids: list[int], new: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of one prompt. A pause first lets the other engine's threads
    go to sleep (llama.cpp's pool polls for a while after each graph; run side by side they would slow
    each other down)."""
    time.sleep(0.5)
    ttft, decode = engine.generate(ids, new)
    return len(ids) / ttft, (new - 1) / decode


def run_row(row: str, context: int, new: int, repeats: int, tokenizer, kv: str, first: bool = False) -> dict:
    ours_dtype, peer_fmt = ROWS[row]
    before = memory_read_bandwidth(repeats=5)
    ours, peer = Ours(ours_dtype, kv), LlamaCpp(peer_fmt, context)
    if first:
        print(f"# llama.cpp: {peer.peer.system_info()}", flush=True)
    ids = prompt_ids(tokenizer, context)
    for engine in (ours, peer):  # warm-up: kernels built, caches touched
        engine.generate(ids[:32], 4)
    runs = {"ours": [], "llama.cpp": []}
    for _ in range(repeats):
        runs["ours"].append(time_pair(ours, ids, new))
        runs["llama.cpp"].append(time_pair(peer, ids, new))
    bandwidth, how = max(before, memory_read_bandwidth(repeats=5))
    kv_read = ours.kv_per_token * (context + new / 2)  # the KV a decode step reads, at the mean context
    result = {"row": row, "context": context, "new_tokens": new, "ours_weight_bytes": ours.weight_bytes,
              "llamacpp_weight_bytes": peer.weight_bytes, "llamacpp_repack": peer.repack, "bandwidth": bandwidth,
              "bandwidth_how": how}
    for name, key in (("ours", "ours"), ("llama.cpp", "llamacpp")):
        result[f"{key}_prefill_tok_s"] = median([r[0] for r in runs[name]])
        result[f"{key}_decode_tok_s"] = median([r[1] for r in runs[name]])
    result["decode_ratio"] = median([o[1] / p[1] for o, p in zip(runs["ours"], runs["llama.cpp"])])
    result["prefill_ratio"] = median([o[0] / p[0] for o, p in zip(runs["ours"], runs["llama.cpp"])])
    result["ours_roofline"] = result["ours_decode_tok_s"] * (ours.weight_bytes + kv_read) / bandwidth
    peer_kv_read = kv_read * 2 / ours.llm.engine.storage.bytes_per_element  # llama.cpp's cache is F16
    result["llamacpp_roofline"] = result["llamacpp_decode_tok_s"] * (peer.weight_bytes + peer_kv_read) / bandwidth
    peer.close()
    del ours
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--contexts", default="128,2048")
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--kv", default="bfloat16",
                        help="our KV cache format (default bfloat16: 2 bytes a value, as llama.cpp's F16 cache)")
    parser.add_argument("--kernels", choices=sorted(kernels.TARGET_FLAGS), default="native",
                        help="which build of our C kernels to run (avx2: this CPU's without AVX-512)")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    print(f"# {cpu_description()}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"our OMP_WAIT_POLICY={OMP_POLICY_AT_LOAD} (llama.cpp's process: unset)")
    print(f"# our KV cache {args.kv}, llama.cpp's F16; read GB/s: the best of the row's bandwidth probes "
          "(common.memory_read_bandwidth), the roofline's denominator")
    if args.kernels != "native":
        kernels._library = kernels.library_for(args.kernels)
        kernels._tried = True
    print(f"# ours: the {args.kernels} build of our C kernels ({' '.join(kernels.TARGET_FLAGS[args.kernels]) or 'no -march'}), "
          f"PyTorch's CPU capability {torch.backends.cpu.get_cpu_capability()}")
    tokenizer = LLM(num_blocks=4).tokenizer
    print("| weights | context | ours decode tok/s | llama.cpp decode tok/s | ratio | ours roofline | llama.cpp "
          "roofline | read GB/s | ours prefill tok/s | llama.cpp prefill tok/s | ratio | ours / llama.cpp weight MB | "
          "llama.cpp repack |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for context in map(int, args.contexts.split(",")):
        for row in args.rows.split(","):
            r = run_row(row, context, args.new, args.repeats, tokenizer, args.kv, not results)
            results.append(r)
            print(f"| {row} | {context:,} | {r['ours_decode_tok_s']:.1f} | {r['llamacpp_decode_tok_s']:.1f} | "
                  f"**{r['decode_ratio']:.2f}x** | {100 * r['ours_roofline']:.0f}% | {100 * r['llamacpp_roofline']:.0f}% | "
                  f"{r['bandwidth'] / 1e9:.1f} | {r['ours_prefill_tok_s']:.0f} | {r['llamacpp_prefill_tok_s']:.0f} | {r['prefill_ratio']:.2f}x | "
                  f"{r['ours_weight_bytes'] / 1e6:.1f} / {r['llamacpp_weight_bytes'] / 1e6:.1f} | "
                  f"{'yes' if r['llamacpp_repack'] else 'no'} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_description(), "rows": results}, indent=1))


if __name__ == "__main__":
    main()
