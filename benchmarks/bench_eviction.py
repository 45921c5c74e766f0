"""Bounded KV per request on SmolLM2: quality (PPL, KLD), a retrieval probe, and serving at a fixed pool.

    apt-get install r-cran-janeaustenr     # Jane Austen's novels (public domain), as a Debian package
    nice python benchmarks/bench_eviction.py accuracy  [--tokens 4096 --budgets 0.1,0.2,0.5 --step 16]
    nice python benchmarks/bench_eviction.py retrieval [--filler 1500 --budgets 0.1,0.2,0.5]
    OMP_WAIT_POLICY=PASSIVE flock /tmp/kvcache-bench.lock python benchmarks/bench_eviction.py serving \\
        [--requests 16 --prompt 1024 --max-tokens 128 --pool-seqs 4 --budget 0.2]

* accuracy: the first --tokens tokens of Persuasion (1818) as one window; the full cache's logits
  in one pass, then each policy at each budget (a fraction of the window) advancing --step tokens
  at a time with eviction before every step; PPL, ΔPPL, mean KLD and top-1 agreement against full.
* retrieval: a fact ("the code word is PELICAN-7319") then --filler tokens of the novel, then the
  question; greedy answer through the engine (one prefill chunk, then decode) per policy and budget:
  is the whole code word (and the word alone) in the answer, and how many of the fact's tokens the
  policy still holds after the prompt.
* serving: --requests requests of --prompt distinct tokens and --max-tokens outputs on a pool sized
  for --pool-seqs full sequences, prefill in chunks of 256; per policy at --budget: the most requests
  running at once, preemptions, output tokens per second and wall time.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench_kv_quant import novel_text  # Persuasion, as issue 7 scored it
from common import cpu_description
from kvcache import SamplingParams

POLICIES = ["streaming", "h2o", "snapkv"]


def accuracy(args: argparse.Namespace) -> None:
    from kvcache.cache.policies import KVPolicy
    from kvcache.engine.engine import build_model
    from kvcache.models.loader import load_model
    from kvcache.runtime.scoring import Score, add, policy_step_logits, score_logits, window_logits

    loaded = load_model(None)
    model = build_model(loaded, "float32", torch.device("cpu"))
    ids = loaded.tokenizer.encode(novel_text(), add_special_tokens=False)[:args.tokens]
    with torch.inference_mode():
        ref = window_logits(model, ids, "fp32")  # [tokens - 1, vocab]: the full cache, one pass
        full = score_logits(ref, ids, ref)
        print(json.dumps({"bench": "accuracy", "kv_policy": "full", "tokens": full.tokens, "ppl": full.ppl}), flush=True)
        for budget in (float(b) for b in args.budgets.split(",")):
            for name in args.policies.split(","):
                start = time.perf_counter()
                total = Score(0, 0.0)
                for first, logits, _ in policy_step_logits(model, ids, "fp32", KVPolicy(name, budget), args.step):
                    rows = min(len(logits), len(ids) - 1 - first)
                    if rows > 0:
                        total = add(total, score_logits(logits[:rows], ids[first:first + rows + 1],
                                                        ref[first:first + rows]))
                print(json.dumps({"bench": "accuracy", "kv_policy": name, "kv_budget": budget,
                                  "kv_tokens": KVPolicy(name, budget).tokens_for(len(ids)), "step": args.step,
                                  "tokens": total.tokens, "ppl": total.ppl,
                                  "delta_ppl_pct": 100 * (total.ppl / full.ppl - 1), "kld": total.mean_kld,
                                  "top1_agreement": total.top1_agreement,
                                  "seconds": round(time.perf_counter() - start, 1)}), flush=True)


CODE_WORD = "PELICAN-7319"


def retrieval(args: argparse.Namespace) -> None:
    from kvcache.engine.engine import LLMEngine
    from kvcache.models.loader import load_model

    loaded = load_model(None)
    tok = loaded.tokenizer
    fact = tok.encode(f"Remember this: the code word is {CODE_WORD}.\n\n", add_special_tokens=True)
    filler = tok.encode(novel_text(), add_special_tokens=False)[2000:2000 + args.filler]
    question = tok.encode(f"\n\nWhat was the code word? The code word is", add_special_tokens=False)
    prompt = fact + filler + question
    params = dict(max_tokens=12, temperature=0.0, ignore_eos=True)
    runs = [("full", None)] + [(p, float(b)) for b in args.budgets.split(",") for p in POLICIES]
    for name, budget in runs:
        engine = LLMEngine(loaded=loaded, num_blocks=4 * (len(prompt) // 16 + 4))
        engine.add_request(None, prompt, SamplingParams(**params, kv_policy=name, kv_budget=budget))
        held = None
        while engine.has_unfinished_requests():
            running = list(engine.scheduler.running)
            outs = engine.step()
            for r in running:  # after each step: which of the fact's positions it still holds
                if r.kv_state is not None and r.num_computed_tokens >= len(prompt):
                    live = set(r.kv_state.groups[0].positions)
                    held = sum(p in live for p in range(len(fact)))
            done = [o for o in outs if o.finished]
        text = done[0].outputs[0].text
        print(json.dumps({"bench": "retrieval", "kv_policy": name, "kv_budget": budget,
                          "prompt_tokens": len(prompt), "fact_tokens": len(fact),
                          "fact_tokens_held": len(fact) if held is None else held,
                          "answer": text, "word": CODE_WORD.split("-")[0] in text,
                          "retrieved": CODE_WORD in text}), flush=True)


def serving(args: argparse.Namespace) -> None:
    from kvcache.config import SchedulerConfig
    from kvcache.engine.engine import LLMEngine
    from kvcache.models.loader import load_model

    loaded = load_model(None)
    length = args.prompt + args.max_tokens
    num_blocks = args.pool_seqs * -(-length // 16)
    for name in ["full"] + POLICIES:
        engine = LLMEngine(loaded=loaded, num_blocks=num_blocks, enable_prefix_caching=False,
                           scheduler_config=SchedulerConfig(long_prefill_token_threshold=256))
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True,
                                kv_policy=name, kv_budget=None if name == "full" else args.budget)
        for i in range(args.requests):  # distinct prompts: nothing shared
            engine.add_request(None, [(1000 + 37 * i + j) % 40000 + 500 for j in range(args.prompt)], params)
        peak = steps = 0
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
            peak = max(peak, len(engine.scheduler.running))
        wall = time.perf_counter() - start
        stats = engine.stats()
        print(json.dumps({"bench": "serving", "kv_policy": name, "kv_budget": None if name == "full" else args.budget,
                          "num_blocks": num_blocks, "requests": args.requests, "prompt": args.prompt,
                          "max_tokens": args.max_tokens, "peak_running": peak,
                          "preemptions": stats["num_preemptions"], "tokens_evicted": stats["num_tokens_evicted"],
                          "steps": steps, "seconds": round(wall, 1),
                          "output_tokens_per_s": round(args.requests * args.max_tokens / wall, 1)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="bench", required=True)
    a = sub.add_parser("accuracy")
    a.add_argument("--tokens", type=int, default=4096)
    a.add_argument("--budgets", default="0.1,0.2,0.5")
    a.add_argument("--policies", default=",".join(POLICIES))
    a.add_argument("--step", type=int, default=16)
    r = sub.add_parser("retrieval")
    r.add_argument("--filler", type=int, default=1500)
    r.add_argument("--budgets", default="0.1,0.2,0.5")
    s = sub.add_parser("serving")
    s.add_argument("--requests", type=int, default=16)
    s.add_argument("--prompt", type=int, default=1024)
    s.add_argument("--max-tokens", type=int, default=128)
    s.add_argument("--pool-seqs", type=int, default=4)
    s.add_argument("--budget", type=float, default=0.2)
    args = parser.parse_args()
    print(f"# {cpu_description()}; torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    {"accuracy": accuracy, "retrieval": retrieval, "serving": serving}[args.bench](args)


if __name__ == "__main__":
    main()
