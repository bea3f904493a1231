"""A run whose workdir is a bucket (gs://), against a local GCS emulator (tests/gcs_emulator.py).

The trainer writes config, tokenizer, data, TensorBoard events and orbax checkpoints into
gs://bucket/run, is killed after its first checkpoint, resumes from it and finishes; evaluation and
`analysis.load` then read the run from the bucket. The smaller tests cover the path helpers
(`qsft_jax.storage`) and the readers that need local files (tokenizer, weights) on gs:// paths.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess

import numpy as np
import pytest

from qsft_jax import errors, storage
import gcs_emulator  # tests/gcs_emulator.py
import trainer_utils as tu

# found, not imported: gcsfs reads its settings (gcs_emulator.client_env) when first imported
for _module in ("gcsfs", "gcp_storage_emulator"):
  if importlib.util.find_spec(_module) is None:
    pytest.skip(f"{_module} is not installed (requirements-test.txt)", allow_module_level=True)

BUCKET = f"gs://{gcs_emulator.BUCKET}"


@pytest.fixture(scope="module")
def gcs():
  with gcs_emulator.start() as env:
    yield env


# ------------------------------------------------------------------------------------------------
# Paths


def test_normalize_keeps_urls_and_makes_local_paths_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert storage.normalize("gs://b/run") == "gs://b/run"
  assert storage.normalize("gs://b/run/") == "gs://b/run"
  assert storage.normalize("s3://b/x/y") == "s3://b/x/y"
  assert storage.normalize("run") == os.path.join(str(tmp_path), "run")
  assert storage.normalize("/a/../b/") == "/b"
  assert storage.is_url("gs://b") and not storage.is_url("/gs:/b") and not storage.is_url("gs:b")
  # the workdir a failure names: inside a bucket's workdir, not resolved against the current directory
  assert errors._inside("gs://b/run/bc/checkpoints/4", "gs://b/run")
  assert not errors._inside("gs://b/run2/x", "gs://b/run")


@pytest.mark.parametrize("exc", [
    # gcsfs, without credentials or without the bucket's permissions
    OSError("Anonymous caller does not have storage.objects.list access to the Google Cloud Storage "
            "bucket. Permission 'storage.objects.list' denied on resource (or it may not exist)., 401"),
    # tensorstore under orbax
    ValueError('PERMISSION_DENIED: Error writing "params/0" in OCDBT database at gs://b/run/bc/'),
])
def test_a_bucket_that_refuses_the_caller_is_one_line_about_credentials(exc):
  try:
    try:
      raise exc
    except Exception as inner:
      raise RuntimeError("save failed") from inner
  except RuntimeError as outer:
    error = errors.storage_error(outer, "gs://b/run", resumes=True)
  assert str(error) == ("gs://b/run: permission denied; the credentials in use (Google's application "
                        "default credentials: README, Runs in a bucket) must be allowed to read and "
                        "write gs://b/run, or choose another --workdir")


def test_files_in_a_bucket(gcs, tmp_path):
  from qsft_jax.data import episodes as episodes_lib

  root = f"{BUCKET}/paths"
  episode = {"turns": [{"text": "hi\n", "action": False}, {"text": "a\n", "action": True, "reward": 1.0}],
             "done": True}
  for name in ("a.jsonl", "sub/b.jsonl", "sub/c.jsonl", "sub/notes.txt"):
    storage.path(f"{root}/{name}").parent.mkdir(parents=True, exist_ok=True)
    assert episodes_lib.write_jsonl(f"{root}/{name}", [episode] * 2) == 2
  # a directory: every *.jsonl under it, recursively; a file; a one-level glob
  assert episodes_lib.resolve_paths(root) == [f"{root}/a.jsonl", f"{root}/sub/b.jsonl", f"{root}/sub/c.jsonl"]
  assert episodes_lib.resolve_paths(f"{root}/sub/b.jsonl") == [f"{root}/sub/b.jsonl"]
  assert episodes_lib.resolve_paths(f"{root}/sub/*.jsonl") == [f"{root}/sub/b.jsonl", f"{root}/sub/c.jsonl"]
  with pytest.raises(FileNotFoundError, match="no such file"):
    episodes_lib.resolve_paths(f"{root}/missing.jsonl")
  with pytest.raises(FileNotFoundError, match=r"recursive \*\* glob"):
    episodes_lib.resolve_paths(f"{root}/**/*.jsonl")
  lines = list(episodes_lib.iter_lines(f"{root}/sub/b.jsonl"))
  assert [(f, n) for f, n, _ in lines] == [(f"{root}/sub/b.jsonl", 1), (f"{root}/sub/b.jsonl", 2)]
  assert json.loads(lines[0][2]) == episode

  # a write that fails part way leaves nothing, locally or in the bucket
  for target in (str(tmp_path / "half.jsonl"), f"{root}/half.jsonl"):
    with pytest.raises(ZeroDivisionError):
      with storage.open_atomic(target) as f:
        f.write("{}\n")
        f.flush()
        1 / 0
    assert not storage.path(target).exists(), target
  assert os.listdir(tmp_path) == []

  storage.append_text(f"{root}/log.jsonl", "1\n")
  storage.append_text(f"{root}/log.jsonl", "2\n")
  assert storage.path(f"{root}/log.jsonl").read_text() == "1\n2\n"

  # a folder copied to local disk for a reader that opens local files only
  local = storage.local_copy(f"{root}/sub")
  assert not storage.is_url(local) and sorted(os.listdir(local)) == ["b.jsonl", "c.jsonl", "notes.txt"]
  with open(os.path.join(local, "b.jsonl")) as f:
    assert json.loads(f.readline()) == episode
  assert storage.local_copy(f"{root}/sub") == local  # once per process
  with pytest.raises(FileNotFoundError):
    storage.local_copy(f"{root}/absent")


def test_tokenizer_and_weights_in_a_bucket(gcs):
  """A char tokenizer saved to and loaded from gs://; a model exported to gs:// as an HF folder loads
  back (through a local copy) to the same parameters."""
  import flax.linen as nn
  import jax
  from qsft_jax.models import weights
  from qsft_jax.models.config import ModelConfig
  from qsft_jax.models.transformer import Transformer
  from qsft_jax.tokenizers import CharTokenizer, load_tokenizer

  tok = CharTokenizer("abc\n")
  tok.save(f"{BUCKET}/tok/tokenizer.json")
  loaded = load_tokenizer(f"char:{BUCKET}/tok/tokenizer.json")
  assert loaded.alphabet == tok.alphabet and loaded.encode("cab") == tok.encode("cab")

  config = ModelConfig(family="llama", vocab_size=16, d_model=16, num_layers=1, num_heads=2,
                       num_kv_heads=1, head_dim=8, mlp_dim=32, max_position_embeddings=32,
                       tie_embeddings=False)
  shapes = jax.eval_shape(lambda: nn.unbox(Transformer(config).init(
      jax.random.key(0), np.zeros((1, 4), np.int32), np.zeros((1, 4), np.int32),
      np.ones((1, 4), np.int32))))["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
  out = weights.export_hf_folder(params, config, f"{BUCKET}/export/model")
  assert os.fspath(out) == f"{BUCKET}/export/model"
  assert sorted(p.name for p in storage.path(f"{BUCKET}/export/model").iterdir()) == [
      "config.json", "model.safetensors"]
  config2, params2 = weights.load_hf_folder(f"{BUCKET}/export/model")
  assert config2.d_model == config.d_model and config2.num_layers == config.num_layers
  # the tensors as the HF folder holds them (vocabulary padding dropped), before and after the trip
  before, after = weights.hf_tensors(params, config), weights.hf_tensors(params2, config2)
  assert sorted(before) == sorted(after)
  for name in before:
    np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def test_tfds_dataset_in_a_bucket(gcs, tmp_path):
  """A TFDS dataset prepared into gs:// (built locally, uploaded) reads back through array_record's own
  gs:// reader: the same episodes as the JSONL it was built from, in the pipeline's batches."""
  from qsft_jax.data import DataConfig, write_jsonl
  from qsft_jax.data.check import iter_records
  from qsft_jax.data.synthetic import wordle_like_episodes
  from qsft_jax.data.tfds_builders import build_dataset

  episodes = list(wordle_like_episodes(6, seed=3))
  write_jsonl(str(tmp_path / "train.jsonl"), episodes)
  out = build_dataset(os.path.join(tu.REPO, "data", "jsonl_episodes"), f"{BUCKET}/tfds",
                      manual_dir=str(tmp_path))
  assert out.startswith(f"{BUCKET}/tfds/jsonl_episodes/") and not os.path.exists(os.path.join(tu.REPO, "gs:"))
  config = DataConfig(source="tfds", tfds_name="jsonl_episodes", tfds_data_dir=f"{BUCKET}/tfds")
  stored = sorted(json.dumps(json.loads(raw)["turns"]) for _, _, raw in iter_records(config))
  assert stored == sorted(json.dumps(e["turns"]) for e in episodes)


