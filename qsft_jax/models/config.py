"""Model configuration: `ModelConfig`, presets, Hugging Face config import, analytic size and FLOPs.

Everything here is plain Python (no JAX) so configs can be built and checked anywhere.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from qsft_jax.errors import ConfigError

FAMILIES = ("gpt2", "llama", "gemma")
ACTIVATIONS = ("gelu_new", "silu")
DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "dots_saveable", "minimal")
ROPE_SCALING_TYPES = ("llama3", "linear")
LAYER_TYPES = ("full_attention", "sliding_attention")
# Keys that saved model_config.json files of earlier versions may hold but that are not ModelConfig
# fields (how a decode step attends is the sampler's choice: qsft_jax.kernels); from_dict drops them.
REMOVED_FIELDS = ("decode_attention",)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and numerics of a decoder-only transformer.

  `family` picks the block layout: "gpt2" (learned positions, LayerNorm with bias, biases everywhere,
  gelu MLP, tied embeddings), "llama" (RMSNorm, rotary positions, grouped-query attention, SwiGLU;
  Qwen2 is "llama" with `qkv_bias=True`, Qwen3 "llama" with `qk_norm=True`) or "gemma" (Gemma 2 and 3:
  as "llama", but RMSNorm weights are (1 + scale) with scale initialised at zero, the embeddings are
  multiplied by sqrt(d_model) (in the compute dtype), the gated MLP uses `activation` "gelu_new" (HF's
  gelu_pytorch_tanh: GeGLU), and the attention and MLP outputs are normed again before the residual
  add (attn_post_norm, mlp_post_norm)).

  The fields after `init_std` are the options of the newer architectures; their defaults are off.
  """
  family: str = "llama"
  vocab_size: int = 64  # real vocabulary; the embedding table is rounded up to `padded_vocab_size`
  d_model: int = 64
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 16
  mlp_dim: int = 128
  max_position_embeddings: int = 512
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  # Llama 3.1-style frequency scaling, as sorted (key, value) pairs of HF's `rope_scaling` dict
  # (hashable so the config stays frozen); None = plain rotary.
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  tie_embeddings: bool = True
  qkv_bias: bool = False
  activation: str = "silu"
  dtype: str = "float32"  # compute dtype of activations and matmuls
  param_dtype: str = "float32"  # storage dtype of the parameters (master weights)
  scan_layers: bool = False
  remat_policy: str = "none"
  pad_vocab_multiple: int = 128
  init_std: float = 0.02  # std of the normal initialiser for kernels and embeddings
  # RMSNorm over head_dim of every query and key head, after the projection and before rotary
  # (Qwen3, Gemma 3); its weights follow the family's norm ((1 + scale) for gemma).
  qk_norm: bool = False
  # Attention scores are q.k / sqrt(query_pre_attn_scalar) (Gemma); None: q.k / sqrt(head_dim).
  query_pre_attn_scalar: float | None = None
  # Attention scores (after the scale, before the mask) become cap * tanh(scores / cap) (Gemma 2).
  attn_logit_softcap: float | None = None
  # The model's logits become cap * tanh(logits / cap) (Gemma 2); see transformer.logits_from_hidden.
  final_logit_softcap: float | None = None
  # Sliding-window attention, per layer: layer_types[i] is "full_attention" or "sliding_attention"
  # (None: every layer full). On a sliding layer a token at sequence slot i attends only to keys at
  # slots j with i - j < sliding_window (HF's convention: itself and the sliding_window - 1 before it).
  layer_types: tuple[str, ...] | None = None
  sliding_window: int | None = None
  # Rotary base of the sliding layers (Gemma 3's rope_local_base_freq), plain rotary without
  # rope_scaling, which then applies to the full layers only; None: sliding layers rotate as full ones.
  rope_local_theta: float | None = None

  def __post_init__(self):
    def check(ok, msg):
      if not ok:
        raise ValueError(f"ModelConfig: {msg}")

    check(self.family in FAMILIES, f"family={self.family!r}, expected one of {FAMILIES}")
    check(self.activation in ACTIVATIONS, f"activation={self.activation!r}, expected one of {ACTIVATIONS}")
    check(self.dtype in DTYPES, f"dtype={self.dtype!r}, expected one of {DTYPES}")
    check(self.param_dtype in DTYPES, f"param_dtype={self.param_dtype!r}, expected one of {DTYPES}")
    check(self.remat_policy in REMAT_POLICIES,
          f"remat_policy={self.remat_policy!r}, expected one of {REMAT_POLICIES}")
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                 "mlp_dim", "max_position_embeddings", "pad_vocab_multiple"):
      value = getattr(self, name)
      check(isinstance(value, int) and value > 0, f"{name}={value!r} must be a positive int")
    check(self.num_heads % self.num_kv_heads == 0,
          f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
    if self.family == "gpt2":
      check(self.num_kv_heads == self.num_heads, "gpt2 has no grouped-query attention (num_kv_heads must equal num_heads)")
      check(self.rope_scaling is None, "gpt2 has no rotary embeddings (rope_scaling must be None)")
    if self.rope_scaling is not None:
      kind = dict(self.rope_scaling).get("rope_type")
      check(kind in ROPE_SCALING_TYPES, f"rope_scaling type {kind!r} not supported (supported: {ROPE_SCALING_TYPES})")
    if self.head_dim % 2 and self.family != "gpt2":
      raise ValueError(f"ModelConfig: rotary embeddings need an even head_dim, got {self.head_dim}")
    for name in ("query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap", "rope_local_theta"):
      value = getattr(self, name)
      check(value is None or (isinstance(value, (int, float)) and value > 0),
            f"{name}={value!r} must be None or a positive number")
    if self.layer_types is not None:
      check(len(self.layer_types) == self.num_layers,
            f"layer_types has {len(self.layer_types)} entries for num_layers={self.num_layers}")
      bad = [t for t in self.layer_types if t not in LAYER_TYPES]
      check(not bad, f"layer_types entry {bad[0]!r} not supported (supported: {LAYER_TYPES})" if bad else "")
    check(self.sliding_window is None or (isinstance(self.sliding_window, int) and self.sliding_window > 0),
          f"sliding_window={self.sliding_window!r} must be None or a positive int")
    check(not any(self.sliding_layers) or self.sliding_window is not None,
          "layer_types has sliding_attention layers but sliding_window is None")
    check(self.rope_local_theta is None or any(self.sliding_layers),
          "rope_local_theta is set but no layer is a sliding_attention layer")
    if self.family == "gpt2":
      check(not (self.qk_norm or self.attn_logit_softcap or self.final_logit_softcap or self.layer_types
                 or self.query_pre_attn_scalar),
            "gpt2 has no qk_norm, query_pre_attn_scalar, soft-capping or layer_types")

  @property
  def sliding_layers(self) -> tuple[bool, ...]:
    """Per layer: whether it attends through the sliding window (num_layers entries)."""
    if self.layer_types is None:
      return (False,) * self.num_layers
    return tuple(t == "sliding_attention" for t in self.layer_types)

  @property
  def padded_vocab_size(self) -> int:
    """Embedding rows: vocab_size rounded up to a multiple of pad_vocab_multiple."""
    m = self.pad_vocab_multiple
    return -(-self.vocab_size // m) * m

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, fields: Mapping[str, Any]) -> "ModelConfig":
    """The inverse of `to_dict`, for configs read back from JSON: lists become tuples (rope_scaling)
    and the keys of REMOVED_FIELDS are dropped; any other unknown key is an error."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known - set(REMOVED_FIELDS))
    if unknown:
      raise ValueError(f"ModelConfig: unknown fields {unknown}")
    deep_tuple = lambda v: tuple(deep_tuple(x) for x in v) if isinstance(v, list) else v
    return cls(**{k: deep_tuple(v) for k, v in fields.items() if k in known})


_PRESETS: dict[str, ModelConfig] = {
    # A few hundred thousand params (~0.31M / ~0.48M), for tests and CPU runs with a character vocabulary.
    "tiny-llama": ModelConfig(
        family="llama", vocab_size=64, d_model=128, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=32, mlp_dim=256, max_position_embeddings=512, pad_vocab_multiple=128),
    "tiny-gpt2": ModelConfig(
        family="gpt2", vocab_size=64, d_model=128, num_layers=2, num_heads=4, num_kv_heads=4,
        head_dim=32, mlp_dim=512, max_position_embeddings=512, activation="gelu_new",
        qkv_bias=True, pad_vocab_multiple=128),
    "smollm2-135m": ModelConfig(
        family="llama", vocab_size=49152, d_model=576, num_layers=30, num_heads=9, num_kv_heads=3,
        head_dim=64, mlp_dim=1536, max_position_embeddings=8192, rope_theta=100000.0,
        tie_embeddings=True),
    "smollm2-1.7b": ModelConfig(
        family="llama", vocab_size=49152, d_model=2048, num_layers=24, num_heads=32,
        num_kv_heads=32, head_dim=64, mlp_dim=8192, max_position_embeddings=8192,
        rope_theta=130000.0, tie_embeddings=True),
    "llama3-8b": ModelConfig(
        family="llama", vocab_size=128256, d_model=4096, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, mlp_dim=14336, max_position_embeddings=8192,
        rope_theta=500000.0, tie_embeddings=False, dtype="bfloat16", scan_layers=True),
    "llama-70b": ModelConfig(
        family="llama", vocab_size=128256, d_model=8192, num_layers=80, num_heads=64,
        num_kv_heads=8, head_dim=128, mlp_dim=28672, max_position_embeddings=8192,
        rope_theta=500000.0, tie_embeddings=False, dtype="bfloat16", scan_layers=True,
        remat_policy="full"),
    "gpt2-small": ModelConfig(
        family="gpt2", vocab_size=50257, d_model=768, num_layers=12, num_heads=12,
        num_kv_heads=12, head_dim=64, mlp_dim=3072, max_position_embeddings=1024,
        activation="gelu_new", qkv_bias=True, tie_embeddings=True),
}


def preset_names() -> tuple[str, ...]:
  return tuple(_PRESETS)


def get_preset(name: str, **overrides) -> ModelConfig:
  """A named preset, optionally with fields replaced (`get_preset("tiny-llama", vocab_size=40)`).

  An unknown name or field is a ConfigError (a ValueError) naming it and what is known.
  """
  if name not in _PRESETS:
    raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(_PRESETS)}")
  unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)})
  if unknown:
    raise ConfigError(f"ModelConfig has no field {unknown[0]!r} (overriding preset {name!r}); its fields: "
                      f"{', '.join(f.name for f in dataclasses.fields(ModelConfig))}")
  return _PRESETS[name].replace(**overrides)


def _rope(params: Mapping[str, Any], default_theta: float) -> tuple[float, tuple | None]:
  """(rope_theta, rope_scaling) from one HF rope dict {"rope_type", "rope_theta", scaling fields...}
  (its legacy spelling {"type", ...} too)."""
  scaling = dict(params)
  theta = float(scaling.pop("rope_theta", default_theta))
  rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
  return theta, None if rope_type == "default" else tuple(sorted({**scaling, "rope_type": rope_type}.items()))


def _hf_layer_types(hf: Mapping[str, Any], model_type: str, num_layers: int,
                    default: list[str] | None) -> tuple[str, ...] | None:
  """HF's layer_types list (or `default` when the config.json has none) as a tuple; None if all full."""
  layer_types = hf.get("layer_types") or default
  if not layer_types:
    return None
  if len(layer_types) != num_layers:
    raise ValueError(f"HF config (model_type={model_type!r}): layer_types has {len(layer_types)} entries "
                     f"for num_hidden_layers={num_layers}")
  bad = [t for t in layer_types if t not in LAYER_TYPES]
  if bad:
    raise ValueError(f"HF config (model_type={model_type!r}): layer_types entry {bad[0]!r} not supported "
                     f"(supported: {LAYER_TYPES})")
  return tuple(layer_types) if "sliding_attention" in layer_types else None


# transformers' class defaults of the Gemma configs, for the fields a config.json may leave out (the
# text_config of a Hub gemma3 checkpoint often holds only the fields that differ from these).
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma2": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
                   rms_norm_eps=1e-6, tie_word_embeddings=True, query_pre_attn_scalar=256, sliding_window=4096,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0, rope_theta=10_000.0),
    "gemma3_text": dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                        max_position_embeddings=131072, rms_norm_eps=1e-6, tie_word_embeddings=True,
                        query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=None,
                        attn_logit_softcapping=None),
}


