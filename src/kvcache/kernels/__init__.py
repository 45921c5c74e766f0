"""CPU kernels of our own, compiled from C at first use; PyTorch does the same work when they are absent.

``matmul.c`` multiplies activations by weights kept in their storage format (float32, bfloat16,
Q8_0, Q4_1) for the few rows a decode step has, at the memory bandwidth (PyTorch's single-row
float32 GEMV reaches about half of it on AVX2 CPUs, and it has no int8/int4 matmul at all).
``decode.c`` runs a whole llama-family decode step in one call (see kvcache.models.fused_decode).
``kvquant.c`` is the decode attention over an fp8 / int8 / int4 KV cache, dequantizing inside its dot
products (see kvcache.models.quant_decode).

The library is built with the machine's C compiler (``$CC``, else ``cc``/``gcc``) and
``-march=native`` into the cache directory (``$KVCACHE_CACHE_DIR/kernels``, keyed by the source,
the compiler and the CPU's flags) the first time it is needed, in about a second, and loaded with
ctypes. Its threads are torch's OpenMP team. No compiler, a failed build or ``KVCACHE_KERNELS=0``: :func:`library` returns None and every
caller takes its PyTorch path, which computes the same numbers (the tests hold both to that).
This package imports nothing else from kvcache.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

log = logging.getLogger("kvcache.kernels")

HERE = Path(__file__).parent
SOURCES = (HERE / "matmul.c", HERE / "decode.c", HERE / "kvquant.c")  # and kernels.h, which all include
FORMAT_CODES = {"float32": 0, "bfloat16": 1, "q8_0": 2, "q4_1": 3}
_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False
_P = ctypes.c_void_p


def _cache_root() -> Path:
    return Path(os.environ.get("KVCACHE_CACHE_DIR", Path.home() / ".cache" / "kvcache")) / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# What a build targets: this CPU; any CPU of the architecture (the portable C paths, no AVX2); this
# CPU without AVX-512 (the AVX2 paths, which an AVX-512 machine would otherwise never run). The tests
# check all three.
TARGET_FLAGS = {"native": ["-march=native"], "portable": [], "avx2": ["-march=native", "-mno-avx512f"]}


def _build(compiler: str, target: str = "native") -> Path:
    """Compile the sources into the cache (once per source, compiler, CPU and target, see TARGET_FLAGS)
    and return the library's path."""
    source = b"".join(p.read_bytes() for p in (*SOURCES, HERE / "kernels.h"))
    key = hashlib.sha256(source + compiler.encode() + platform.machine().encode() + _cpu_flags().encode()
                         + target.encode() + " ".join(TARGET_FLAGS[target]).encode())
    path = _cache_root() / f"kernels-{key.hexdigest()[:16]}.so"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        out = Path(tmp) / path.name
        flags = ["-O3", *TARGET_FLAGS[target], "-ffp-contract=off", "-fPIC", "-shared", "-std=gnu11"]
        try:  # with OpenMP (torch's runtime at load time); a compiler without it builds single-threaded
            subprocess.run([compiler, *flags, "-fopenmp", *map(str, SOURCES), "-o", str(out), "-lm"], check=True,
                           capture_output=True, timeout=120)
        except subprocess.CalledProcessError:
            subprocess.run([compiler, *flags, *map(str, SOURCES), "-o", str(out), "-lm"], check=True,
                           capture_output=True, timeout=120)
        os.replace(out, path)  # atomic: another process building at the same time is harmless
    return path


def library_for(target: str) -> ctypes.CDLL:
    """The kernels built for ``target`` (see TARGET_FLAGS), loaded and bound, whatever :func:`library`
    uses: for the tests and benchmarks that check or time another build. Raises OSError without a C
    compiler, subprocess.CalledProcessError if the build fails."""
    compiler = _compiler()
    if compiler is None:
        raise OSError("no C compiler (cc, gcc, clang) on PATH")
    return _bind(ctypes.CDLL(str(_build(compiler, target))))


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    i = ctypes.c_int
    lib.kv_matmul.argtypes = [i, i, i, i, _P, _P, _P, _P, _P, _P, i]
    lib.kv_matmul.restype = i
    lib.kv_widen.argtypes = [i, i, i, _P, _P, _P, _P, i]
    lib.kv_widen.restype = i
    lib.kv_llama_decode.argtypes = [ctypes.POINTER(Model), i, _P, _P, _P, ctypes.c_long, _P, _P, ctypes.POINTER(GroupPlan),
                                    _P, _P, i]
    lib.kv_llama_decode.restype = i
    lib.kv_quant_decode.argtypes = [ctypes.POINTER(QuantCache), ctypes.POINTER(QuantStep), i]
    lib.kv_quant_decode.restype = i
    return lib


