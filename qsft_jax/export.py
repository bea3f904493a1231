"""Export a trained run for other stacks: Hugging Face folders, PEFT adapters, the extraction rule.

    python -m qsft_jax.export --workdir=DIR --out=OUT [--phase=qsft|control] [--step=N]
        [--max_shard_size=2GB] [--dtype=float32|bfloat16] [--allow_unfinished] [--overwrite] [--nobase]

Reads the run through `qsft_jax.run.load` and writes under OUT:

  phi/, theta/          Hugging Face model folders (config.json, the tokenizer's files, safetensors:
                        model.safetensors, or model-0000i-of-0000n.safetensors with
                        model.safetensors.index.json above --max_shard_size), loadable by
                        transformers' AutoModelForCausalLM (and the stacks that read such folders). With LoRA
                        (model.lora.rank > 0) the adapters are merged into the base: W + scale * A.B,
                        in float32 (a bfloat16 sum would round much of a small adapter away).
  phi_adapter/, theta_adapter/   with LoRA only: PEFT LoRA adapters (adapter_config.json,
                        adapter_model.safetensors) of the same policies, for PeftModel.from_pretrained
                        on the base (`weights.hf_adapter_tensors` gives the layout);
  base/                 with LoRA only (unless --nobase): the frozen base the adapters were trained on,
                        as a Hugging Face folder (a quantised base dequantised, as the model read it);
  extraction.json       what a sampler needs to act as the run's policy (below).

theta is the final Q-SFT checkpoint's (the latest one for an unfinished run, with
--allow_unfinished); --step exports another checkpoint of the phase, --phase=control the control's
theta (phase 2 with every target 1) instead. phi is phase 1's result (as evaluation reads it).
Arrays keep their stored dtype (float32 for full fine-tuning; the base's base_dtype in base/, float32
for a quantised base, dequantised) unless --dtype is given.

extraction.json:

  {"policy": "pi(a | s) proportional to pi_phi(a | s) * exp(beta * p_theta(a | s))",
   "scores": "log_softmax(z_phi) + beta * softmax(z_theta), over the real vocabulary (ids < vocab_size)",
   "reference": "docs/algorithm.md section 6", "phi": "phi", "theta": "theta",
   "beta": the evaluation's best beta (null without WORKDIR/eval/results.json), "beta_source": how,
   "betas": config eval.betas, "evaluation": {policy: mean return} (when evaluated),
   "support_min", "bellman_support": the support rule of the Bellman max and of the ratio policy,
   "dummy_token", "suppressed_token_ids": tokens no policy emits (pad, BOS, EOS, the dummy token),
   "stop": {"strings", "token_ids", "rule"}, "max_new_tokens", "temperature": 0 (greedy),
   "prompt": how a history becomes prompt tokens (plain: BOS, the data templates; chat: the chat template,
   system prompt and rule), "tokenizer": its spec and
   special ids, "vocab_size", "phase", "checkpoint_steps": {"phi", "theta"}, "lora": the adapter
   settings or null, "workdir"}

Several processes (QSFT_DISTRIBUTED=1 or --distributed, with --coordinator_address, --num_processes,
--process_id as the trainer's distributed.* fields) load the parameters sharded over all their
devices; each array is gathered to the host leaf by leaf and process 0 alone writes. A gs:// OUT is
written to local folders first and uploaded (`qsft_jax.storage.staged_dir`).

Refused with one line: a --workdir that does not exist, an --out inside the workdir (or holding it),
an existing non-empty --out without --overwrite (which replaces only the entries listed above), a
--step the phase has no checkpoint of (exit status 2, usage errors); a run with unfinished phases
without --allow_unfinished, or without the phase asked for (exit status 1).
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

from absl import flags
import jax
import ml_collections
import numpy as np

from qsft_jax import checkpoints
from qsft_jax import cli
from qsft_jax import run as run_lib
from qsft_jax import sharding
from qsft_jax import storage
from qsft_jax.errors import NotFoundError
from qsft_jax.models import weights

# The entries of OUT this program writes (and, with --overwrite, replaces).
OUTPUTS = ("phi", "theta", "phi_adapter", "theta_adapter", "base", "extraction.json")
EXTRACTION_FILE = "extraction.json"
ADAPTER_CONFIG = "adapter_config.json"
# The export's mesh: every parameter sharded over all devices (fsdp) as far as the rules allow, so
# that no device holds a whole model.
EXPORT_MESH_SHAPE = {"data": 1, "fsdp": -1, "tensor": 1}


# ------------------------------------------------------------------------------------------------
# Parameters to the host


def to_host(tree: Any) -> Any:
  """The tree with every array as numpy, gathered leaf by leaf: an array sharded over several
  processes through `multihost_utils.process_allgather` (every process must call this, in the same
  order, and receives the whole array; one leaf is on the devices' hosts at a time beyond the tree
  built here), others by `device_get`. Non-array leaves pass unchanged."""
  from jax.experimental import multihost_utils

  def get(x):
    if isinstance(x, jax.Array):
      if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return x

  return jax.tree.map(get, tree)


def cast_tree(tree: Any, dtype: str) -> Any:
  """Floating leaves cast to `dtype` ("float32" | "bfloat16"); "" leaves the tree as it is."""
  if not dtype:
    return tree
  import ml_dtypes
  target = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
  return jax.tree.map(lambda x: x.astype(target) if np.issubdtype(x.dtype, np.floating)
                      or x.dtype == np.dtype(ml_dtypes.bfloat16) else x, tree)


# ------------------------------------------------------------------------------------------------
# Tokenizer


def hf_tokenizer(tokenizer) -> Any:
  """A transformers tokenizer that encodes as `tokenizer` does: an HFTokenizer's own; for a
  CharTokenizer, a fast tokenizer with one token per character (WordLevel over the alphabet, every
  character split off, tokens joined without spaces on decoding) and the same special ids (pad 0,
  BOS 1, EOS 2, unk 3, as "<pad>", "<s>", "</s>", "<unk>"; a text that spells one of these is read
  as that token, where the CharTokenizer reads its characters). It adds no special token itself: a
  prompt starts with the BOS the data layer puts in front (extraction.json "prompt")."""
  from qsft_jax.tokenizers import CharTokenizer
  if not isinstance(tokenizer, CharTokenizer):
    return tokenizer.hf
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
  import transformers

  specials = ["<pad>", "<s>", "</s>", "<unk>"]  # ids PAD, BOS, EOS, UNK
  vocab = {name: i for i, name in enumerate(specials)}
  vocab.update({c: CharTokenizer.NUM_SPECIAL + i for i, c in enumerate(tokenizer.alphabet)})
  backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
  backend.decoder = decoders.Fuse()
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")


# ------------------------------------------------------------------------------------------------
# LoRA


def peft_target_modules(modules: Sequence[str]) -> list[str]:
  """PEFT's target_modules for the adapted module names (e.g. "model.layers.0.self_attn.q_proj"):
  their names inside a layer ("self_attn.q_proj") when every layer adapts the same ones, else the
  full names. PEFT matches a module whose name equals an entry or ends with "." + an entry."""
  import re
  per_layer: dict[str, set[str]] = {}
  layers: set[str] = set()
  for name in modules:
    match = re.fullmatch(r"(.*?\.(?:layers|h)\.(\d+))\.(.+)", name)
    if match is None:
      return sorted(modules)
    layers.add(match[2])
    per_layer.setdefault(match[3], set()).add(match[2])
  if all(seen == layers for seen in per_layer.values()):
    return sorted(per_layer)
  return sorted(modules)


def peft_adapter_config(ranks: Mapping[str, int], lora_config, model_config, base: str) -> dict:
  """adapter_config.json of a PEFT LoRA adapter: r and lora_alpha the run's (PEFT's scaling
  lora_alpha / r is our scale), target_modules (`peft_target_modules`), rank_pattern / alpha_pattern
  for a module of another rank (GPT-2's fused c_attn: `weights.hf_adapter_tensors`), the alpha scaled
  with the rank so that the scale stays alpha / r; fan_in_fan_out for GPT-2's Conv1D modules."""
  targets = peft_target_modules(list(ranks))
  rank_pattern, alpha_pattern = {}, {}
  for module, rank in ranks.items():
    if rank != lora_config.rank:
      key = next(t for t in targets if module == t or module.endswith("." + t))
      rank_pattern[key] = rank
      alpha_pattern[key] = lora_config.alpha * rank / lora_config.rank
  return {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora_config.rank,
      "lora_alpha": lora_config.alpha, "target_modules": targets, "base_model_name_or_path": base,
      "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "lora_dropout": 0.0,
      "bias": "none", "fan_in_fan_out": model_config.family == "gpt2", "use_rslora": False,
      "use_dora": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
      "layers_to_transform": None, "layers_pattern": None, "revision": None}


def export_adapter(adapters: Any, model_config, lora_config, out_dir: str, base: str) -> None:
  """Writes a PEFT adapter folder (adapter_config.json, adapter_model.safetensors) of an adapter
  tree ({"lora": tree} or the tree; numpy leaves) to `out_dir` (local or a URL)."""
  import pathlib
  tensors, ranks = weights.hf_adapter_tensors(adapters, model_config)
  with storage.staged_dir(out_dir) as local:
    folder = pathlib.Path(local)
    names = list(tensors)
    weights.write_safetensors(folder, names, [tensors[n].nbytes for n in names],
                              lambda i: tensors[names[i]], basename="adapter_model")
    config = peft_adapter_config(ranks, lora_config, model_config, base)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def base_model_name(config: ml_collections.ConfigDict) -> str:
  """What model.init names, as PEFT's base_model_name_or_path: an hf: folder's path, else the spec."""
  init = str(config.model.init)
  return init[3:] if init.startswith("hf:") else init


# ------------------------------------------------------------------------------------------------
# extraction.json


def _best_beta(results: Mapping, prefix: str) -> tuple[float | None, dict]:
  """(beta of the best mean return among the "PREFIX_beta*" policies, {policy: mean return} of the
  evaluated extraction policies of this theta and of BC)."""
  policies = results.get("policies", {})
  ratio = "ratio" if prefix == "qsft" else f"{prefix}_ratio"
  figures = {name: p["mean_return"] for name, p in policies.items()
             if name in ("bc", ratio) or name.startswith(prefix + "_beta")}
  candidates = [(p["mean_return"], -p["beta"], p["beta"]) for name, p in policies.items()
                if name.startswith(prefix + "_beta") and p.get("beta") is not None]
  return (max(candidates)[2] if candidates else None), figures


def extraction_record(loaded: run_lib.Run, phase: str, theta_step: int | None, lora_config,
                      base_folder: bool = False) -> dict:
  """The contents of extraction.json (module docstring) for `loaded` with theta from `phase`;
  base_folder: OUT/base was written (LoRA)."""
  from qsft_jax import evaluate, sampler
  from qsft_jax.data import chat, mdp
  from qsft_jax.envs.base import ACTION_STOP
  from qsft_jax.envs.registry import ENVS

  config, tokenizer, targets = loaded.config, loaded.tokenizer, loaded.targets
  ev = config.get("eval", {})
  betas = [float(b) for b in ev.get("betas", ())]
  results_path = os.path.join(loaded.workdir, "eval", "results.json")
  beta, figures, source = None, {}, "no evaluation results (WORKDIR/eval/results.json): choose among betas"
  if storage.path(results_path).exists():
    with storage.path(results_path).open() as f:
      results = json.load(f)
    beta, figures = _best_beta(results, "qsft" if phase == "qsft" else "control")
    if beta is not None:
      source = (f"{results_path}: the best mean return among the {'Q-SFT' if phase == 'qsft' else 'control'}"
                f" extraction policies on {results.get('episodes')} evaluation episodes")
  task = config.get("task", "")
  stop = ENVS[task].action_stop if task in ENVS else ACTION_STOP
  mask = sampler.stop_token_mask(tokenizer, (stop,))
  data = loaded.data_config
  spec = run_lib.tokenizer_spec(loaded.workdir, config)
  tokenizer_record = {"spec": config.tokenizer, "files": "in phi/ and theta/ (transformers' format)",
                      "vocab_size": int(tokenizer.vocab_size), "bos_id": int(tokenizer.bos_id),
                      "eos_id": int(tokenizer.eos_id), "pad_id": int(tokenizer.pad_id)}
  if spec.startswith("char:"):
    tokenizer_record["alphabet"] = tokenizer.alphabet
  stops = mdp.action_stops(tokenizer, data.mdp, stop)
  stop_record = {"strings": [stop], "token_ids": [int(i) for i in np.flatnonzero(mask)],
                 "rule": "a row ends after the first token whose own text holds a stop string (the token "
                         "is kept) or after max_new_tokens tokens; the action's text is cut right after "
                         "the first stop string"}
  prompt_record = {"bos": True, "observation_template": data.observation_template,
                   "action_template": data.action_template,
                   "rule": "BOS, then each turn's text through its template, encoded separately and "
                           "concatenated; the history ends with an observation"}
  if data.format == "chat":
    stop_record = {"strings": [], "token_ids": list(stops.token_ids),
                   "rule": "a row ends after the end-of-turn token or after max_new_tokens tokens; the "
                           "action is the decoded tokens before it (the message content), cut before the "
                           f"first {stop!r}, with {stop!r} appended for the environment"}
    prompt_record = {"format": "chat", "system_prompt": data.system_prompt,
                     "chat_template": chat.resolve_template(tokenizer, data.chat_template),
                     "rule": "the chat template's rendering of the history (observations user messages, "
                             "actions assistant messages, each turn's text without one trailing newline) "
                             "with the generation prompt, encoded at once"}
  return {
      "policy": "pi(a | s) proportional to pi_phi(a | s) * exp(beta * p_theta(a | s))",
      "scores": "log_softmax(z_phi) + beta * softmax(z_theta), over the real vocabulary (ids < vocab_size); "
                "z_phi from phi/, z_theta from theta/ on the same prompt; beta = 0 is pi_phi alone",
      "reference": "docs/algorithm.md section 6",
      "phi": "phi", "theta": "theta",
      "beta": beta, "beta_source": source, "betas": betas, "evaluation": figures,
      "support_min": float(targets.support_min),
      "bellman_support": "the real tokens other than dummy_token with pi_phi(a | s) >= min(support_min, "
                         "the largest such pi_phi); the ratio policy (greedy p_theta / pi_phi) ranks "
                         "them without the suppressed tokens",
      "dummy_token": targets.dummy_token,
      "suppressed_token_ids": evaluate.suppressed_token_ids(tokenizer, targets.dummy_token, keep=stops.token_ids),
      "stop": stop_record,
      "max_new_tokens": int(ev.get("max_new_tokens", 16)),
      "temperature": 0.0,
      "prompt": prompt_record,
      "tokenizer": tokenizer_record,
      "vocab_size": int(loaded.model_config.vocab_size),
      "phase": phase,
      "checkpoint_steps": {"phi": loaded.behaviour_step, "theta": theta_step},
      "lora": None if lora_config is None else {
          "rank": lora_config.rank, "alpha": lora_config.alpha, "scale": lora_config.scale,
          "targets": list(lora_config.targets), "base": str(config.model.init),
          "base_dtype": lora_config.base_dtype, "quantization": lora_config.quantization,
          "merged": "phi/ and theta/ hold W + scale * A.B (float32 unless --dtype)",
          "adapters": {"phi": "phi_adapter", "theta": "theta_adapter"},
          "base_folder": "base" if base_folder else None},
      "workdir": loaded.workdir,
  }


# ------------------------------------------------------------------------------------------------
# The export


def theta_at(loaded: run_lib.Run, phase: str, step: int | None) -> tuple[Any, int | None]:
  """(theta of `phase` at checkpoint `step`, its step); the loaded latest one for step None. With
  LoRA the checkpoint holds the adapters, read over the run's base (its base record checked)."""
  latest, latest_step = ((loaded.theta_params, loaded.theta_step) if phase == "qsft"
                         else (loaded.control_params, loaded.control_step))
  if step is None or step == latest_step:
    return latest, latest_step
  saved = {"lora": latest["lora"]} if loaded.lora is not None else latest
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), saved)
  restored = checkpoints.restore_params_at(loaded.workdir, phase, step, ("params",), abstract)["params"]
  if loaded.lora is not None:
    from qsft_jax.models import lora
    base = {"params": latest["params"]}
    record = lora.base_record(base, loaded.config.model.init, loaded.lora)
    checkpoints.check_base_record(os.path.join(checkpoints.phase_dir(loaded.workdir, phase), "checkpoints"),
                                  step, record, label=f"{loaded.workdir}: {phase}")
    restored = {**base, **restored}
  return restored, step


