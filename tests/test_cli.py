"""The command line: clear one-sentence errors with exit code 2, JSON output, help everywhere."""

import json
import subprocess
import sys

import pytest

from kvcache.cli import main


def _run(*argv):
    return subprocess.run([sys.executable, "-m", "kvcache", *argv], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command", [[], ["generate"], ["chat"], ["size"], ["serve"]])
def test_help_everywhere(command):
    r = _run(*command, "--help")
    assert r.returncode == 0 and "usage:" in r.stdout


def test_bad_model_files_get_one_sentence(tmp_path, capsys):
    junk = tmp_path / "weights.bin"
    junk.write_bytes(b"\x00not a model at all")
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "hidden_size": 8}))
    cases = [
        (["generate", "hi", "--model", str(tmp_path / "missing.gguf")], "does not exist"),
        (["generate", "hi", "--model", str(junk)], "neither a GGUF file"),
        (["generate", "hi", "--model", str(folder)], "Unsupported model_type 'gpt2'"),
        (["generate", "hi", "--dtype", "float64"], "Unknown dtype"),
        (["generate", "hi", "--temperature", "-0.5"], "temperature must be at least 0"),
        (["generate", "hi", "--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["generate", "hi", "--kv-cache-memory", "lots"], "Cannot read 'lots' as a size"),
        (["serve", "--port", "0"], "--port must be between"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)


@pytest.mark.slow
def test_generate_json_on_the_real_model():
    r = _run("generate", "The capital of France is", "--max-tokens", "6", "--json", "--num-blocks", "32")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["token_ids"]) == 6 and out["prompt_token_ids"] and out["text"]
    assert out["kv_cache_bytes"] == out["kv_cache_bytes_formula"] == out["kv_tokens"] * 46080


@pytest.mark.slow
def test_generate_prompt_over_the_context():
    r = _run("generate", "word " * 9000, "--max-tokens", "4")
    assert r.returncode == 2 and "context" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_chat_reuses_the_conversation_cache():
    r = subprocess.run([sys.executable, "-m", "kvcache", "chat", "--max-tokens", "24", "--num-blocks", "64"],
                       input="What is the capital of France?\nAnd of Italy?\n", capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    reused = [int(x) for x in __import__("re").findall(r"(\d+) of \d+ prompt tokens from the cache", r.stderr)]
    assert len(reused) == 2 and reused[0] == 0 and reused[1] >= 32


@pytest.mark.slow
def test_generate_under_an_eviction_policy_reports_the_kv_it_holds():
    """The KV line counts the tokens the request still holds, not every token it computed."""
    r = _run("generate", "--chat", "Ship's log, day one: wind from the north-east, eleven knots. Day two: fog, "
             "then a clear sky; the cook burned the bread. Day three: a whale off the port bow. Write the entry "
             "for day four.", "--max-tokens", "12", "--json", "--kv-policy", "streaming", "--kv-budget", "32")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["completion_tokens"] == 12  # 11 decode steps, each evicting down to the budget first
    assert out["kv_tokens"] == 32 + 1  # the budget, and the last step's token written after it
    assert out["kv_tokens"] + out["kv_tokens_evicted"] == len(out["prompt_token_ids"]) + 11
    assert out["kv_cache_bytes"] == out["kv_cache_bytes_formula"] == out["kv_tokens"] * 46080
    assert out["kv_cache_bytes"] < out["kv_bytes_allocated"]
