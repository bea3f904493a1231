"""`python -m qsft_jax.export`: the exported folders against transformers and PEFT (PyTorch), the
extraction record against the run's config, the refusals, two processes, a gs:// --out.

Relative error := max |ours - ref| / max |ref| (as in test_golden.py); bar < 1e-4 in float32.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is the reference for exported folders (test-only dependency)")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from qsft_jax import checkpoints, cli, export  # noqa: E402
from qsft_jax import run as run_lib  # noqa: E402
from qsft_jax.models import weights  # noqa: E402
from qsft_jax.models.transformer import Transformer, stack_layers  # noqa: E402
from qsft_jax.tokenizers import CharTokenizer  # noqa: E402
from test_analysis import make_workdir  # noqa: E402
from test_weights import CONFIGS, random_params, relative_error  # noqa: E402
import trainer_utils as tu  # noqa: E402

MAX_REL_ERR = 1e-4
PROG = "python -m qsft_jax.export"
# The evaluation results the fixture's workdir holds: Q-SFT's best mean return is at beta 4.
RESULTS = {"env": "maze", "episodes": 8, "policies": {
    "bc": {"mean_return": -9.0, "beta": 0.0}, "qsft_beta1": {"mean_return": -7.0, "beta": 1.0},
    "qsft_beta4": {"mean_return": -5.0, "beta": 4.0}, "qsft_beta16": {"mean_return": -6.0, "beta": 16.0},
    "ratio": {"mean_return": -8.0, "beta": None}, "control_beta1": {"mean_return": -6.5, "beta": 1.0},
    "control_beta4": {"mean_return": -7.5, "beta": 4.0}, "control_ratio": {"mean_return": -8.5, "beta": None}}}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """make_workdir's run, with a second Q-SFT checkpoint (step 2: another theta, and a phi2 read as
  phi from it) as the final one, a control phase (step 2, its own theta) and evaluation results.
  The step-2 sets have larger weights than an initialisation, so that they differ visibly."""
  path = str(tmp_path_factory.mktemp("run"))
  made = make_workdir(path, steps=2)
  made["config"].phases = ("bc", "qsft", "control")
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(made["config"].to_dict(), f)
  phi2, theta2, control = ({"params": random_params(made["model_config"], seed)} for seed in (2, 3, 5))
  for phase, theta in (("qsft", theta2), ("control", control)):
    manager = checkpoints.make_manager(path, phase, made["config"])
    checkpoints.save(manager, 2, {"step": 2, "params": theta, "target_params": theta,
                                  "behaviour_params": phi2})
    manager.wait_until_finished()
    manager.close()
    checkpoints.mark_done(path, phase, 2)
  os.rename(os.path.join(path, "bc", "checkpoints", "1"), os.path.join(path, "bc", "checkpoints", "2"))
  checkpoints.mark_done(path, "bc", 2)
  os.makedirs(os.path.join(path, "eval"))
  with open(os.path.join(path, "eval", "results.json"), "w") as f:
    json.dump(RESULTS, f)
  return path, dict(made, phi2=phi2, theta2=theta2, control=control)


@pytest.fixture(scope="module")
def exported(workdir, tmp_path_factory):
  path, _ = workdir
  out = str(tmp_path_factory.mktemp("export") / "out")
  assert export.main(["export", f"--workdir={path}", f"--out={out}", "--max_shard_size=20KB"]) == 0
  return out


def our_logits(model_config, params, ids):
  positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape)
  logits = jax.jit(Transformer(model_config).apply)(params, ids, positions, np.ones_like(ids))
  return np.asarray(logits)[..., :model_config.vocab_size]


def torch_logits(model, ids):
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(ids.astype(np.int64))).logits.numpy()


def load_model(folder):
  return transformers.AutoModelForCausalLM.from_pretrained(
      str(folder), dtype=torch.float32, attn_implementation="eager").eval()


def token_ids(tokenizer, texts):
  rows = [[tokenizer.bos_id] + tokenizer.encode(t) for t in texts]
  return np.array([r[:min(map(len, rows))] for r in rows], np.int32)


TEXTS = ["Maze. Reach G. Moves: u d l r.\n#,0,1\n", "u\nd\nr\nMaze 12, 3.\n"]


# ------------------------------------------------------------------------------------------------
# The run's policy in transformers


@pytest.mark.parametrize("name", ["phi", "theta"])
def test_exported_folders_give_our_logits_in_transformers(workdir, exported, name):
  path, made = workdir
  params = {"phi": made["phi2"], "theta": made["theta2"]}[name]  # the final checkpoint's
  folder = os.path.join(exported, name)
  index = json.load(open(os.path.join(folder, weights.SAFETENSORS_INDEX)))
  assert len(set(index["weight_map"].values())) > 2  # 20KB shards: the index is what loads
  sizes = {}
  for file in set(index["weight_map"].values()):
    tensors = load_file(os.path.join(folder, file))
    assert all(index["weight_map"][k] == file for k in tensors)
    sizes[file] = [t.nbytes for t in tensors.values()]
  assert all(sum(s) <= 20_000 or len(s) == 1 for s in sizes.values()), sizes
  assert index["metadata"]["total_size"] == sum(map(sum, sizes.values()))
  assert not os.path.exists(os.path.join(folder, "model.safetensors"))
  ids = token_ids(made["tokenizer"], TEXTS)
  ref = torch_logits(load_model(folder), ids)
  err = relative_error(our_logits(made["model_config"], params, ids), ref)
  assert err < MAX_REL_ERR, f"{name}: relative error {err:.2e}"


def test_parse_size():
  assert weights.parse_size("2GB") == 2 * 10**9 and weights.parse_size("1GiB") == 2**30
  assert weights.parse_size("20KB") == 20_000 and weights.parse_size("1.5MB") == 1_500_000
  assert weights.parse_size(123) == weights.parse_size("123") == 123
  for bad in ("big", "-1GB", "0", "2 GBs"):
    with pytest.raises(ValueError):
      weights.parse_size(bad)


def test_the_tokenizer_files_encode_as_the_runs_char_tokenizer(workdir, exported):
  _, made = workdir
  hf = transformers.AutoTokenizer.from_pretrained(os.path.join(exported, "theta"))
  text = "Maze. Reach G.\n  #,0 1\n?Z"  # "?" and "Z" lie outside the alphabet: unk
  ids = hf(text, add_special_tokens=False)["input_ids"]
  assert ids == made["tokenizer"].encode(text) and CharTokenizer.UNK in ids
  assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)
  assert hf.decode(made["tokenizer"].encode("u d\nr")) == "u d\nr"


def test_one_file_below_the_size_limit_and_an_older_step(workdir, tmp_path):
  path, made = workdir
  out = str(tmp_path / "out")
  assert export.main(["export", f"--workdir={path}", f"--out={out}", "--step=1"]) == 0
  assert sorted(os.listdir(os.path.join(out, "theta"))) == [
      "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
  ids = token_ids(made["tokenizer"], TEXTS)
  ref = torch_logits(load_model(os.path.join(out, "theta")), ids)
  assert relative_error(our_logits(made["model_config"], made["theta"], ids), ref) < MAX_REL_ERR
  assert json.load(open(os.path.join(out, "extraction.json")))["checkpoint_steps"] == {"phi": 2, "theta": 1}


def test_the_controls_theta_and_beta(workdir, tmp_path):
  path, made = workdir
  out = str(tmp_path / "out")
  assert export.main(["export", f"--workdir={path}", f"--out={out}", "--phase=control"]) == 0
  record = json.load(open(os.path.join(out, "extraction.json")))
  assert record["phase"] == "control" and record["beta"] == 1.0  # the control's best, not Q-SFT's 4
  assert record["evaluation"] == {"bc": -9.0, "control_beta1": -6.5, "control_beta4": -7.5, "control_ratio": -8.5}
  got = load_file(os.path.join(out, "theta", "model.safetensors"))
  want = weights.hf_tensors(made["control"], made["model_config"])
  assert got.keys() == want.keys()
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


# ------------------------------------------------------------------------------------------------
# extraction.json


def test_extraction_record_holds_the_runs_settings(workdir, exported):
  path, made = workdir
  config = made["config"]
  record = json.load(open(os.path.join(exported, "extraction.json")))
  assert record["beta"] == 4.0 and "results.json" in record["beta_source"]  # the best of RESULTS
  assert record["betas"] == list(config.eval.betas)
  assert record["evaluation"] == {"bc": -9.0, "qsft_beta1": -7.0, "qsft_beta4": -5.0, "qsft_beta16": -6.0,
                                  "ratio": -8.0}
  assert record["support_min"] == config.qsft.support_min
  assert record["dummy_token"] is None and config.qsft.dummy_token == -1
  assert record["max_new_tokens"] == config.eval.max_new_tokens
  assert record["stop"]["strings"] == ["\n"]
  assert record["stop"]["token_ids"] == [made["tokenizer"].encode("\n")[0]]
  assert record["suppressed_token_ids"] == [0, 1, 2]
  assert record["tokenizer"]["spec"] == "char" and record["tokenizer"]["alphabet"] == made["tokenizer"].alphabet
  assert record["vocab_size"] == made["model_config"].vocab_size
  assert record["checkpoint_steps"] == {"phi": 2, "theta": 2} and record["phase"] == "qsft"
  assert "exp(beta * p_theta" in record["policy"] and "docs/algorithm.md" in record["reference"]
  assert record["lora"] is None
  assert record["prompt"]["observation_template"] == config.data.get("observation_template", "{text}")


def test_the_records_token_ids_mean_the_same_in_the_exported_tokenizer(exported):
  """The stop and suppressed ids of extraction.json, read through the exported tokenizer alone."""
  record = json.load(open(os.path.join(exported, "extraction.json")))
  hf = transformers.AutoTokenizer.from_pretrained(os.path.join(exported, record["theta"]))
  assert all("\n" in hf.decode([i]) for i in record["stop"]["token_ids"])
  assert hf("\n", add_special_tokens=False)["input_ids"] == record["stop"]["token_ids"]
  assert record["suppressed_token_ids"] == sorted({hf.pad_token_id, hf.bos_token_id, hf.eos_token_id})
  assert len(hf) == record["vocab_size"] == record["tokenizer"]["vocab_size"]


# ------------------------------------------------------------------------------------------------
# Refusals: one line each


def run_cli(argv, capsys):
  capsys.readouterr()
  with pytest.raises(SystemExit) as exit_:
    cli.run(export.main, ["export", *argv])
  err = capsys.readouterr().err
  return exit_.value.code, err


def test_bad_input_is_one_line(workdir, exported, tmp_path, capsys):
  path, _ = workdir
  unfinished = str(tmp_path / "unfinished")
  shutil.copytree(path, unfinished)
  os.remove(os.path.join(unfinished, "qsft", "DONE"))
  no_control = str(tmp_path / "no_control")
  shutil.copytree(path, no_control, ignore=shutil.ignore_patterns("control"))
  config = json.load(open(os.path.join(no_control, "config.json")))
  config["phases"] = ["bc", "qsft"]
  json.dump(config, open(os.path.join(no_control, "config.json"), "w"))
  nonempty = tmp_path / "full"
  nonempty.mkdir()
  (nonempty / "notes.txt").write_text("mine")
  cases = [
      ([f"--workdir={tmp_path}/none", f"--out={tmp_path}/o1"], 2, "--workdir=", "no such directory"),
      ([f"--workdir={path}", f"--out={path}/export"], 2, "is inside --workdir", ""),
      ([f"--workdir={path}", f"--out={nonempty}"], 2, "exists and is not empty", "--overwrite"),
      ([f"--workdir={path}", f"--out={nonempty}/notes.txt", "--overwrite"], 2, "is a file", ""),
      ([f"--workdir={path}", f"--out={tmp_path}/o2", "--step=7"], 2, "--step=7", "steps: 1, 2"),
      ([f"--workdir={path}", f"--out={tmp_path}/o3", "--max_shard_size=big"], 2, "--max_shard_size", ""),
      ([f"--workdir={no_control}", f"--out={tmp_path}/o4", "--phase=control"], 1, "no 'control' phase", ""),
      ([f"--workdir={unfinished}", f"--out={tmp_path}/o5"], 1, "unfinished phases: qsft",
       "--allow_unfinished"),
  ]
  for argv, code, *fragments in cases:
    got, err = run_cli(argv, capsys)
    assert got == code and err.count("\n") == 1 and err.startswith(f"FATAL: {PROG}: "), (argv, err)
    assert all(f in err for f in fragments), (argv, err)
  assert not os.path.exists(f"{tmp_path}/o5")
  assert export.main(["export", f"--workdir={unfinished}", f"--out={tmp_path}/o5",
                      "--allow_unfinished"]) == 0
  # --overwrite replaces this program's entries and keeps the rest
  assert export.main(["export", f"--workdir={path}", f"--out={nonempty}", "--overwrite"]) == 0
  assert sorted(os.listdir(nonempty)) == ["extraction.json", "notes.txt", "phi", "theta"]


# ------------------------------------------------------------------------------------------------
# LoRA adapters in PEFT's format, from the model's own adapter variables


def lora_model(name, scan, rank=4):
  """(config, LoraConfig, base params, adapters): Transformer(config, lora=...)'s variables with random
  values (B too, so the adapters change the logits). GPT-2 adapts q and v of its fused c_attn (k's
  block stays zero), attn.c_proj and mlp.c_fc, not mlp.c_proj."""
  import flax.linen as nn
  from qsft_jax.models.lora import LoraConfig
  config = CONFIGS[name].replace(scan_layers=scan)
  targets = ("attn/(q|v|o)$", "mlp/up$") if name == "gpt2" else ("attn/(q|k|v|o)$", "mlp/(gate|up|down)$")
  lora = LoraConfig(rank=rank, alpha=8.0, targets=targets, base_dtype="")
  d = np.zeros((1, 1), np.int32)
  shapes = nn.unbox(jax.eval_shape(lambda: Transformer(config, lora=lora).init(jax.random.key(0), d, d, d + 1)))
  rng = np.random.default_rng(4)
  draw = lambda scale: lambda x: (scale * rng.standard_normal(x.shape)).astype(np.float32)
  return config, lora, jax.tree.map(draw(0.1), shapes["params"]), jax.tree.map(draw(0.2), shapes["lora"])


@pytest.mark.parametrize("name,scan", [("gpt2", False)])  # llama (scanned): the LoRA run below
def test_peft_adapter_and_merged_folder_give_our_lora_models_logits(name, scan, tmp_path):
  """Our unmerged LoRA forward = PEFT with the exported adapter on the exported base = transformers
  on the exported merged folder; the merged folder's tensors are the base's plus
  scaling * lora_B @ lora_A of the adapter file (numpy, file against file)."""
  peft = pytest.importorskip("peft")
  from qsft_jax.models import lora as lora_lib
  config, lora, base, adapters = lora_model(name, scan)
  ids = np.random.default_rng(1).integers(0, config.vocab_size, (2, 12)).astype(np.int32)
  positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape)
  ours = np.asarray(jax.jit(Transformer(config, lora=lora).apply)(
      {"params": base, "lora": adapters}, ids, positions, np.ones_like(ids)))[..., :config.vocab_size]
  weights.export_hf_folder(base, config, tmp_path / "base")
  merged = lora_lib.merge({"params": base, "lora": adapters}, config, lora)
  weights.export_hf_folder(merged, config, tmp_path / "merged")
  export.export_adapter({"lora": adapters}, config, lora, str(tmp_path / "adapter"), "hf:base")
  adapter_config = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
  assert adapter_config["peft_type"] == "LORA" and adapter_config["task_type"] == "CAUSAL_LM"
  assert (adapter_config["r"], adapter_config["lora_alpha"]) == (lora.rank, lora.alpha)

  model = peft.PeftModel.from_pretrained(load_model(tmp_path / "base"), str(tmp_path / "adapter")).eval()
  adapted = [n for n, _ in model.named_modules() if n.endswith("lora_A.default")]
  per_layer = 3 if name == "gpt2" else 7  # gpt2: c_attn, attn.c_proj, mlp.c_fc
  assert len(adapted) == per_layer * config.num_layers, adapted
  for what, folder_model in (("PEFT on the base", model), ("the merged folder", load_model(tmp_path / "merged"))):
    err = relative_error(ours, torch_logits(folder_model, ids))
    assert err < MAX_REL_ERR, f"{name}: {what}: relative error {err:.2e}"
  assert relative_error(ours, torch_logits(load_model(tmp_path / "base"), ids)) > 100 * MAX_REL_ERR

  base_t = load_file(str(tmp_path / "base" / "model.safetensors"))
  merged_t = load_file(str(tmp_path / "merged" / "model.safetensors"))
  lora_t = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
  changed = set()
  for key in lora_t:
    if key.endswith("lora_A.weight"):
      module = key[len(weights.PEFT_PREFIX):-len(".lora_A.weight")]
      a, b = lora_t[key], lora_t[key.replace("lora_A", "lora_B")]
      delta = lora.scale * (b @ a)  # [out, in]
      if name == "gpt2":
        delta = delta.T  # Conv1D stores [in, out]
      np.testing.assert_allclose(merged_t[module + ".weight"], base_t[module + ".weight"] + delta,
                                 rtol=1e-5, atol=1e-6, err_msg=module)
      changed.add(module + ".weight")
  for key in base_t.keys() - changed:
    np.testing.assert_array_equal(merged_t[key], base_t[key], err_msg=key)


def test_scanned_adapters_give_the_same_peft_tensors():
  from qsft_jax.models.transformer import unstack_layers
  config, _, _, adapters = lora_model("llama", True, rank=2)
  scanned, ranks = weights.hf_adapter_tensors({"lora": adapters}, config)
  plain, _ = weights.hf_adapter_tensors(unstack_layers(adapters), config.replace(scan_layers=False))
  assert plain.keys() == scanned.keys() and set(ranks.values()) == {2}
  for key in plain:
    np.testing.assert_array_equal(plain[key], scanned[key], err_msg=key)
  assert "base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight" in plain
  assert plain["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"].shape == (2, config.d_model)
  assert plain["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (
      config.num_heads * config.head_dim, 2)
  down_a = adapters["layers"]["mlp"]["down"]["lora_a"][1]  # layer 1's A [F, r]
  np.testing.assert_array_equal(plain["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"], down_a.T)


def test_target_modules():
  names = [f"model.layers.{i}.{m}" for i in range(3) for m in ("self_attn.q_proj", "mlp.up_proj")]
  assert export.peft_target_modules(names) == ["mlp.up_proj", "self_attn.q_proj"]
  assert export.peft_target_modules(names[:3]) == sorted(names[:3])  # mlp.up_proj of layer 1 only


def make_lora_workdir(path: str) -> dict:
  """A finished LoRA run (rank 4 over a bfloat16 base read from an HF folder, model.init "hf:...",
  scanned layers)
  laid out as the trainer writes it: adapter-only checkpoints with the base's record, bc at step 1,
  qsft at steps 1 and 2 (random nonzero adapters, so that each set differs from the base)."""
  import flax.linen as nn
  from test_analysis import ALPHABET
  from qsft_jax import config_lib, sharding
  from qsft_jax.models import lora as lora_lib
  tokenizer = CharTokenizer(ALPHABET)
  model_config = CONFIGS["llama"].replace(vocab_size=tokenizer.vocab_size, scan_layers=True)
  pretrained = os.path.join(os.path.dirname(path), "pretrained")
  weights.export_hf_folder(random_params(model_config.replace(scan_layers=False)), model_config, pretrained)
  config = config_lib.base_config()
  config.task = "maze"
  config.data.reward_transform = "terminal_return:-20,0"
  config.model.init = f"hf:{pretrained}"
  config.model.overrides = {"scan_layers": True}
  config.model.lora.rank, config.model.lora.alpha = 4, 8.0
  config.bc.steps, config.qsft.steps = 1, 2
  config.checkpoint.async_save = False
  os.makedirs(path)
  json.dump(config.to_dict(), open(os.path.join(path, "config.json"), "w"))
  tokenizer.save(os.path.join(path, "tokenizer.json"))
  run_lib.save_model_config(path, model_config)
  lora = lora_lib.LoraConfig.from_config(config.model.lora)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  base = run_lib.lora_base(config, model_config, lora, mesh, tuple(config.mesh.rules))
  record = lora_lib.base_record(base, config.model.init, lora)
  rng = np.random.default_rng(7)
  shapes = nn.unbox(lora_lib.abstract_variables(model_config, lora))["lora"]
  phi, theta1, theta2 = ({"lora": jax.tree.map(lambda x: (0.3 * rng.standard_normal(x.shape)).astype(np.float32),
                                               shapes)} for _ in range(3))
  for phase, step, state in (("bc", 1, {"step": 1, "params": phi}),
                             ("qsft", 1, {"step": 1, "params": theta1, "target_params": theta1,
                                          "behaviour_params": phi}),
                             ("qsft", 2, {"step": 2, "params": theta2, "target_params": theta2,
                                          "behaviour_params": phi})):
    manager = checkpoints.make_manager(path, phase, config)
    checkpoints.save(manager, step, state, base_record=record)
    manager.wait_until_finished()
    manager.close()
    checkpoints.mark_done(path, phase, step)
  return dict(config=config, lora=lora, model_config=model_config, tokenizer=tokenizer, base=base,
              theta1=theta1, pretrained=pretrained)


def test_a_lora_run_exports_merged_folders_peft_adapters_and_its_base(tmp_path):
  """A LoRA run, theta of --step=1: transformers on theta/ (merged), PEFT on base/ + theta_adapter/,
  and our unmerged forward over the run's base give the same logits; the base/ folder is the base."""
  peft = pytest.importorskip("peft")
  path, out = str(tmp_path / "run"), str(tmp_path / "out")
  made = make_lora_workdir(path)
  assert export.main(["export", f"--workdir={path}", f"--out={out}", "--step=1"]) == 0
  assert sorted(os.listdir(out)) == ["base", "extraction.json", "phi", "phi_adapter", "theta", "theta_adapter"]
  variables = {"params": made["base"]["params"], "lora": made["theta1"]["lora"]}
  config, lora = made["model_config"], made["lora"]
  ids = token_ids(made["tokenizer"], TEXTS)
  positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape)
  ours = np.asarray(jax.jit(Transformer(config, lora=lora).apply)(variables, ids, positions, np.ones_like(ids)))
  ours = ours[..., :config.vocab_size]
  merged = load_model(os.path.join(out, "theta"))
  with_adapter = peft.PeftModel.from_pretrained(load_model(os.path.join(out, "base")),
                                                os.path.join(out, "theta_adapter")).eval()
  for what, model in (("merged theta/", merged), ("PEFT on base/", with_adapter)):
    err = relative_error(ours, torch_logits(model, ids))
    assert err < MAX_REL_ERR, f"{what}: relative error {err:.2e}"
  assert relative_error(ours, torch_logits(load_model(os.path.join(out, "base")), ids)) > 100 * MAX_REL_ERR
  assert json.load(open(os.path.join(out, "theta", "config.json")))["dtype"] == "float32"
  base_files = load_file(os.path.join(out, "base", "model.safetensors"))
  want = weights.hf_tensors(made["base"], config)
  for key in want:
    assert base_files[key].dtype == want[key].dtype == np.dtype("bfloat16")
    np.testing.assert_array_equal(base_files[key], want[key], err_msg=key)
  adapter_config = json.load(open(os.path.join(out, "theta_adapter", "adapter_config.json")))
  assert adapter_config["base_model_name_or_path"] == made["pretrained"] and adapter_config["r"] == 4
  record = json.load(open(os.path.join(out, "extraction.json")))
  assert record["checkpoint_steps"] == {"phi": 1, "theta": 1}
  assert record["lora"]["scale"] == 2.0 and record["lora"]["base_folder"] == "base"
  assert record["lora"]["base_dtype"] == "bfloat16"