# The structures decode.c takes (kv_weight, kv_layer, kv_model, kv_group_plan), field for field.
class Weight(ctypes.Structure):
    _fields_ = [("fmt", ctypes.c_int), ("rows", ctypes.c_int), ("cols", ctypes.c_int), ("data", _P),
                ("scale", _P), ("minimum", _P), ("bias", _P)]


class Layer(ctypes.Structure):
    _fields_ = [("input_norm", _P), ("post_norm", _P), ("qkv", Weight), ("o", Weight), ("gate_up", Weight),
                ("down", Weight), ("k", _P), ("v", _P), ("group", ctypes.c_int), ("window", ctypes.c_int)]


class Model(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int) for name in ("num_layers", "hidden", "heads", "kv_heads", "head_dim",
                                                  "intermediate", "kv_bf16", "num_blocks", "block_size")] + [
        ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("layers", ctypes.POINTER(Layer)), ("final_norm", _P),
        ("head", Weight), ("embed", Weight)]


class GroupPlan(ctypes.Structure):
    _fields_ = [("slots", _P), ("tables", _P), ("token_seq", _P), ("token_keys", _P), ("width", ctypes.c_int)]


# The structures kvquant.c takes (kvq_cache, kvq_step), field for field.
QUANT_FORMAT_CODES = {"int8": 0, "fp8": 1, "int4": 2}


class QuantCache(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int) for name in ("fmt", "kv_heads", "group", "head_dim", "num_blocks",
                                                  "block_size", "value_group")] + [("unit", ctypes.c_float)] + [
        (name, _P) for name in ("k_codes", "v_codes", "k_scale", "k_zero", "v_scale", "v_zero")]


class QuantStep(ctypes.Structure):
    _fields_ = [("n", ctypes.c_int), ("width", ctypes.c_int), ("window", ctypes.c_int), ("scale", ctypes.c_float),
                ("q", _P), ("tables", _P), ("seq_lens", _P), ("out", _P)]


def library() -> ctypes.CDLL | None:
    """The compiled kernels, building them on first use; None where they cannot be had (then the
    reason is logged once and callers use PyTorch).

    torch is imported first, so that the library's libgomp.so.1 resolves to the one torch loaded
    and both run on one OpenMP team."""
    global _library, _tried
    if _tried:
        return _library
    with _lock:
        if _tried:
            return _library
        import torch  # noqa: F401  (see the docstring)

        if os.environ.get("KVCACHE_KERNELS", "1") == "0":
            log.info("KVCACHE_KERNELS=0: using PyTorch for weight matmuls and quantized KV reads")
        else:
            try:
                _library = library_for("native")
            except (OSError, subprocess.SubprocessError) as err:
                detail = getattr(err, "stderr", b"") or b""
                log.warning("kvcache's C kernels are unavailable (%s%s); weight matmuls and quantized KV reads use "
                            "PyTorch, which is slower for decode", err, (": " + detail.decode(errors="replace")[-400:])
                            if detail else "")
        _tried = True
        return _library


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX-512 BF16 or AMX); without it PyTorch
    emulates bfloat16 matmuls, 3-5x slower than float32."""
    flags = set(_cpu_flags().split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def cpu_description() -> str:
    """The CPU's model name and the vector extensions that matter here, for benchmark headers and logs."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16", "amx_int8")
    flags = set(_cpu_flags().split())
    return f"{model}; {os.cpu_count()} cores; " + (" ".join(f for f in wanted if f in flags) or "no AVX2")


def reset() -> None:
    """Forget the loaded library so the next :func:`library` call decides again (tests)."""
    global _library, _tried
    with _lock:
        _library, _tried = None, False
