"""Speculative decoding (prompt lookup) against plain decoding and the peers' prompt lookup, same weights.

    python benchmarks/bench_spec.py batch1 [--ks 2,3,4,5,6,7,8] [--peers hf,llamacpp] [--max-tokens 128]
                                           [--draft-layers 6 --k 4] [--repeats 3]
    python benchmarks/bench_spec.py concurrent [--concurrency 8,32] [--k 4] [--repeats 3]
    python benchmarks/bench_spec.py chat [--k 4]

batch1: one request at a time over the 21 input-grounded prompts (benchmarks/spec_workload.py), greedy,
float32 weights and activations on every side. Every system is timed from the outside the same way: generating 1 token gives the prefill time,
generating up to --max-tokens (stopping at EOS) minus that gives the decode time of the other tokens;
decode tokens/s = all prompts' decode tokens / all prompts' decode time. The systems take turns on each
prompt (so the shared machine's slow spells fall on all of them); with --repeats, the median of the
repeats and the median of the per-repeat ratios to our plain decode. Our prefix cache is off, and
llama.cpp's context is reset before every call, so no system reuses a prompt's KV between the calls.
Peers: HF transformers generate(prompt_lookup_num_tokens=k) and llama-cpp-python's
Llama(draft_model=LlamaPromptLookupDecoding(num_pred_tokens=k)) on the same GGUF requantized to F32, in a
process of its own (benchmarks/peer_process.py says why); so is HF.
concurrent: all prompts in one continuous batch (the 21 cycled up to the concurrency), output tokens/s
without speculation, verifying every draft (--always-speculate) and with the engine's speculation gate
(the default, engine/spec_gate.py). chat: the free-form set, batch 1 and concurrently.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from common import cpu_description, hf_model
from kvcache import SamplingParams
from kvcache.config import SchedulerConfig, SpeculativeConfig
from kvcache.engine.engine import LLMEngine
from kvcache.models.loader import default_model_path, load_model
from spec_workload import chat_messages, grounded_messages


def encode_all(tokenizer, conversations) -> list[list[int]]:
    return [tokenizer.encode(tokenizer.apply_chat_template(c, add_generation_prompt=True), add_special_tokens=False)
            for c in conversations]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Ours:
    def __init__(self, loaded, k: int | None, ngram_min: int, draft: str | None = None) -> None:
        method = "draft" if draft else "ngram"
        spec = SpeculativeConfig(method, k, draft_model=draft, ngram_min=ngram_min) if k else None
        self.engine = LLMEngine(loaded=loaded, num_blocks=512, enable_prefix_caching=False, speculative=spec,
                                weights_dtype="float32")  # the peers' weights: F32
        self.name = f"kvcache {method} k={k}" if k else "kvcache (no speculation)"

    def generate(self, ids: list[int], max_tokens: int) -> list[int]:
        self.engine.add_request("b", ids, SamplingParams(max_tokens=max_tokens, temperature=0.0))
        while True:
            for out in self.engine.step():
                if out.finished:
                    return out.outputs[0].token_ids

    def spec_stats(self) -> dict:
        s = self.engine.stats()
        return {k: s[k] for k in ("spec_drafted_tokens", "spec_accepted_tokens", "spec_verifications")}


def truncated_self_draft(loaded, num_layers: int, folder: Path) -> str:
    """The target's first ``num_layers`` layers with its final norm and tied head, saved as a model folder."""
    from dataclasses import replace
    from kvcache.models.loader import save_hf_folder
    weights = {name: t for name, t in loaded.weights.items()
               if not name.startswith("model.layers.") or int(name.split(".")[2]) < num_layers}
    save_hf_folder(folder, replace(loaded.config, num_layers=num_layers), weights, loaded.tokenizer)
    return str(folder)


