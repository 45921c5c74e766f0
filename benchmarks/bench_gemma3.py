"""Gemma-3-270M batch-1 decode: kvcache against HF transformers and llama.cpp, same GGUF.

    flock /tmp/kvcache-bench.lock python benchmarks/bench_gemma3.py [--contexts 128,4096] [--new 32]
        [--repeats 3] [--threads N]

Each engine has the context prefilled, then greedy-decodes ``--new`` tokens; decode tok/s is those
tokens over the time from the first token to the last (the prefill is not in it, and after the
first run it is mostly skipped: kvcache finds the context in its prefix cache, HF decodes from a
copy of its first prefill, llama.cpp prefills again). kvcache and HF
run the GGUF's weights dequantized to float32 (the same tensors); llama.cpp runs the GGUF as it is
(Q4_K_M) and requantized to F32 (llama-cpp-python, low-level API, its default SWA cache). Repeats
alternate between the engines; medians, and the median of per-run ratios against kvcache.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from common import cpu_description, median, prompt_ids
from kvcache import SamplingParams
from kvcache.engine.engine import LLMEngine
from kvcache.models.loader import LoadedModel, cache_dir, load_model


def hf_gemma3(loaded: LoadedModel):
    """HF transformers' Gemma3ForCausalLM holding exactly the weights our engine runs (float32)."""
    import transformers
    c = loaded.config
    types = ["sliding_attention" if c.window_of(i) else "full_attention" for i in range(c.num_layers)]
    cfg = transformers.Gemma3TextConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim, max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        sliding_window=c.sliding_window, layer_types=types, query_pre_attn_scalar=int(c.query_pre_attn_scalar),
        final_logit_softcapping=c.final_logit_softcapping,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": c.rope_theta},
                         "sliding_attention": {"rope_type": "default", "rope_theta": c.rope_local_theta}})
    cfg._attn_implementation = "sdpa"
    model = transformers.Gemma3ForCausalLM(cfg)
    model.load_state_dict(loaded.float_weights(), strict=False)
    model.tie_weights()
    return model.eval()


def time_ours(engine: LLMEngine, ids: list[int], new: int) -> tuple[list[int], float]:
    engine.add_request("bench", ids, SamplingParams(max_tokens=new + 1, temperature=0.0, ignore_eos=True))
    engine.step()  # the prefill and the first token
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        out = [o for o in engine.step() if o.finished]
    elapsed = time.perf_counter() - start
    return out[0].outputs[0].token_ids, new / elapsed


class HFPrefilled:
    """HF transformers with each context prefilled once; every timed run decodes from a copy of
    that cache (the prefill is not what is measured, and 4,096 tokens of it cost minutes here)."""

    def __init__(self, model) -> None:
        self.model, self.prefilled = model, {}

    def decode(self, ids: list[int], new: int) -> tuple[list[int], float]:
        with torch.inference_mode():
            if tuple(ids) not in self.prefilled:
                out = self.model(torch.tensor([ids]), use_cache=True)
                self.prefilled[tuple(ids)] = (int(out.logits[0, -1].argmax()), out.past_key_values)
            token, past = self.prefilled[tuple(ids)]
            tokens, past = [token], copy.deepcopy(past)
            start = time.perf_counter()
            for _ in range(new):
                out = self.model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
                token, past = int(out.logits[0, -1].argmax()), out.past_key_values
                tokens.append(token)
        return tokens, new / (time.perf_counter() - start)


def time_hf(hf: HFPrefilled, ids: list[int], new: int) -> tuple[list[int], float]:
    return hf.decode(ids, new)


def time_llamacpp(peer, ids: list[int], new: int) -> tuple[list[int], float]:
    tokens, ttft, finish = peer.run([("bench", ids, new + 1, 0.0)])["bench"]
    return tokens, new / (finish - ttft)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="128,4096")
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="CPU threads for every engine (default: torch's)")
    parser.add_argument("--no-llamacpp", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    contexts = [int(c) for c in args.contexts.split(",")]
    print(f"CPU: {cpu_description()}; torch threads: {torch.get_num_threads()}")

    loaded = load_model("gemma3")
    # prefix caching on: repeats find the context's blocks and prefill only its last one
    engines = {"kvcache": (LLMEngine(loaded=loaded, kv_cache_memory="1GiB", device="cpu"), time_ours),
               "hf": (HFPrefilled(hf_gemma3(loaded)), time_hf)}
    if not args.no_llamacpp:
        from llamacpp_peer import convert, start
        for dtype in ("native", "float32"):
            path = convert(Path(loaded.source), dtype, cache_dir() / "llamacpp")
            peer, _ = start(path, n_ctx=max(contexts) + args.new + 8, n_seq=1, threads=args.threads)
            engines[f"llama.cpp {'Q4_K_M' if dtype == 'native' else 'F32'}"] = (peer, time_llamacpp)

    results = []
    for context in contexts:
        ids = prompt_ids(loaded.tokenizer, context)
        runs: dict[str, list[float]] = {name: [] for name in engines}
        tokens: dict[str, list[int]] = {}
        for _ in range(args.repeats):
            for name, (engine, timer) in engines.items():
                tokens[name], tok_s = timer(engine, ids, args.new)
                runs[name].append(tok_s)
        row = {"context": context, "new_tokens": args.new}
        for name, values in runs.items():
            row[f"{name} tok/s"] = median(values)
            row[f"{name} / kvcache"] = median([v / o for v, o in zip(values, runs["kvcache"])])
            row[f"{name} same tokens as kvcache"] = tokens[name] == tokens["kvcache"]
        results.append(row)
        print(json.dumps(row))
    names = list(engines)
    print()
    print("| context | " + " | ".join(f"{n} decode tok/s" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for r in results:
        cells = [f"{r[f'{n} tok/s']:.1f}" + ("" if n == "kvcache" else f" ({r[f'{n} / kvcache']:.2f}x)")
                 for n in names]
        print(f"| {r['context']:,} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