def _is_quantized(x) -> bool:
  """A quantised base kernel (a pytree whose `astype` dequantises)."""
  from qsft_jax.models import quant
  return isinstance(x, quant.QuantizedArray)


def _float32(tree: Any) -> Any:
  """Floating arrays cast to float32, quantised kernels dequantised to float32."""
  import jax.numpy as jnp
  cast = lambda x: (x.astype(jnp.float32) if _is_quantized(x) or jnp.issubdtype(x.dtype, jnp.floating)
                    else x)
  return jax.tree.map(cast, tree, is_leaf=_is_quantized)


def merged_params(loaded: run_lib.Run, variables: Any) -> Any:
  """A parameter set as the plain model's {"params": tree}: with LoRA ({"params": base, "lora":
  adapters}), the adapters merged into the base in float32 (`lora.merge` over the base in float32: a
  bfloat16 W + scale * A.B would round much of a small adapter away), on the devices where they are."""
  if loaded.lora is None:
    return variables
  from qsft_jax.models import lora
  return lora.merge({"params": _float32(variables["params"]), "lora": variables["lora"]},
                    loaded.model_config, loaded.lora)


def dense_base(loaded: run_lib.Run) -> Any:
  """The LoRA run's base {"params": tree} as the model reads it: as stored, or, with quantised
  kernels, all in float32 with those dequantised (their values are codebook entries times scales,
  which bfloat16 would round)."""
  base = {"params": loaded.behaviour_params["params"]}
  quantized = any(_is_quantized(x) for x in jax.tree.leaves(base, is_leaf=_is_quantized))
  return _float32(base) if quantized else base