def from_hf_config(hf: Mapping[str, Any], **overrides) -> ModelConfig:
  """ModelConfig from a Hugging Face config.json dict (model_type gpt2, llama, qwen2, mistral, qwen3,
  gemma2, gemma3_text, or gemma3 whose text_config is a gemma3_text model).

  An option of the HF config that the model does not implement is a ValueError naming the field.
  `overrides` replace fields afterwards (e.g. dtype, scan_layers, remat_policy).
  """
  model_type = hf.get("model_type")
  if model_type == "gemma3":
    text = hf.get("text_config")
    if not isinstance(text, Mapping):
      raise ValueError("HF config (model_type='gemma3'): missing field 'text_config'")
    return from_hf_config({**text, "model_type": "gemma3_text"}, **overrides)
  hf = {**_HF_DEFAULTS.get(model_type, {}), **hf}

  def need(key):
    if key not in hf:
      raise ValueError(f"HF config (model_type={model_type!r}): missing field {key!r}")
    return hf[key]

  def refuse(key, why):
    raise ValueError(f"HF config (model_type={model_type!r}): {key}={hf.get(key)!r} is not supported ({why})")

  if model_type == "gpt2":
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
      raise ValueError(f"HF config: gpt2 activation_function={act!r} not supported (gelu_new only)")
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
      raise ValueError("HF config: gpt2 with non-standard attention scaling is not supported")
    d_model, heads = need("n_embd"), need("n_head")
    config = ModelConfig(
        family="gpt2", vocab_size=need("vocab_size"), d_model=d_model,
        num_layers=need("n_layer"), num_heads=heads, num_kv_heads=heads, head_dim=d_model // heads,
        mlp_dim=hf.get("n_inner") or 4 * d_model, max_position_embeddings=need("n_positions"),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), activation="gelu_new", qkv_bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True))
  elif model_type in ("llama", "qwen2", "mistral", "qwen3"):
    act = hf.get("hidden_act", "silu")
    if act != "silu":
      raise ValueError(f"HF config: hidden_act={act!r} not supported (silu only)")
    d_model, heads = need("hidden_size"), need("num_attention_heads")
    head_dim = hf.get("head_dim") or d_model // heads
    # Old config.json files carry rope_theta / rope_scaling at top level; transformers 5 writes
    # them together as rope_parameters = {"rope_type", "rope_theta", scaling fields...}.
    rope_params = dict(hf.get("rope_parameters") or {})
    rope_theta = hf.get("rope_theta", rope_params.get("rope_theta", 10000.0))
    scaling = dict(hf.get("rope_scaling") or {}) or {
        k: v for k, v in rope_params.items() if k != "rope_theta"}
    _, rope_scaling = _rope(scaling, rope_theta)
    if model_type == "qwen2":
      qkv_bias = True
    else:
      qkv_bias = bool(hf.get("attention_bias", False))
    layer_types, sliding_window = None, None
    if model_type == "qwen3":
      if qkv_bias:
        refuse("attention_bias", "Qwen3's o_proj bias is not implemented")
      if hf.get("use_sliding_window", False) and hf.get("sliding_window") is not None:
        sliding_window = int(hf["sliding_window"])
        num_layers, first = need("num_hidden_layers"), hf.get("max_window_layers", 28)
        layer_types = _hf_layer_types(hf, model_type, num_layers, [
            "sliding_attention" if i >= first else "full_attention" for i in range(num_layers)])
        if layer_types is None:
          sliding_window = None
    elif hf.get("use_sliding_window", model_type == "mistral" and hf.get("sliding_window") is not None):
      raise ValueError(f"HF config: sliding-window attention (sliding_window={hf.get('sliding_window')}) "
                       "is not supported")
    if hf.get("mlp_bias", False):
      raise ValueError("HF config: mlp_bias=True is not supported")
    config = ModelConfig(
        family="llama", vocab_size=need("vocab_size"), d_model=d_model,
        num_layers=need("num_hidden_layers"), num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim,
        mlp_dim=need("intermediate_size"),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(rope_theta),
        rope_scaling=rope_scaling, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias, activation="silu", qk_norm=model_type == "qwen3",
        layer_types=layer_types, sliding_window=sliding_window)
  elif model_type in ("gemma2", "gemma3_text"):
    gemma3 = model_type == "gemma3_text"
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh":
      raise ValueError(f"HF config (model_type={model_type!r}): hidden_activation={act!r} not supported "
                       "(gelu_pytorch_tanh only)")
    if hf.get("attention_bias", False):
      refuse("attention_bias", "q/k/v/o biases are not implemented for gemma")
    if hf.get("use_bidirectional_attention"):
      refuse("use_bidirectional_attention", "the model is causal")
    if gemma3 and hf.get("attn_logit_softcapping") is not None:
      refuse("attn_logit_softcapping", "transformers' Gemma 3 attention does not apply it")
    d_model, heads = need("hidden_size"), need("num_attention_heads")
    num_layers = need("num_hidden_layers")
    # transformers 5 writes rope_parameters (for gemma3_text one dict per layer type); older
    # config.json files carry rope_theta, rope_scaling and rope_local_base_freq at top level.
    rope_params = dict(hf.get("rope_parameters") or {})
    if gemma3:
      if "full_attention" in rope_params:
        full, local = dict(rope_params["full_attention"]), dict(rope_params.get("sliding_attention") or {})
      else:
        full = {"rope_theta": hf.get("rope_theta", 1_000_000.0), **dict(hf.get("rope_scaling") or {})}
        local = {"rope_theta": hf.get("rope_local_base_freq", 10_000.0)}
      rope_theta, rope_scaling = _rope(full, 1_000_000.0)
      rope_local_theta, local_scaling = _rope(local, 10_000.0)
      if local_scaling is not None:
        raise ValueError(f"HF config (model_type={model_type!r}): rope scaling of the sliding_attention "
                         f"layers ({dict(local_scaling)}) is not supported")
      pattern = hf.get("sliding_window_pattern", 6)
      default_types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                       for i in range(num_layers)]
    else:
      if not rope_params:
        rope_params = {"rope_theta": hf.get("rope_theta", 10_000.0), **dict(hf.get("rope_scaling") or {})}
      rope_theta, rope_scaling = _rope(rope_params, 10_000.0)
      rope_local_theta = None
      default_types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)]
    sliding_window = hf.get("sliding_window", 4096)
    layer_types = _hf_layer_types(hf, model_type, num_layers, default_types) if sliding_window else None
    if layer_types is None:
      sliding_window = rope_local_theta = None
    config = ModelConfig(
        family="gemma", vocab_size=need("vocab_size"), d_model=d_model, num_layers=num_layers,
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or d_model // heads, mlp_dim=need("intermediate_size"),
        max_position_embeddings=hf.get("max_position_embeddings", 8192),
        norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=rope_theta, rope_scaling=rope_scaling,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)), activation="gelu_new",
        qk_norm=gemma3, query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
        attn_logit_softcap=hf.get("attn_logit_softcapping"),
        final_logit_softcap=hf.get("final_logit_softcapping"),
        layer_types=layer_types, sliding_window=None if sliding_window is None else int(sliding_window),
        rope_local_theta=rope_local_theta)
  else:
    raise ValueError(f"HF config: model_type={model_type!r} not supported (gpt2, llama, qwen2, mistral, "
                     "qwen3, gemma2, gemma3_text, gemma3)")
  return config.replace(**overrides)