# ------------------------------------------------------------------------------------------------
# A run in a bucket: train, kill, resume, evaluate, analyse


@pytest.mark.slow
def test_train_kill_resume_evaluate_analyse_in_a_bucket(gcs, tmp_path):
  import jax
  from qsft_jax import analysis
  from qsft_jax import run as run_lib

  workdir = f"{BUCKET}/run"
  env = tu.subprocess_env(device_count=1, **gcs)
  overrides = ("--config.bc.steps=6", "--config.qsft.steps=4", "--config.checkpoint.every_steps=2",
               "--config.log.every_steps=2", "--config.log.profile_steps=3")

  # First start: killed once BC's step-2 checkpoint is complete in the bucket.
  with open(tmp_path / "first.txt", "wb") as log:
    proc = subprocess.Popen(tu.main_command(workdir, *overrides, "--config.eval.enabled=False"),
                            cwd=tu.REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
  proc.log_path = str(tmp_path / "first.txt")
  tu.kill_when(proc, lambda: 2 in run_lib.checkpoint_steps(workdir, "bc"), poll=0.2)
  assert tu.wait(proc) == -signal.SIGKILL
  bc_latest = max(run_lib.checkpoint_steps(workdir, "bc"))
  assert bc_latest < 6 and not storage.path(f"{workdir}/bc/DONE").exists(), tu.output(proc)[-3000:]
  for name in ("config.json", "model_config.json", "tokenizer.json", "data/train.jsonl",
               "data/heldout.jsonl"):
    assert storage.path(f"{workdir}/{name}").exists(), name

  # Resume from that checkpoint to the end of both phases, then evaluate (a few short episodes).
  done = subprocess.run(tu.main_command(workdir, *overrides, "--config.eval.episodes=2",
                                        "--config.eval.batch_size=2", "--config.eval.max_new_tokens=4"),
                        cwd=tu.REPO, env=env, capture_output=True, text=True, timeout=300)
  text = done.stdout + done.stderr
  assert done.returncode == 0, text[-4000:]
  assert f"bc: resumed from the checkpoint of step {bc_latest}" in text, text[-3000:]
  assert run_lib.done_step(workdir, "bc") == 6 and run_lib.done_step(workdir, "qsft") == 4
  assert run_lib.checkpoint_steps(workdir, "qsft")[-1] == 4
  history = json.loads(storage.path(f"{workdir}/bc/metrics.json").read_text())
  assert [h["step"] for h in history] == [2, 4, 6]  # the killed start's log and the resumed one's
  changes = [json.loads(line)["changes"] for line in
             storage.path(f"{workdir}/config_history.jsonl").read_text().splitlines()]
  assert changes == [["eval.batch_size: 8 -> 2", "eval.enabled: false -> true", "eval.episodes: 8 -> 2",
                      "eval.max_new_tokens: 16 -> 4"]]
  for d in ("data/tensorboard", "bc/tensorboard", "qsft/tensorboard"):
    events = [p.name for p in storage.path(f"{workdir}/{d}").iterdir()]
    assert any(n.startswith("events.out.tfevents.") for n in events), (d, events)
  # The profiler writes local files: the trace of Q-SFT's step 3 is uploaded when it stops.
  traces = list(storage.path(f"{workdir}/qsft/profile/steps_3-3/plugins/profile").glob("*/*.xplane.pb"))
  assert traces and traces[0].stat().length > 0, traces
  results = json.loads(storage.path(f"{workdir}/eval/results.json").read_text())
  assert results["checkpoint_steps"]["theta"] == 4 and results["episodes"] == 2, results
  for name in ("results.md", "value_diagnostics.json", "value_diagnostics.png"):
    assert storage.path(f"{workdir}/eval/{name}").exists(), name
  assert not os.path.exists(os.path.join(tu.REPO, "gs:"))  # nothing went to a local ./gs:/ folder

  # The notebook entry point reads the run from the bucket: theta is the last Q-SFT checkpoint's.
  a = analysis.load(workdir)
  saved = tu.read_state(workdir, "qsft", 4)
  theta = jax.tree_util.tree_flatten_with_path(a.theta_params)[0]
  assert theta
  for key, value in theta:
    name = "['params']" + jax.tree_util.keystr(key)
    np.testing.assert_array_equal(np.asarray(value), saved[name], err_msg=name)


def test_export_to_a_bucket(gcs, tmp_path):
  """`python -m qsft_jax.export --out=gs://...`: the folders are staged locally and uploaded; the
  theta folder read back from the bucket holds the run's final theta."""
  from qsft_jax import export
  from qsft_jax.models import weights
  from test_analysis import make_workdir

  workdir = str(tmp_path / "run")
  made = make_workdir(workdir)
  out = f"{BUCKET}/export/policy"
  assert export.main(["export", f"--workdir={workdir}", f"--out={out}", "--max_shard_size=20KB"]) == 0
  assert sorted(p.name for p in storage.path(out).iterdir()) == ["extraction.json", "phi", "theta"]
  names = sorted(p.name for p in storage.path(f"{out}/theta").iterdir())
  assert "model.safetensors.index.json" in names and "tokenizer.json" in names
  config, params = weights.load_hf_folder(f"{out}/theta")
  assert config.d_model == made["model_config"].d_model
  want = weights.hf_tensors(made["theta"], made["model_config"])
  got = weights.hf_tensors(params, config)
  assert sorted(got) == sorted(want)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  # a second export into the non-empty bucket folder needs --overwrite, then replaces the folders
  with pytest.raises(SystemExit) as exit_:
    export.main(["export", f"--workdir={workdir}", f"--out={out}"])
  assert exit_.value.code == 2
  assert export.main(["export", f"--workdir={workdir}", f"--out={out}", "--overwrite"]) == 0
  assert sorted(p.name for p in storage.path(f"{out}/theta").iterdir()) == [
      "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
