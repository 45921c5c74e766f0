"""Where a batch-1 decode step goes: the whole ``engine.step()``, the fused C step, the rest.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/profile_decode_step.py [--context 128] [--new 64]
        [--repeats 3] [--weights-dtype float32] [--kv-cache-dtype bfloat16]

One greedy request of --new tokens after a --context-token prompt, --repeats times in one engine.
Per repeat, the median over its decode steps of: the step, the fused C step (``FusedDecode.run``:
the embedding's rows, every layer, and the final norm and output head where it computes them), the
output head when PyTorch's side computes it (``vocab_logits``; "-" when it never runs) and the rest
(the scheduler, the plan's tensors, sampling, Python). The fused step's read rate is the weight bytes it reads over
its time; the roofline fraction
is (weight bytes + KV bytes read at the mean context) / step time / the read bandwidth measured in
this run. The CPU model and flags are printed first.
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import cpu_description, memory_read_bandwidth, prompt_ids

from kvcache import LLM, SamplingParams
from kvcache.models import fused_decode, layers, llama
from kvcache.models.packed import PackedWeight


def timed(record: list[float], fn):
    """fn, appending the seconds of each call to ``record``."""
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        record.append(time.perf_counter() - start)
        return out
    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--weights-dtype", default="float32")
    parser.add_argument("--kv-cache-dtype", default="bfloat16")
    args = parser.parse_args()

    print(f"# {cpu_description()}")
    bandwidth, how = memory_read_bandwidth()
    print(f"# read bandwidth {bandwidth / 1e9:.1f} GB/s ({how})")
    llm = LLM(weights_dtype=args.weights_dtype, dtype="float32", enable_prefix_caching=False,
              kv_cache_dtype=args.kv_cache_dtype, kv_cache_memory="512MB")
    engine = llm.engine
    model = engine.model
    head = layers.head_weight(model.embed_tokens if model.lm_head is None else model.lm_head)
    head_bytes = head.nbytes if isinstance(head, PackedWeight) else head.numel() * head.element_size()
    layer_bytes = engine.weight_bytes - head_bytes
    kv_bytes = engine.storage.bytes_per_token * (args.context + args.new / 2)
    fused_times: list[float] = []
    head_times: list[float] = []
    fused_decode.FusedDecode.run = timed(fused_times, fused_decode.FusedDecode.run)
    llama.vocab_logits = timed(head_times, llama.vocab_logits)

    ids = prompt_ids(llm.tokenizer, args.context)
    print(f"# {args.weights_dtype} weights: {layer_bytes / 1e6:.1f} MB in the layers (a tied embedding counted once, as the head), "
          f"{head_bytes / 1e6:.1f} MB in the head; KV {args.kv_cache_dtype}, {kv_bytes / 1e6:.1f} MB read a step")
    print("| repeat | step ms | fused C step ms | head in PyTorch ms | rest ms | fused step GB/s | roofline |")
    print("|---|---|---|---|---|---|---|")
    for repeat in range(args.repeats):
        engine.add_request(f"r{repeat}", ids, SamplingParams(max_tokens=args.new, temperature=0.0, ignore_eos=True))
        engine.step()  # the prefill
        steps, fused, heads = [], [], []
        while engine.has_unfinished_requests():
            fused_times.clear()
            head_times.clear()
            start = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - start)
            fused.append(sum(fused_times))
            heads.append(sum(head_times))
        step, fused_step, head = (statistics.median(t[1:]) for t in (steps, fused, heads))
        fused_bytes = layer_bytes + (0 if head_times else head_bytes)  # the last step tells where the head ran
        roofline = (engine.weight_bytes + kv_bytes) / step / bandwidth
        print(f"| {repeat + 1} | {step * 1e3:.2f} | {fused_step * 1e3:.2f} | {head * 1e3:.2f} | "
              f"{(step - fused_step - head) * 1e3:.2f} | {fused_bytes / fused_step / 1e9:.1f} | {roofline:.0%} |")


if __name__ == "__main__":
    main()
