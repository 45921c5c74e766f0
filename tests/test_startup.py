"""Start-up and threads: the one-shot pool sized to the request, weights taken without a copy and
cached by content, and the default thread count leaving busy cores alone."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest
import torch

from kvcache.cli.threads import allowed_cpus, busy_cores, default_threads
from kvcache.models.loader import default_model_path, load_model


def test_default_threads_leave_a_busy_core_alone():
    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        cpus = allowed_cpus()
        assert busy_cores(cpus, 0.5) >= 0.8  # the neighbour's core (and whatever else runs) is seen busy
        assert 1 <= default_threads() <= max(1, len(cpus) - 1)
    finally:
        neighbour.kill()
        neighbour.wait()


@pytest.mark.slow
def test_generate_sizes_its_pool_to_the_request_and_takes_threads():
    r = subprocess.run([sys.executable, "-m", "kvcache", "generate", "hi", "--max-tokens", "20", "--json",
                        "--threads", "1"], capture_output=True, text=True, timeout=300)
    out = json.loads(r.stdout)
    assert out["kv_pool_blocks"] == 2  # ceil((1 prompt + 20 new) / 16), not 1 GiB
    assert out["threads"] == 1


@pytest.mark.slow
def test_model_keeps_the_gguf_blocks_as_they_are(smollm_engine_factory, smollm):
    """The embedded GGUF's Q4_1 projections and Q8_0 embedding are held as the file stores them
    (Q/K/V fused), not widened to float32: a fifth of the bytes."""
    from gguf import GGUFReader

    engine = smollm_engine_factory(num_blocks=4)
    qkv = engine.model.layers[0].self_attn.qkv_proj
    q = smollm.weights["model.layers.0.self_attn.q_proj.weight"]
    assert qkv.fmt == q.fmt == "q4_1" and torch.equal(qkv.data[:q.data.shape[0]], q.data)
    reader = GGUFReader(str(default_model_path()))
    v_blocks = next(t for t in reader.tensors if t.name == "blk.0.attn_v.weight").data  # [rows, 18 blocks x 20 B]
    rows = v_blocks.shape[0]
    nibbles = torch.from_numpy(v_blocks.reshape(rows, -1, 20)[..., 4:].reshape(rows, -1).copy())
    assert torch.equal(qkv.data[-rows:], nibbles)  # V's rows (not rope-permuted) are the file's bytes
    assert engine.model.embed_tokens.fmt == "q8_0"
    assert engine.stats()["weight_bytes"] < 100e6 < sum(p.numel() * 4 for p in smollm.float_weights().values())


@pytest.mark.slow
def test_converted_weights_are_keyed_by_content(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCACHE_CACHE_DIR", str(tmp_path / "cache"))
    first, second = tmp_path / "a" / "model.gguf", tmp_path / "b" / "renamed.gguf"
    for path in (first, second):
        path.parent.mkdir()
        shutil.copyfile(default_model_path(), path)
    load_model(first)
    load_model(second)  # same bytes elsewhere under another name: found, not converted again
    assert len(list((tmp_path / "cache" / "converted").iterdir())) == 1