class HF:
    """HF transformers' generate on exactly our float32 weights (built from the default model here:
    this class runs in a process of its own, see Peer)."""

    def __init__(self, k: int | None, eos: list[int], threads: int) -> None:
        torch.set_num_threads(threads)
        self.model, self.k, self.eos = hf_model(load_model(), torch.float32), k, eos

    def generate(self, ids: list[int], max_tokens: int) -> list[int]:
        extra = {"prompt_lookup_num_tokens": self.k} if self.k else {}
        with torch.inference_mode():
            out = self.model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                                      eos_token_id=self.eos, pad_token_id=self.eos[0], **extra)
        return out[0, len(ids):].tolist()

    def spec_stats(self) -> dict:
        return {}


class Peer:
    """A peer system in a process of its own (peer_process.py: OpenMP as its users have it, not the
    passive waits importing kvcache sets in this process): ``kind`` names its class there."""

    def __init__(self, name: str, kind: str, *args) -> None:
        from peer_process import PeerProcess
        self.name = name
        self.peer = PeerProcess(kind, *args)

    def generate(self, ids: list[int], max_tokens: int) -> list[int]:
        return self.peer.generate(ids, max_tokens)

    def spec_stats(self) -> dict:
        return {}


def batch1(systems: list, prompts: list[list[int]], max_tokens: int, repeats: int) -> list[dict]:
    """Decode tokens/s of each system over every prompt, one request at a time (see the module
    docstring). Interleaved: per repeat and prompt, every system in turn, so a slow minute of the
    shared machine falls on all of them alike. Per system: the median over repeats, each repeat's
    figure, and the median over repeats of its ratio to the first system (our plain decode)."""
    runs = [[{"decode_s": 0.0, "decode_tokens": 0, "outputs": []} for _ in systems] for _ in range(repeats)]
    for system in systems:  # warm-up: a first call's one-time costs would land in its ttft and shrink its decode time
        system.generate(prompts[0], 2)
    for run in runs:
        for ids in prompts:
            for system, acc in zip(systems, run):
                time.sleep(0.05)  # a peer process's OpenMP threads spin a moment after its last call
                ttft = timed(lambda: system.generate(ids, 1))
                out: list[int] = []
                total = timed(lambda: out.extend(system.generate(ids, max_tokens)))
                acc["decode_s"] += max(total - ttft, 1e-9)
                acc["decode_tokens"] += len(out) - 1
                acc["outputs"].append(out)
    rows = []
    for i, system in enumerate(systems):
        rates = [run[i]["decode_tokens"] / run[i]["decode_s"] for run in runs]
        stats = {k: v // repeats for k, v in system.spec_stats().items()}  # drafts repeat exactly
        rows.append({"system": system.name, "decode_tokens": runs[0][i]["decode_tokens"],
                     "decode_tok_s": round(statistics.median(rates), 2), "decode_tok_s_runs": [round(r, 2) for r in rates],
                     "vs_ours": round(statistics.median(r / run[0]["decode_tokens"] * run[0]["decode_s"]
                                                        for r, run in zip(rates, runs)), 3),
                     **stats, "outputs": runs[0][i]["outputs"]})
    return rows


def concurrent(loaded, prompts, k: int | None, max_tokens: int, ngram_min: int, adaptive: bool = False) -> dict:
    """Every prompt at once: output tokens/s from the first add to the last finish. ``adaptive``:
    the engine's speculation gate picks whose drafts to verify; otherwise every draft is."""
    spec = SpeculativeConfig("ngram", k, ngram_min=ngram_min, adaptive=adaptive) if k else None
    engine = LLMEngine(loaded=loaded, num_blocks=4096, speculative=spec, weights_dtype="float32",
                       scheduler_config=SchedulerConfig(max_num_seqs=len(prompts), max_num_batched_tokens=8192))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    start = time.perf_counter()
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, params)
    tokens = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens += len(out.outputs[0].token_ids)
    elapsed = time.perf_counter() - start
    s = engine.stats()
    return {"k": k, "adaptive": bool(k) and adaptive, "requests": len(prompts), "output_tokens": tokens, "seconds": round(elapsed, 2),
            "tok_s": round(tokens / elapsed, 2), "drafted": s["spec_drafted_tokens"],
            "accepted": s["spec_accepted_tokens"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["batch1", "concurrent", "chat"])
    ap.add_argument("--ks", default="2,3,4,5,6,7,8")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--peers", default="hf,llamacpp")
    ap.add_argument("--peer-ks", default="4,8")
    ap.add_argument("--concurrency", default="8,32")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--ngram-min", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=0, help="use only the first N prompts (0: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--draft-layers", type=int, default=0,
                    help="batch1: also --speculative draft (k = --k) with the target's first N layers as the draft")
    ap.add_argument("--no-batch1", action="store_true", help="chat: only the concurrent runs")
    ap.add_argument("--repeats", type=int, default=1,
                    help="every system, interleaved per prompt (batch1) or the three arms alternating "
                         "(concurrent), this many times; medians reported")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {cpu_description()}; torch threads {args.threads}", flush=True)
    loaded = load_model()
    tok = loaded.tokenizer
    grounded = encode_all(tok, grounded_messages())
    chat = encode_all(tok, chat_messages())
    if args.prompts:
        grounded, chat = grounded[:args.prompts], chat[:args.prompts]
    results: list[dict] = []

    def report(row: dict) -> None:
        results.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "outputs"}), flush=True)

    if args.what == "batch1" or (args.what == "chat" and not args.no_batch1):
        prompts = grounded if args.what == "batch1" else chat
        ks = [int(k) for k in args.ks.split(",")] if args.what == "batch1" else [args.k]
        systems = [Ours(loaded, None, args.ngram_min)] + [Ours(loaded, k, args.ngram_min) for k in ks]
        if args.draft_layers:
            import tempfile
            draft = truncated_self_draft(loaded, args.draft_layers, Path(tempfile.mkdtemp()) / "draft")
            systems.append(Ours(loaded, args.k, args.ngram_min, draft))
        peers = [p for p in args.peers.split(",") if p] if args.what == "batch1" else []
        peer_ks = [None] + [int(k) for k in args.peer_ks.split(",")]
        if "hf" in peers:
            systems += [Peer(f"HF transformers prompt_lookup_num_tokens={k}" if k else "HF transformers (no speculation)",
                             "bench_spec:HF", k, sorted(tok.eos_token_ids), args.threads) for k in peer_ks]
        if "llamacpp" in peers:
            from llamacpp_peer import convert
            path = convert(default_model_path(), "float32", Path(os.environ.get("KVCACHE_CACHE_DIR", "/tmp")) / "llamacpp")
            systems += [Peer(f"llama-cpp-python LlamaPromptLookupDecoding(num_pred_tokens={k})" if k
                             else "llama-cpp-python (no speculation)", "llamacpp_peer:PromptLookup", path, k,
                             args.threads) for k in peer_ks]
        rows = batch1(systems, prompts, args.max_tokens, args.repeats)
        for system, row in zip(systems, rows):
            if isinstance(system, Ours):
                row["identical_to_no_speculation"] = row["outputs"] == rows[0]["outputs"]
            report(row)
        for system in systems:  # the peers' processes
            if isinstance(system, Peer):
                system.peer.close()
    if args.what in ("concurrent", "chat"):
        prompts = grounded if args.what == "concurrent" else chat
        for n in [int(c) for c in args.concurrency.split(",")]:
            batch = [prompts[i % len(prompts)] for i in range(n)]
            arms = ((None, False), (args.k, False), (args.k, True))
            runs = [[concurrent(loaded, batch, k, args.max_tokens, args.ngram_min, adaptive) for k, adaptive in arms]
                    for _ in range(args.repeats)]
            for arm in range(len(arms)):
                rows = sorted((run[arm] for run in runs), key=lambda r: r["tok_s"])
                row = dict(rows[len(rows) // 2], tok_s_runs=[r["tok_s"] for r in rows])
                row["vs_no_speculation"] = round(statistics.median(r[arm]["tok_s"] / r[0]["tok_s"] for r in runs), 3)
                report(row)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.exit(main())
