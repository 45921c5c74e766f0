"""Two or more builds of kvcache's C kernels against each other, in one process, step by step.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/ab_kernel_builds.py --builds "before=git:HEAD~1;after=tree" \
        [--weights-dtype float32] [--kv-cache-dtype auto] [--context 128] [--new 64] [--repeats 6]

A build is ``git:REV`` (the kernel sources at that revision), ``dir:PATH`` (a folder holding
matmul.c, decode.c, kvquant.c and kernels.h), or ``tree`` (the working tree), optionally followed by
`` -DNAME=VALUE`` compiler flags. One engine decodes ``--repeats`` greedy requests of ``--new``
tokens after a ``--context``-token prompt; every decode step runs on the next build in turn, so the
shared machine's slow and fast seconds fall on all of them alike. Prints each build's median step
time and its speed relative to the first. (How the four-stream matmul of issue 12 was measured.)
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from common import cpu_description, prompt_ids
from kvcache import LLM, SamplingParams, kernels

NAMES = ("matmul.c", "decode.c", "kvquant.c", "kernels.h")


def build(spec: str, folder: Path) -> ctypes.CDLL:
    """Compile one build (see the module docstring) with the flags kvcache.kernels uses."""
    source, *flags = spec.split()
    if source == "tree":
        where = kernels.HERE
    elif source.startswith("dir:"):
        where = Path(source[4:])
    elif source.startswith("git:"):
        where = folder / source[4:].replace("/", "_")
        where.mkdir()
        root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                              check=True, cwd=kernels.HERE).stdout.strip()
        relative = kernels.HERE.relative_to(root)
        for name in NAMES:
            text = subprocess.run(["git", "show", f"{source[4:]}:{relative / name}"], capture_output=True,
                                  check=True, cwd=root).stdout
            (where / name).write_bytes(text)
    else:
        raise SystemExit(f"a build is git:REV, dir:PATH or tree, got {source!r}")
    out = folder / f"build-{len(list(folder.glob('*.so')))}.so"
    subprocess.run([kernels._compiler(), "-O3", "-march=native", "-ffp-contract=off", "-fPIC", "-shared",
                    "-std=gnu11", "-fopenmp", *flags, *(str(where / n) for n in NAMES[:3]), "-o", str(out), "-lm"],
                   check=True)
    return kernels._bind(ctypes.CDLL(str(out)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--builds", required=True, help='"name=spec;name=spec", e.g. "before=git:HEAD~1;after=tree"')
    parser.add_argument("--weights-dtype", default="float32")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--kv-cache-dtype", default="auto",
                        help="the engine's KV cache format (bench_roofline's rows use bfloat16)")
    args = parser.parse_args()
    if kernels.library() is None:
        raise SystemExit("kvcache's C kernels are not built here (no C compiler?); nothing to compare.")
    print(f"# {cpu_description()}; {args.weights_dtype} weights, KV cache {args.kv_cache_dtype}, "
          f"{args.context}-token prompt, {args.new} new tokens")
    with tempfile.TemporaryDirectory() as tmp:
        builds = {name: build(spec, Path(tmp)) for name, spec in (b.split("=", 1) for b in args.builds.split(";"))}
        llm = LLM(weights_dtype=args.weights_dtype, dtype="float32", enable_prefix_caching=False,
                  kv_cache_dtype=args.kv_cache_dtype, kv_cache_memory="512MB")
        engine, names = llm.engine, list(builds)
        ids = prompt_ids(llm.tokenizer, args.context)
        times: dict[str, list[float]] = {name: [] for name in names}
        for repeat in range(args.repeats):
            engine.add_request(f"r{repeat}", ids, SamplingParams(max_tokens=args.new, temperature=0.0, ignore_eos=True))
            step = 0
            while engine.has_unfinished_requests():
                name = names[(step + repeat) % len(names)]
                kernels._library = builds[name]
                start = time.perf_counter()
                engine.step()
                if step:  # the first step is the prompt's
                    times[name].append(time.perf_counter() - start)
                step += 1
    first = statistics.median(times[names[0]])
    for name in names:
        median = statistics.median(times[name])
        print(f"{name}: median step {median * 1e3:.2f} ms, {first / median:.3f}x the speed of {names[0]}")


if __name__ == "__main__":
    main()
