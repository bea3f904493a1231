"""Value diagnostics: did phase 2 learn values, or only more behaviour cloning? (docs/algorithm.md
section 7)

On held-out episodes, at the first action token of every agent turn, the ratio p_theta / pi_phi is
the model's value estimate of the taken action. If values were learned it tracks the observed
(transformed, normalised) return-to-go; an extra-BC "gain" leaves it near 1 and uncorrelated.

    value_diagnostics(model_config, behaviour_params, theta_params, batch, target_params=...,
                      targets=losses.TargetConfig(...))

returns the Pearson correlation overall and by turn index, plus, when theta_bar is given, the mean
Bellman target and the fraction of clipped targets by turn index. `plot_value_diagnostics` draws both;
`heldout_value_diagnostics` runs them on a loaded run's held-out episodes (`qsft_jax.run.Run`).
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from qsft_jax import losses
from qsft_jax import progress
from qsft_jax import storage
from qsft_jax.models.config import ModelConfig
from qsft_jax.models.transformer import Transformer

if TYPE_CHECKING:
  from qsft_jax.run import Run

ROWS_PER_CALL = 16  # held-out rows per forward pass


@functools.partial(jax.jit, static_argnums=(0, 5))
def _row_logits(model_config: ModelConfig, params, tokens, positions, segment_ids, lora=None):
  return Transformer(model_config, lora=lora).apply(params, tokens, positions, segment_ids)


def taken_logprobs(model_config: ModelConfig, params: Any, batch: Mapping[str, np.ndarray],
                   rows_per_call: int = ROWS_PER_CALL, bar: progress.Progress | None = None,
                   lora: Any = None) -> np.ndarray:
  """log p(x_i | x_<i) of every token i, read from row i - 1: [B, L] float32 (0 at i = 0).
  bar: counts each forward pass of `rows_per_call` rows. lora: the run's LoraConfig when `params` are
  LoRA variables {"params": base, "lora": adapters} (`qsft_jax.models.lora`)."""
  out = []
  for start in range(0, batch["tokens"].shape[0], rows_per_call):
    part = {k: jnp.asarray(batch[k][start:start + rows_per_call])
            for k in ("tokens", "positions", "segment_ids")}
    logits = _row_logits(model_config, params, part["tokens"], part["positions"], part["segment_ids"], lora)
    logp = losses.real_log_softmax(logits, model_config.vocab_size)  # [b, L, V]
    labels = losses.to_rows(part["tokens"])  # row k predicts token k + 1
    row_logp = jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    token_logp = jnp.concatenate([jnp.zeros_like(row_logp[:, :1]), row_logp[:, :-1]], axis=1)
    out.append(np.asarray(token_logp))
    if bar is not None:
      bar.update(1)
  return np.concatenate(out)


def first_action_tokens(batch: Mapping[str, np.ndarray]) -> np.ndarray:
  """[B, L] bool: the first token of every action turn."""
  action = np.asarray(batch["action_mask"], bool)
  turn = np.asarray(batch["turn_index"])
  previous_action = np.pad(action[:, :-1], ((0, 0), (1, 0)))
  previous_turn = np.pad(turn[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
  same_segment = np.asarray(batch["segment_ids"]) == np.pad(
      np.asarray(batch["segment_ids"])[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
  return action & ~(previous_action & (previous_turn == turn) & same_segment)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
  if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
    return float("nan")
  return float(np.corrcoef(x, y)[0, 1])


def value_diagnostics(model_config: ModelConfig, behaviour_params: Any, theta_params: Any,
                      batch: Mapping[str, np.ndarray], *, target_params: Any = None,
                      targets: losses.TargetConfig = losses.TargetConfig(),
                      max_turns: int = 32, show_progress: bool = False, lora: Any = None) -> dict:
  """Correlation of p_theta / pi_phi with the return-to-go at each turn's first action token.

  batch: the data layer's [B, L] arrays of held-out episodes. targets: the run's target settings,
  used with target_params for the per-turn Bellman targets; mode "ones" (the control) reports the
  "token" targets its theta_bar would give (`TargetConfig.bellman`). Returns a JSON-friendly dict:
  {"correlation", "first_turn_correlation", "count", "by_turn": [{"turn", "count", "correlation",
  "mean_ratio", "mean_return_to_go", ("mean_target", "clipped_fraction")}]}.
  show_progress: count the forward passes (ROWS_PER_CALL rows each, per parameter set) with their rate
  and ETA on stderr (`qsft_jax.progress`). lora: the LoraConfig of LoRA parameter sets (`taken_logprobs`).
  """
  passes = -(-batch["tokens"].shape[0] // ROWS_PER_CALL) * (2 if target_params is None else 3)
  with progress.Progress(passes, "value diagnostics", "passes", enabled=show_progress) as bar:
    logp_theta = taken_logprobs(model_config, theta_params, batch, bar=bar, lora=lora)
    logp_phi = taken_logprobs(model_config, behaviour_params, batch, bar=bar, lora=lora)
    weights = clipped = None
    if target_params is not None:
      weights, clipped = _targets(model_config, target_params, behaviour_params, batch,
                                  targets.bellman(), bar=bar, lora=lora)
  first = first_action_tokens(batch)
  ratio = np.exp(np.minimum(logp_theta - logp_phi, losses.LOG_VALUE_CAP))[first]
  rtg = np.asarray(batch["returns_to_go"])[first]
  turns = np.asarray(batch["turn_index"])[first]
  by_turn = []
  for t in range(min(int(turns.max(initial=-1)) + 1, max_turns)):
    sel = turns == t
    row = {"turn": t, "count": int(sel.sum()), "correlation": _pearson(ratio[sel], rtg[sel]),
           "mean_ratio": float(ratio[sel].mean()) if sel.any() else float("nan"),
           "mean_return_to_go": float(rtg[sel].mean()) if sel.any() else float("nan")}
    if weights is not None:
      action_sel = np.asarray(batch["action_mask"], bool) & (np.asarray(batch["turn_index"]) == t)
      row["mean_target"] = float(weights[action_sel].mean()) if action_sel.any() else float("nan")
      row["clipped_fraction"] = float(clipped[action_sel].mean()) if action_sel.any() else float("nan")
    by_turn.append(row)
  return {"correlation": _pearson(ratio, rtg),
          "first_turn_correlation": by_turn[0]["correlation"] if by_turn else float("nan"),
          "count": int(first.sum()), "by_turn": by_turn}


def _targets(model_config: ModelConfig, target_params: Any, behaviour_params: Any,
             batch: Mapping[str, np.ndarray], targets: losses.TargetConfig,
             bar: progress.Progress | None = None, lora: Any = None) -> tuple[np.ndarray, np.ndarray]:
  """Bellman targets and clipped flags of every token [B, L] (numpy), from full logits; `bar` counts
  each part of ROWS_PER_CALL rows."""
  parts_t, parts_c = [], []
  rows = ROWS_PER_CALL
  for start in range(0, batch["tokens"].shape[0], rows):
    part = {k: jnp.asarray(v[start:start + rows]) for k, v in batch.items()}
    args = (part["tokens"], part["positions"], part["segment_ids"])
    values = losses.bellman_values(_row_logits(model_config, target_params, *args, lora),
                                   _row_logits(model_config, behaviour_params, *args, lora),
                                   model_config.vocab_size, targets.support_min,
                                   exclude_token=targets.dummy_token)
    t, c = losses.compute_targets(values, part, targets)
    parts_t.append(np.asarray(t))
    parts_c.append(np.asarray(c))
    if bar is not None:
      bar.update(1)
  return np.concatenate(parts_t), np.concatenate(parts_c)


def plot_value_diagnostics(diagnostics: dict, path: str, title: str = "") -> None:
  """Two panels by turn index: correlation of the ratio with return-to-go; mean target and the
  fraction clipped (when present). Written to `path` (PNG)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = diagnostics["by_turn"]
  turns = [r["turn"] for r in rows]
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
  axes[0].plot(turns, [r["correlation"] for r in rows], "o-", label="corr(p_theta/pi_phi, return-to-go)")
  axes[0].axhline(0.0, color="grey", lw=0.5)
  axes[0].set_xlabel("turn index")
  axes[0].set_ylim(-1, 1)
  axes[0].legend(loc="lower left", fontsize=8)
  axes[0].set_title(f"value correlation (overall {diagnostics['correlation']:.2f})")
  if rows and "mean_target" in rows[0]:
    axes[1].plot(turns, [r["mean_target"] for r in rows], "o-", label="mean target")
    axes[1].plot(turns, [r["clipped_fraction"] for r in rows], "s--", label="fraction clipped")
  axes[1].plot(turns, [r["mean_return_to_go"] for r in rows], "^:", label="mean return-to-go")
  axes[1].set_xlabel("turn index")
  axes[1].set_ylim(0, 1.05)
  axes[1].legend(loc="lower left", fontsize=8)
  axes[1].set_title("Bellman targets by turn")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  with storage.path(path).open("wb") as f:  # a local path or a URL
    fig.savefig(f, dpi=100, format="png")
  plt.close(fig)


