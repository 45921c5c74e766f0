import os
import tempfile

import pytest
import torch

# Converted weights go to a per-session temporary cache unless the caller chose one.
os.environ.setdefault("KVCACHE_CACHE_DIR", os.path.join(tempfile.gettempdir(), "kvcache-test-cache"))
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def smollm():
    """The real embedded model, loaded once per test session (float32)."""
    from kvcache.models.loader import load_model
    return load_model()


@pytest.fixture(scope="session")
def smollm_engine_factory(smollm):
    from kvcache.engine.engine import LLMEngine

    def make(**kwargs):
        return LLMEngine(loaded=smollm, **kwargs)
    return make