def layer_param_count(config: ModelConfig) -> int:
  """Parameters of one transformer block (kernels, biases, norms)."""
  c = config
  q = c.d_model * c.num_heads * c.head_dim
  kv = 2 * c.d_model * c.num_kv_heads * c.head_dim
  o = c.num_heads * c.head_dim * c.d_model
  gpt2 = c.family == "gpt2"
  mlp = (2 if gpt2 else 3) * c.d_model * c.mlp_dim
  norms = 2 * c.d_model * (2 if gpt2 or c.family == "gemma" else 1)  # gpt2: + biases; gemma: post norms
  if c.qk_norm:
    norms += 2 * c.head_dim
  biases = 0
  if gpt2 or c.qkv_bias:
    biases += (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
  if gpt2:
    biases += c.d_model + c.mlp_dim + c.d_model  # o, up, down
  return q + kv + o + mlp + norms + biases


def param_count(config: ModelConfig) -> int:
  """Total parameters of `Transformer(config)`, padded vocabulary rows included."""
  c = config
  embed = c.padded_vocab_size * c.d_model
  pos = c.max_position_embeddings * c.d_model if c.family == "gpt2" else 0
  final_norm = c.d_model * (2 if c.family == "gpt2" else 1)
  lm_head = 0 if c.tie_embeddings else c.d_model * c.padded_vocab_size
  return embed + pos + c.num_layers * layer_param_count(config) + final_norm + lm_head


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
  """Analytic forward-pass FLOPs per token (training costs about 3x this).

    2 * (matmul weights per token)  +  num_layers * 2 * 2 * seq_len * (num_heads * head_dim)

  Matmul weights: every attention/MLP kernel plus the unembedding [d_model, padded_vocab_size]
  (the padded columns are computed too); the embedding lookup is a gather and costs nothing.
  Attention: q.k scores and the probability-weighted sum of values, each 2 * seq_len * H * Dh per
  token, counted over the full (non-causal) length as in the PaLM/MaxText MFU convention; sliding
  layers too (the model computes their scores in full and masks those outside the window). Norms,
  soft-capping and the q/k norms are elementwise and not counted.
  """
  c = config
  per_layer = (c.d_model * c.num_heads * c.head_dim  # q
               + 2 * c.d_model * c.num_kv_heads * c.head_dim  # k, v
               + c.num_heads * c.head_dim * c.d_model  # o
               + (2 if c.family == "gpt2" else 3) * c.d_model * c.mlp_dim)
  matmul_params = c.num_layers * per_layer + c.d_model * c.padded_vocab_size
  attention = c.num_layers * 2 * 2 * seq_len * c.num_heads * c.head_dim
  return float(2 * matmul_params + attention)
