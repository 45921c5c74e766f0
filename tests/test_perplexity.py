"""``kvcache perplexity``: windows, scores against the plain cache, the CLI's output and its errors."""

import json
import math

import pytest

from kvcache.cli import main
from kvcache.runtime.scoring import score_text, windows

TEXT = ("The lighthouse keeper climbed the spiral stairs each evening, counting the steps aloud so that "
        "the silence would not settle on him. At the top he trimmed the wick, polished the great lens and "
        "watched the ships pass far out on the grey water, their lamps swinging like slow stars. ") * 3


def test_windows_cover_consecutive_tokens_and_stop_at_the_budget():
    ids = list(range(10))
    assert windows(ids, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # 3 + 3 + 1 predictions
    assert windows(ids, 4, max_scored=5) == [[0, 1, 2, 3], [4, 5, 6]]
    assert windows([7], 4) == []
    with pytest.raises(ValueError, match="at least 2"):
        windows(ids, 1)


@pytest.mark.slow
def test_plain_cache_has_zero_kld_and_int4_has_some(smollm):
    from kvcache.engine.engine import build_model
    import torch
    model = build_model(smollm, "float32", torch.device("cpu"))
    ids = smollm.tokenizer.encode(TEXT, add_special_tokens=False)
    plain = score_text(model, ids, 48, "fp32", "fp32", max_scored=90)
    assert plain.tokens == 90 and plain.mean_kld == pytest.approx(0, abs=1e-9) and plain.top1_agreement == 1.0
    int4 = score_text(model, ids, 48, "int4", "fp32", max_scored=90)
    assert int4.tokens == 90 and int4.mean_kld > 1e-4 and int4.ppl != plain.ppl
    assert 1 < plain.ppl < 1000 and math.isfinite(int4.ppl)


@pytest.mark.slow
def test_cli_prints_json_with_kld(tmp_path, capsys):
    path = tmp_path / "story.txt"
    path.write_text(TEXT, encoding="utf-8")
    assert main(["perplexity", str(path), "--ctx", "32", "--max-tokens", "40", "--kv-cache-dtype", "int8",
                 "--kld", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == 40 and result["kv_cache_dtype"] == "int8" and result["ppl"] > 1
    assert 0 <= result["kld"] < 0.1 and 0.5 < result["top1_agreement"] <= 1


def test_cli_bad_values_get_one_sentence_and_exit_2(tmp_path, capsys):
    path = tmp_path / "story.txt"
    path.write_text(TEXT, encoding="utf-8")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    cases = [([str(path), "--kv-cache-dtype", "int3"], "Unknown kv_cache_dtype 'int3'"),
             ([str(tmp_path / "missing.txt")], "no such file"),
             ([str(bad)], "not UTF-8"),
             ([str(path), "--ctx", "1"], "--ctx must be at least 2")]
    for args, message in cases:
        assert main(["perplexity", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_generate_rejects_a_bad_kv_cache_dtype(capsys):
    assert main(["generate", "Hi", "--kv-cache-dtype", "int3"]) == 2
    err = capsys.readouterr().err
    assert "Unknown kv_cache_dtype 'int3'" in err and "Traceback" not in err