# ------------------------------------------------------------------------------------------------
# Two processes


def test_two_processes_export_what_one_does(workdir, exported, tmp_path):
  """Two processes under jax.distributed (2 x 4 CPU devices, gloo) load the run sharded over all 8
  devices, gather each array and write from process 0 alone: the same files as one process."""
  from test_multiprocess import free_port
  path, _ = workdir
  out = str(tmp_path / "out")
  port = free_port()
  procs = []
  for i in range(2):
    env = tu.subprocess_env(device_count=4, QSFT_CPU_COLLECTIVES="gloo")
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "qsft_jax.export", f"--workdir={path}", f"--out={out}",
         "--max_shard_size=20KB", "--distributed", f"--coordinator_address=127.0.0.1:{port}",
         "--num_processes=2", f"--process_id={i}"],
        cwd=tu.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  try:
    logs = [p.communicate(timeout=240)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert [p.returncode for p in procs] == [0, 0], "\n---\n".join(logs)
  assert "export: " in logs[0] and "export: " not in logs[1]  # process 0 reports (and writes)
  assert "arrays gathered from 2 processes" in logs[0], logs[0]  # sharded over both
  for root, _, files in os.walk(exported):
    rel = os.path.relpath(root, exported)
    there = os.path.join(out, rel)
    assert sorted(f for f in os.listdir(there) if os.path.isfile(os.path.join(there, f))) == sorted(files), rel
    for name in files:
      a, b = os.path.join(root, name), os.path.join(out, rel, name)
      if name.endswith(".safetensors"):
        x, y = load_file(a), load_file(b)
        assert x.keys() == y.keys()
        for key in x:
          np.testing.assert_array_equal(x[key], y[key], err_msg=f"{rel}/{name}: {key}")
      elif name != "extraction.json":
        assert open(a, "rb").read() == open(b, "rb").read(), f"{rel}/{name}"
  record, one = (json.load(open(os.path.join(d, "extraction.json"))) for d in (out, exported))
  assert record == one