def _stored_dtype(tree: Any) -> str:
  """The dtype name of a host tree's floating leaves ("float32" | "bfloat16")."""
  import ml_dtypes
  for x in jax.tree.leaves(tree):
    if x.dtype == np.dtype(ml_dtypes.bfloat16):
      return "bfloat16"
    if np.issubdtype(x.dtype, np.floating):
      return str(x.dtype)
  return "float32"


def export(loaded: run_lib.Run, out: str, *, phase: str = "qsft", step: int | None = None,
           max_shard_size: int | str | None = "2GB", dtype: str = "", base: bool = True) -> dict:
  """Writes OUT's folders and extraction.json (module docstring) for a loaded run; every process
  calls it (the arrays are gathered leaf by leaf), process 0 writes. `dtype` "" keeps the stored
  dtypes (merged LoRA weights: float32). Returns the extraction record."""
  theta, theta_step = theta_at(loaded, phase, step)
  if theta is None:
    raise NotFoundError(f"{loaded.workdir}: no {phase} checkpoint to export theta from")
  writer = jax.process_index() == 0
  tokenizer = hf_tokenizer(loaded.tokenizer)

  def folder(tree: Any, name: str) -> None:
    host = cast_tree(to_host(tree), dtype)
    if writer:
      config = loaded.model_config.replace(param_dtype=_stored_dtype(host))
      weights.export_hf_folder(host, config, os.path.join(out, name), tokenizer,
                               max_shard_size=max_shard_size)

  for name, variables in {"phi": loaded.behaviour_params, "theta": theta}.items():
    folder(merged_params(loaded, variables), name)
    if loaded.lora is not None:
      adapters = cast_tree(to_host({"lora": variables["lora"]}), dtype)
      if writer:
        export_adapter(adapters, loaded.model_config, loaded.lora, os.path.join(out, f"{name}_adapter"),
                       base_model_name(loaded.config))
  if loaded.lora is not None and base:
    folder(dense_base(loaded), "base")
  record = extraction_record(loaded, phase, theta_step, loaded.lora, loaded.lora is not None and base)
  if writer:
    run_lib.write_json_atomic(os.path.join(out, EXTRACTION_FILE), record)
  return record


