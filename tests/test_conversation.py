"""The chat's conversation: dropping the oldest turns to fit, saving and loading, bad files."""

from __future__ import annotations

import json

import pytest

from kvcache.cli.conversation import Conversation


def words(messages):
    return sum(len(m["content"].split()) for m in messages)


def test_fit_drops_the_oldest_turns_and_keeps_the_system_message():
    c = Conversation("be brief", [{"role": "user", "content": "a b c"}, {"role": "assistant", "content": "d e"},
                                  {"role": "user", "content": "f g"}, {"role": "assistant", "content": "h"},
                                  {"role": "user", "content": "i j k"}])
    assert c.fit(words, 8) == 1  # 2 + 11 words -> drop (a b c / d e) -> 2 + 6 = 8
    assert [m["content"] for m in c.all_messages()] == ["be brief", "f g", "h", "i j k"]
    assert c.fit(words, 8) == 0


def test_a_message_too_long_alone_is_refused():
    c = Conversation(None, [{"role": "user", "content": "x " * 50}])
    with pytest.raises(ValueError, match="send a shorter one"):
        c.fit(words, 10)


def test_save_and_load(tmp_path):
    c = Conversation("sys", [{"role": "user", "content": "héllo"}, {"role": "assistant", "content": "hi"}])
    c.save(str(tmp_path / "c.json"))
    back = Conversation.load(str(tmp_path / "c.json"))
    assert back == c


@pytest.mark.parametrize("content", [b"\xff\xfe", b"[1, 2]", json.dumps({"messages": [{"role": "god"}]}).encode()])
def test_load_refuses_what_is_not_a_conversation(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="is not a saved conversation"):
        Conversation.load(str(path))