def load_heldout_batch(workdir: str, data_config, tokenizer) -> dict | None:
  """The data layer's [B, L] arrays of WORKDIR/data/heldout.jsonl, or None when there is no such file."""
  import json
  import os

  from qsft_jax import run as run_lib
  from qsft_jax.data import episodes_to_batch

  path = run_lib.data_files(workdir)["heldout"]
  if not storage.path(path).exists():
    return None
  with storage.path(path).open() as f:
    episodes = [json.loads(line) for line in f if line.strip()]
  return episodes_to_batch(episodes, data_config, tokenizer)


def heldout_value_diagnostics(run: Run, suffix: str = "") -> dict:
  """Runs `value_diagnostics` on the held-out episodes of a loaded run (`qsft_jax.run.Run`) with its
  phi, theta and theta_bar (when present) and its target settings (`Run.targets`); writes
  WORKDIR/eval/value_diagnostics{suffix}.{json,png}. Returns the dict.

  To diagnose another theta (the control's), pass `run.with_theta(control_params)`."""
  import json
  import os

  batch = load_heldout_batch(run.workdir, run.data_config, run.tokenizer)
  if batch is None:
    raise FileNotFoundError(f"{os.path.join(run.workdir, 'data', 'heldout.jsonl')}: no held-out episodes")
  d = value_diagnostics(run.model_config, run.behaviour_params, run.theta_params, batch,
                        target_params=run.target_params, targets=run.targets, show_progress=True,
                        lora=run.lora)
  if jax.process_index() == 0:
    out = os.path.join(run.workdir, "eval")
    storage.path(out).mkdir(parents=True, exist_ok=True)
    with storage.path(os.path.join(out, f"value_diagnostics{suffix}.json")).open("w") as f:
      json.dump(d, f, indent=1)
    plot_value_diagnostics(d, os.path.join(out, f"value_diagnostics{suffix}.png"),
                           os.path.basename(run.workdir) + suffix)
    print(f"value correlation{suffix} (p_theta/pi_phi vs return-to-go, held out): overall "
          f"{d['correlation']:.3f}, first turn {d['first_turn_correlation']:.3f}", flush=True)
  return d