# ------------------------------------------------------------------------------------------------
# The command line


def _inside(path: str, directory: str) -> bool:
  return path == directory or path.startswith(directory.rstrip("/") + "/")


def _nonempty(out: str) -> bool:
  target = storage.path(out)
  return target.exists() and (not target.is_dir() or any(True for _ in target.iterdir()))


def _clear(out: str) -> None:
  """Removes the entries of OUT this program writes (`OUTPUTS`), so that no stale shard stays."""
  for name in OUTPUTS:
    target = storage.path(os.path.join(out, name))
    if target.is_dir():
      target.rmtree()
    elif target.exists():
      target.unlink()


def define_flags() -> flags.FlagValues:
  fv = cli.new_flags()
  flags.DEFINE_string("workdir", None, "Run directory of `python -m qsft_jax.main`.", flag_values=fv)
  flags.DEFINE_string("out", None, "Directory to write into (local or gs://...).", flag_values=fv)
  flags.DEFINE_enum("phase", "qsft", ["qsft", "control"], "Whose theta: Q-SFT's, or the control's "
                    "(phase 2 with every target 1).", flag_values=fv)
  flags.DEFINE_integer("step", None, "Checkpoint step of the phase to export theta from [the latest].",
                       flag_values=fv)
  flags.DEFINE_string("max_shard_size", "2GB", "Largest safetensors file; above it the weights are "
                      "sharded with model.safetensors.index.json (transformers' units: 2GB, 500MB, "
                      "1GiB, bytes).", flag_values=fv)
  flags.DEFINE_enum("dtype", "", ["", "float32", "bfloat16"], "Storage dtype of the exported weights "
                    "['': as stored in the checkpoints; merged LoRA weights float32].", flag_values=fv)
  flags.DEFINE_bool("allow_unfinished", False, "Export the latest checkpoints of phases that have not "
                    "reached their configured steps (refused without it).", flag_values=fv)
  flags.DEFINE_bool("overwrite", False, "Write into a non-empty --out, replacing the entries this "
                    "program writes.", flag_values=fv)
  flags.DEFINE_bool("base", True, "With LoRA: also write the frozen base as OUT/base.", flag_values=fv)
  flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize (also with "
                    "QSFT_DISTRIBUTED=1), with --coordinator_address, --num_processes and --process_id when set.", flag_values=fv)
  flags.DEFINE_string("coordinator_address", "", "host:port of process 0.", flag_values=fv)
  flags.DEFINE_integer("num_processes", 0, "Number of processes.", flag_values=fv)
  flags.DEFINE_integer("process_id", -1, "This process's index.", flag_values=fv)
  return fv


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m qsft_jax.export`; argv as sys.argv holds it (the program name first)."""
  prog = "python -m qsft_jax.export"
  fv = define_flags()
  cli.parse(fv, argv, prog=prog, doc=__doc__, required=["workdir", "out"])
  try:
    max_shard_size = weights.parse_size(fv.max_shard_size)
  except ValueError as e:
    cli.usage_error(prog, f"--max_shard_size: {e}")
  workdir, out = storage.normalize(fv.workdir), storage.normalize(fv.out)
  if not storage.path(workdir).is_dir():
    cli.usage_error(prog, f"--workdir={fv.workdir}: no such directory")
  if _inside(out, workdir) or _inside(workdir, out):
    cli.usage_error(prog, f"--out={fv.out} {'is inside' if _inside(out, workdir) else 'holds'} "
                          f"--workdir={fv.workdir}; export outside the run's directory")
  if storage.path(out).exists() and not storage.path(out).is_dir():
    cli.usage_error(prog, f"--out={fv.out} is a file; name a directory")
  if _nonempty(out) and not fv.overwrite:
    cli.usage_error(prog, f"--out={fv.out} exists and is not empty; choose another --out or pass "
                          "--overwrite to replace what this program writes there")
  if fv.step is not None:
    steps = run_lib.checkpoint_steps(workdir, fv.phase)
    if fv.step not in steps:
      cli.usage_error(prog, f"--step={fv.step}: {workdir}/{fv.phase}/checkpoints has no such step "
                            f"(steps: {', '.join(map(str, steps)) or 'none'})")
  from qsft_jax import main as main_lib
  main_lib.maybe_initialize_distributed(ml_collections.ConfigDict({"distributed": dict(
      enabled=fv.distributed, coordinator_address=fv.coordinator_address,
      num_processes=fv.num_processes, process_id=fv.process_id)}))
  config = run_lib.read_config(workdir)
  if fv.phase not in tuple(config.get("phases", ())):
    raise NotFoundError(f"{workdir}: config.phases {list(config.phases)} has no {fv.phase!r} phase "
                        "to export theta from")
  run_lib.check_finished(workdir, config, allow_unfinished=fv.allow_unfinished,
                         override="--allow_unfinished")
  mesh = sharding.make_mesh(EXPORT_MESH_SHAPE)
  loaded = run_lib.load(workdir, mesh=mesh)
  if jax.process_index() == 0 and fv.overwrite:
    _clear(out)
  record = export(loaded, out, phase=fv.phase, step=fv.step, max_shard_size=max_shard_size,
                  dtype=fv.dtype, base=fv.base)
  if jax.process_index() == 0:
    beta = "none chosen (no evaluation results)" if record["beta"] is None else f"{record['beta']:g}"
    spread = sum(not x.is_fully_addressable for x in jax.tree.leaves(loaded.behaviour_params)
                 if isinstance(x, jax.Array))
    gathered = f"; phi's arrays gathered from {jax.process_count()} processes: {spread}" if spread else ""
    print(f"export: {workdir} -> {out}: phi (step {record['checkpoint_steps']['phi']}), theta of "
          f"{fv.phase} (step {record['checkpoint_steps']['theta']}), beta {beta}{gathered}", flush=True)
  return 0


if __name__ == "__main__":
  cli.run(main)
