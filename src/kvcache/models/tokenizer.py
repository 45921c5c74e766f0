"""Tokenizers (via the ``tokenizers`` library) and chat templates (via jinja2, the HF convention).

A tokenizer comes either from a Hugging Face ``tokenizer.json`` or from the vocabulary, merges (or,
for SentencePiece, scores and positions) and token types that llama.cpp stores in GGUF metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers

# GGUF token types (llama.cpp's llama_token_type)
_CONTROL, _USER_DEFINED = 3, 4
_SPACE = "\u2581"  # SentencePiece's visible space

# Pre-tokenizer split patterns by GGUF ``tokenizer.ggml.pre`` name.
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre in ("smollm", "starcoder", "refact"):
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in ("llama-bpe", "llama3", "smaug-bpe"):
        pattern = _LLAMA3_PATTERN
    elif pre in ("qwen2", "deepseek-r1-qwen"):
        pattern = _QWEN2_PATTERN
    else:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def tokenizer_from_gguf_metadata(meta: Mapping[str, Any]) -> "Tokenizer":
    """Build the tokenizer llama.cpp's GGUF metadata describes: byte-level BPE (``gpt2``), or
    Gemma's SentencePiece vocabulary (``llama`` in a gemma3 file)."""
    kind = meta.get("tokenizer.ggml.model")
    arch = str(meta.get("general.architecture", ""))
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"]) if "tokenizer.ggml.tokens" in meta else []
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if kind == "gpt2":
        backend = _byte_level_bpe(meta, tokens)
    elif kind == "llama" and arch == "gemma3":
        backend = _gemma_sentencepiece(tokens, meta)
    else:
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported for {arch or 'this'} models; kvcache "
                         "reads byte-level BPE ('gpt2') vocabularies and Gemma-3's SentencePiece one from GGUF, "
                         "or a tokenizer.json from a model folder.")
    vocab = backend.get_vocab()  # a run of spaces respelled in it is no longer added whole, as in transformers
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, kind_ in zip(tokens, types) if kind_ == _CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, kind_ in zip(tokens, types) if kind_ == _USER_DEFINED and t in vocab])
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eot = meta.get("tokenizer.ggml.eot_token_id")
    if eot is None and arch == "gemma3":
        eot = backend.token_to_id("<end_of_turn>")  # llama.cpp ends a Gemma turn there too
    return Tokenizer(
        backend,
        bos_token_id=int(bos) if bos is not None else None,
        eos_token_ids=frozenset(int(t) for t in (eos, eot) if t is not None),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")),
        chat_template=meta.get("tokenizer.chat_template"),
    )


def _byte_level_bpe(meta: Mapping[str, Any], tokens: list[str]) -> HFTokenizer:
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    backend.pre_tokenizer = _byte_level_pre_tokenizer(str(meta.get("tokenizer.ggml.pre", "default")))
    backend.decoder = decoders.ByteLevel()
    return backend


def _gemma_sentencepiece(tokens: list[str], meta: Mapping[str, Any]) -> HFTokenizer:
    """Gemma's SentencePiece BPE as a ``tokenizers`` BPE: spaces written as U+2581 (no prefix
    space), byte fallback (``<0x..>`` tokens) for what the vocabulary lacks.

    The GGUF carries no merges, so they are rebuilt from the vocabulary: every way to cut a token
    into two tokens, ranked by the token's position in the file (Gemma's merge order; its scores
    do not rank the user-defined tokens such as runs of spaces), longer left piece first. This is
    what transformers does with the same file, so both give the same ids. Runs of spaces, stored
    as spaces, are respelled as U+2581 first.
    """
    tokens = [_SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = [(tok[:cut], tok[cut:]) for tok in tokens for cut in range(len(tok) - 1, 0, -1)
              if tok[:cut] in vocab and tok[cut:] in vocab]
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True,
                                     unk_token=tokens[int(unk)] if unk is not None else None))
    backend.normalizer = normalizers.Replace(" ", _SPACE)
    backend.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    return backend


