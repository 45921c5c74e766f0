"""Every mistake a person makes on the command line, and every condition of the machine around it
(a closed pipe, a missing folder, bytes that are not UTF-8, a truncated model file, huge numbers),
ends in one sentence on stderr and a non-zero exit: each case runs the real ``kvcache`` as a
subprocess and looks at what a person would see."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kvcache.cli import build_parser
from kvcache.models.loader import default_model_path

KVCACHE = [sys.executable, "-m", "kvcache"]


def run(*argv: str | bytes, stdin: bytes | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*KVCACHE, *argv], input=stdin if stdin is not None else b"", capture_output=True,
                          timeout=timeout)


def one_sentence(r: subprocess.CompletedProcess, command: str, code: int = 2) -> str:
    """Assert a clean failure: the exit code, no traceback, and a last stderr line that is the error."""
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == code, (r.returncode, err)
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith(f"kvcache {command}: "), err
    assert len([line for line in lines if not line.startswith(("usage:", " "))]) == 1, err
    return lines[-1]


# --- fast: nothing here loads the model --------------------------------------------------------

def test_plot_into_a_missing_folder(tmp_path):
    line = one_sentence(run("size", "--preset", "llama-3-8b", "--plot", str(tmp_path / "no" / "kv.png")), "size")
    assert "does not exist" in line and str(tmp_path / "no") in line


def test_plot_onto_a_folder(tmp_path):
    line = one_sentence(run("size", "--preset", "llama-3-8b", "--plot", str(tmp_path)), "size")
    assert "is a directory" in line


def test_plot_path_printed_is_the_path_written(tmp_path):
    r = run("size", "--preset", "llama-3-8b", "--memory", "24", "--seq-len", "20000",
            "--plot", str(tmp_path / "kvplot"), "--json")
    assert r.returncode == 0, r.stderr
    written = json.loads(r.stdout)["plot"]
    assert written == str(tmp_path / "kvplot.png") and os.path.getsize(written) > 1000
    assert os.listdir(tmp_path) == ["kvplot.png"]


def test_plot_with_an_unknown_format(tmp_path):
    line = one_sentence(run("size", "--preset", "llama-3-8b", "--plot", str(tmp_path / "kv.xyz")), "size")
    assert "xyz" in line


def test_undecodable_prompt_bytes():
    line = one_sentence(run("generate", b"\xff\xfe bad"), "generate")
    assert "not valid UTF-8" in line and "0xff" in line


def test_undecodable_stdin():
    line = one_sentence(run("generate", "-", stdin=b"\xff\xfe bad"), "generate")
    assert "stdin is not valid UTF-8" in line


def test_empty_stdin_with_dash():
    assert "empty" in one_sentence(run("generate", "-", stdin=b"  \n"), "generate")


def test_huge_seed():
    assert "seed must be" in one_sentence(run("generate", "hi", "--seed", "9" * 30), "generate")


@pytest.mark.parametrize("argv, words", [
    (["generate", "hi", "--num-blocks", "9" * 20], "--num-blocks: must be between"),
    (["generate", "hi", "--max-tokens", "9" * 20], "--max-tokens: must be between"),
    (["generate", "hi", "--max-tokens", "0"], "--max-tokens: must be between 1"),
    (["size", "--layers", "9" * 20, "--kv-heads", "1", "--head-dim", "2"], "--layers: must be between"),
    (["size", "--preset", "llama-3-8b", "--seq-len", "0"], "--seq-len: must be between"),
    (["generate", "hi", "--dtype", "float16"], "fp32 (float32) or bf16 (bfloat16)"),
    (["generate", "hi", "--dtype", "float64"], "Unknown dtype"),
])
def test_huge_or_wrong_numbers(argv, words):
    assert words in one_sentence(run(*argv), argv[0])


def test_truncated_gguf_names_the_file(tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(default_model_path(), "rb") as f:
        cut.write_bytes(f.read(50_000_000))
    for command in (["generate", "hi"], ["size"]):
        line = one_sentence(run(*command, "--model", str(cut)), command[0])
        assert str(cut) in line and "truncated or damaged" in line


def test_version():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.decode().startswith("kvcache 0.")


def test_mistyped_flag_shows_the_commands_usage():
    r = run("generate", "hi", "--topp", "0.5")
    assert one_sentence(r, "generate").endswith("unrecognized arguments: --topp 0.5 (did you mean --top-p?)")
    assert r.stderr.decode().startswith("usage: kvcache generate")


def test_every_option_has_help():
    _, commands = build_parser()
    missing = [f"{name} {'/'.join(a.option_strings) or a.dest}" for name, p in commands.items()
               for a in p._actions if not a.help]
    assert not missing, missing


def test_help_and_size_do_not_import_torch():
    code = ("import sys; from kvcache.cli import main; "
            "main(['size', '--preset', 'llama-3-8b']); assert 'torch' not in sys.modules, 'torch'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


# --- these load the real model ------------------------------------------------------------------

@pytest.mark.slow
def test_max_tokens_past_the_context():
    line = one_sentence(run("generate", "hi", "--max-tokens", "9000"), "generate")
    assert "past the context of 8,192 tokens" in line and "--max-tokens 8191 or less" in line


@pytest.mark.slow
def test_max_model_len_bounds_the_request():
    line = one_sentence(run("generate", "hi there", "--max-model-len", "2"), "generate")
    assert "context is 2 tokens" in line


@pytest.mark.slow
def test_broken_pipe_is_one_sentence():
    p = subprocess.Popen([*KVCACHE, "generate", "Count to 100", "--max-tokens", "200"], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.read(5)
    p.stdout.close()  # what `| head -c 5` does
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 141
    assert "Traceback" not in err and err.strip().endswith("closed the pipe.")


@pytest.mark.slow
def test_prompt_from_stdin_system_and_stop():
    piped = run("generate", "--json", "--max-tokens", "1", stdin=b"What is 2+2?\n")
    dashed = run("generate", "-", "--json", "--max-tokens", "1", stdin=b"What is 2+2?")
    plain = run("generate", "What is 2+2?", "--json", "--max-tokens", "1")
    ids = [json.loads(r.stdout)["prompt_token_ids"] for r in (piped, dashed, plain)]
    assert ids[0] == ids[1] == ids[2]
    system = run("generate", "What is 2+2?", "--system", "You answer in French.", "--json", "--max-tokens", "1")
    assert len(json.loads(system.stdout)["prompt_token_ids"]) > len(ids[0]) + 5
    stopped = json.loads(run("generate", "Count from 1 to 20: 1, 2, 3,", "--stop", "7", "--json",
                             "--max-tokens", "40").stdout)
    assert stopped["finish_reason"] == "stop" and "7" not in stopped["text"] and "6" in stopped["text"]


@pytest.mark.slow
def test_figures_count_tokens_in_words():
    r = run("generate", "hi", "--max-tokens", "1", "--json")
    one = json.loads(r.stdout)
    assert one["prompt_tokens"] == 1 and one["completion_tokens"] == 1
    err = run("generate", "hi", "--max-tokens", "1").stderr.decode()
    assert "prefill  1 token in" in err and "decode   0 more tokens" in err and "1 block of 16" in err