def _token_id(backend: HFTokenizer, token: Any) -> int | None:
    if isinstance(token, dict):
        token = token.get("content")
    return backend.token_to_id(token) if isinstance(token, str) else None


def tokenizer_from_folder(folder: Path) -> "Tokenizer":
    """Load ``tokenizer.json`` with ``tokenizer_config.json`` and ``generation_config.json``."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"{folder} has no tokenizer.json; kvcache needs it next to config.json.")
    backend = HFTokenizer.from_file(str(path))
    cfg = _read_json(folder / "tokenizer_config.json")
    gen = _read_json(folder / "generation_config.json")
    model_cfg = _read_json(folder / "config.json")
    eos_ids: set[int] = set()
    for source in (gen.get("eos_token_id"), model_cfg.get("eos_token_id")):
        if isinstance(source, int):
            eos_ids.add(source)
        elif isinstance(source, list):
            eos_ids.update(int(t) for t in source)
    eos_from_cfg = _token_id(backend, cfg.get("eos_token"))
    if eos_from_cfg is not None:
        eos_ids.add(eos_from_cfg)
    template = cfg.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    return Tokenizer(
        backend,
        bos_token_id=_token_id(backend, cfg.get("bos_token")),
        eos_token_ids=frozenset(eos_ids),
        # tokenizer.json's post-processor adds BOS where the model wants it; a folder kvcache wrote
        # from a GGUF says add_bos_token instead (encode never adds a second BOS).
        add_bos=bool(cfg.get("add_bos_token", False)),
        chat_template=template if isinstance(template, str) else None,
    )


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


@dataclass
class Tokenizer:
    """Text <-> token ids, the stop tokens, and the chat template."""

    backend: HFTokenizer
    bos_token_id: int | None
    eos_token_ids: frozenset[int]
    add_bos: bool
    chat_template: str | None
    _template_cache: Any = field(default=None, repr=False)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch releases the GIL while it works (encode does not): a long prompt tokenized
        # in a worker thread then leaves the server's event loop free.
        ids = self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None and \
                (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                            add_generation_prompt: bool = True) -> str:
        """Render ``messages`` ([{role, content}, ...]) with the model's own template."""
        if not self.chat_template:
            raise ValueError("This model has no chat template; use plain generation instead of chat.")
        for message in messages:
            if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
                raise ValueError("Each chat message must be an object with 'role' and 'content'.")
        if self._template_cache is None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_exception
            env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent,
                                                                          ensure_ascii=False)
            self._template_cache = env.from_string(self.chat_template)
        special = {"bos_token": self._token_text(self.bos_token_id),
                   "eos_token": self._token_text(min(self.eos_token_ids) if self.eos_token_ids else None)}
        try:
            return self._template_cache.render(messages=list(messages),
                                               add_generation_prompt=add_generation_prompt, **special)
        except TemplateError as err:
            raise ValueError(f"The chat template rejected these messages: {err}") from None

    def _token_text(self, token_id: int | None) -> str:
        return self.backend.id_to_token(token_id) if token_id is not None else ""

    def save_pretrained(self, folder: Path) -> None:
        """Write tokenizer.json and tokenizer_config.json so the folder loads as a HF model."""
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        cfg: dict[str, Any] = {"chat_template": self.chat_template, "add_bos_token": self.add_bos}
        if self.bos_token_id is not None:
            cfg["bos_token"] = self._token_text(self.bos_token_id)
        if self.eos_token_ids:
            cfg["eos_token"] = self._token_text(min(self.eos_token_ids))
        with open(folder / "tokenizer_config.json", "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2)
        with open(folder / "generation_config.json", "w", encoding="utf-8") as f:
            json.dump({"eos_token_id": sorted(self.eos_token_ids)}, f)
