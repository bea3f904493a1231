"""Notebook analysis of a checkpoint: per-token values, next-token values, heatmaps, episodes played.

    from qsft_jax import analysis
    a = analysis.load("/tmp/qsft_maze")          # qsft_jax.run.load; allow_unfinished=True for a
                                                 # run still training
    a.token_values(episode)                      # one row per action token: text, p_theta, pi_phi, ratio
    a.next_token_values(episode, top_k=5)        # the most likely next tokens after the last turn
    a.heatmap(episode)                           # matplotlib figure: ratio per action token
    a.play(seed=0, beta=4.0)                     # an episode played by the extracted policy

Episodes are dicts in the JSONL format (`qsft_jax.data.episodes`). Token values come from one forward pass of
each model over the data layer's own arrays (`data.episodes_to_batch`), so the tokens, positions and
the action mask are exactly those of training: for action token i, p_theta(x_i) and pi_phi(x_i) are
read from row i - 1 (`diagnostics.taken_logprobs`), over the real vocabulary. The ratio
p_theta / pi_phi is the model's estimate of Q(s, a) for that token (docs/algorithm.md section 3).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qsft_jax import diagnostics, losses
from qsft_jax import run as run_lib
from qsft_jax import storage
from qsft_jax.data import DataConfig, episodes_to_batch, mdp
from qsft_jax.envs.base import ACTION_STOP
from qsft_jax.evaluate import evaluate_policies, history_tokens, policy_sampler, suppressed_token_ids
from qsft_jax.models.config import ModelConfig
from qsft_jax.models.transformer import Transformer
from qsft_jax.sampler import next_power_of_two


@functools.partial(jax.jit, static_argnums=(0, 5))
def _real_log_probs(model_config: ModelConfig, params, tokens, positions, segment_ids, lora=None):
  """[B, L] inputs -> log-probabilities over the real vocabulary [B, L, V_pad] (-inf on padding)."""
  logits = Transformer(model_config, lora=lora).apply(params, tokens, positions, segment_ids)
  return losses.real_log_softmax(logits, model_config.vocab_size)


@dataclasses.dataclass
class Analysis:
  """A loaded run: models, tokenizer and data config. theta_params is None after phase 1 only (then
  p_theta and ratio are None in every result). targets: the run's target settings (the ratio
  policy's support_min; the dummy token, which like the tokenizer's pad, BOS and EOS is never played
  and never listed as a next token: `evaluate.suppressed_token_ids`, the rule evaluation plays by).
  Built from a `qsft_jax.run.Run` by `from_loaded`."""
  model_config: ModelConfig
  tokenizer: Any
  behaviour_params: Any
  theta_params: Any
  data_config: DataConfig
  env_name: str = ""
  env_kwargs: Mapping | None = None
  targets: losses.TargetConfig = losses.TargetConfig()
  mesh: Any = None
  rules: Any = None
  lora: Any = None  # the run's LoraConfig when the parameter sets are LoRA variables

  def __post_init__(self):
    self._sampler = None

  # ------------------------------------------------------------------ per-token values
  def token_values(self, episode: Mapping) -> list[dict]:
    """One dict per action token of `episode`, in order: index (token position, BOS = 0), turn (action
    turn index), token (id), text (decoded token), p_theta, pi_phi, ratio = p_theta / pi_phi, and
    return_to_go (the observed transformed return from this token, as the data layer computes it)."""
    batch = episodes_to_batch([episode], self.data_config, self.tokenizer, pack=False)
    log_pi = diagnostics.taken_logprobs(self.model_config, self.behaviour_params, batch, lora=self.lora)[0]
    log_p = (None if self.theta_params is None else
             diagnostics.taken_logprobs(self.model_config, self.theta_params, batch, lora=self.lora)[0])
    out = []
    for i in np.flatnonzero(batch["action_mask"][0]):
      tok = int(batch["tokens"][0, i])
      pi = float(np.exp(log_pi[i]))
      p = None if log_p is None else float(np.exp(log_p[i]))
      out.append({"index": int(i), "turn": int(batch["turn_index"][0, i]), "token": tok,
                  "text": self.tokenizer.decode([tok]), "p_theta": p, "pi_phi": pi,
                  "ratio": None if log_p is None else float(np.exp(log_p[i] - log_pi[i])),
                  "return_to_go": float(batch["returns_to_go"][0, i])})
    return out

  def next_token_values(self, episode: Mapping, top_k: int = 10, by: str | None = None) -> list[dict]:
    """The top_k next tokens after the episode's last turn (the state where the agent acts next),
    ranked by `by` ("theta" (default when theta exists), "phi" or "ratio"); each dict has token,
    text, p_theta, pi_phi, ratio. Only tokens a policy may emit are ranked: the dummy token and the
    tokenizer's special tokens (`evaluate.suppressed_token_ids`) are left out; the probabilities are
    still over the whole real vocabulary (they need not sum to 1 over the listed tokens)."""
    by = by or ("phi" if self.theta_params is None else "theta")
    if by not in ("theta", "phi", "ratio") or (by != "phi" and self.theta_params is None):
      raise ValueError(f"by={by!r}: expected 'theta', 'phi' or 'ratio' (the last two need theta_params)")
    ids = history_tokens(episode["turns"], self.tokenizer, self.data_config)
    n = len(ids)
    width = max(16, next_power_of_two(n))
    tokens = np.full((1, width), self.tokenizer.pad_id, np.int32)
    tokens[0, :n] = ids
    positions = np.arange(width, dtype=np.int32)[None]
    segments = (positions < n).astype(np.int32)  # right padding: causal attention never sees it

    def last_row(params):
      return np.asarray(_real_log_probs(self.model_config, params, tokens, positions, segments,
                                        self.lora))[0, n - 1]

    log_pi = last_row(self.behaviour_params)[:self.model_config.vocab_size]
    log_p = None if self.theta_params is None else last_row(self.theta_params)[:self.model_config.vocab_size]
    key = {"phi": log_pi, "theta": log_p, "ratio": None if log_p is None else log_p - log_pi}[by]
    allowed = np.ones(len(key), bool)
    keep = mdp.action_stops(self.tokenizer, self.data_config.mdp, ACTION_STOP).token_ids
    allowed[[i for i in suppressed_token_ids(self.tokenizer, self.targets.dummy_token, keep) if i < len(key)]] = False
    candidates = np.flatnonzero(allowed)
    order = candidates[np.argsort(-key[candidates], kind="stable")][:top_k]
    return [{"token": int(t), "text": self.tokenizer.decode([int(t)]),
             "p_theta": None if log_p is None else float(np.exp(log_p[t])), "pi_phi": float(np.exp(log_pi[t])),
             "ratio": None if log_p is None else float(np.exp(log_p[t] - log_pi[t]))} for t in order]

  # ------------------------------------------------------------------ pictures
  def heatmap(self, episode: Mapping, *, vmax: float = 4.0, chars_per_line: int = 80, ax=None):
    """A matplotlib figure of the episode's text, one box per token, action tokens coloured by
    log2(p_theta / pi_phi) (red below 1, blue above; clipped at +-log2(vmax)), observations grey."""
    import matplotlib.pyplot as plt
    from matplotlib import colors

    batch = episodes_to_batch([episode], self.data_config, self.tokenizer, pack=False)
    n = int((batch["segment_ids"][0] > 0).sum())
    values = {v["index"]: v for v in self.token_values(episode)}
    norm = colors.Normalize(-np.log2(vmax), np.log2(vmax))
    cmap = plt.get_cmap("RdBu")
    cells, x, y = [], 0, 0
    for i in range(1, n):  # skip the BOS
      text = self.tokenizer.decode([int(batch["tokens"][0, i])])
      shown = text.replace("\n", "\u21b5") or " "
      if x + len(shown) > chars_per_line:
        x, y = 0, y + 1
      value = values.get(i)
      colour = "#dddddd"
      if value is not None and value["ratio"] is not None:
        colour = cmap(norm(np.clip(np.log2(max(value["ratio"], 1e-30)), norm.vmin, norm.vmax)))
      elif value is not None:
        colour = "#ffe9a8"  # action token without theta
      cells.append((x, y, shown, colour))
      x += len(shown)
      if "\n" in text:
        x, y = 0, y + 1
    lines = y + 1
    if ax is None:
      fig, ax = plt.subplots(figsize=(max(6.0, 0.12 * chars_per_line), 0.3 * lines + 0.8))
    else:
      fig = ax.figure
    for x, y, shown, colour in cells:
      ax.text(x, -y, shown, family="monospace", fontsize=9, va="center", ha="left",
              bbox=dict(boxstyle="square,pad=0.05", facecolor=colour, edgecolor="none"))
    ax.set_xlim(-1, chars_per_line + 1)
    ax.set_ylim(-lines, 1)
    ax.axis("off")
    if self.theta_params is not None:
      mappable = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
      fig.colorbar(mappable, ax=ax, label="log2 p_theta / pi_phi", fraction=0.03)
    ax.set_title("per-token p_theta / pi_phi on action tokens")
    return fig

  # ------------------------------------------------------------------ acting
  def play(self, env_name: str | None = None, seed: int = 0, beta: float = 4.0, *, mode: str = "extract",
           temperature: float = 0.0, max_new_tokens: int = 16, env_kwargs: Mapping | None = None) -> dict:
    """One episode of `env_name` (default: the run's task) from `seed`, played by the extracted policy
    (mode "extract" with `beta`; beta 0 = BC) or mode "ratio"/"theta"; greedy unless temperature > 0.
    The dummy token and the tokenizer's special tokens are never emitted, as in evaluation.
    Returns the episode dict (meta has return in original units, success)."""
    env_name = env_name or self.env_name
    if not env_name:
      raise ValueError("no environment: pass env_name")
    kwargs = dict(self.env_kwargs or {}) if env_kwargs is None and env_name == self.env_name else dict(env_kwargs or {})
    if self._sampler is None:  # kept over calls (its compiled programs); evaluation grows its cache
      self._sampler = policy_sampler(self.model_config, self.tokenizer, self.data_config, max_new_tokens,
                                     mesh=self.mesh, rules=self.rules, lora=self.lora)
    record: dict = {}
    evaluate_policies(env_name, kwargs, self.model_config, self.tokenizer, self.behaviour_params, self.theta_params,
                      policies=[{"name": "play", "mode": mode, "beta": float(beta)}], episodes=1, seed=seed,
                      data_config=self.data_config, batch_size=1, max_new_tokens=max_new_tokens,
                      temperature=temperature, targets=self.targets, sampler=self._sampler, record=record)
    return record["play"][0]


def format_table(rows: Sequence[Mapping], keys: Sequence[str] | None = None) -> str:
  """Rows of dicts as a fixed-width text table (floats with 4 significant digits)."""
  if not rows:
    return "(no rows)"
  keys = list(keys or rows[0].keys())

  def cell(v):
    if v is None:
      return "-"
    if isinstance(v, float):
      return f"{v:.4g}"
    return repr(v) if isinstance(v, str) else str(v)

  table = [[cell(r.get(k)) for k in keys] for r in rows]
  widths = [max(len(k), *(len(t[j]) for t in table)) for j, k in enumerate(keys)]
  lines = ["  ".join(k.rjust(w) for k, w in zip(keys, widths))]
  lines += ["  ".join(c.rjust(w) for c, w in zip(t, widths)) for t in table]
  return "\n".join(lines)


def from_loaded(loaded: run_lib.Run) -> Analysis:
  """An Analysis of a loaded run (`qsft_jax.run.load`): its phi and theta (the qsft phase's)."""
  config = loaded.config
  return Analysis(
      model_config=loaded.model_config, tokenizer=loaded.tokenizer,
      behaviour_params=loaded.behaviour_params, theta_params=loaded.theta_params,
      data_config=loaded.data_config, env_name=config.get("task", ""),
      env_kwargs=dict(config.get("env", {})), targets=loaded.targets, mesh=loaded.mesh,
      rules=loaded.rules, lora=loaded.lora)


def load(workdir: str, allow_unfinished: bool = False) -> Analysis:
  """The latest checkpoints of a finished workdir (`qsft_jax.run.load`) as an `Analysis`.

  A run with phases that have not reached their configured steps is refused
  (`run.UnfinishedRunError`, naming each phase, its checkpoint step and its steps);
  allow_unfinished=True loads their latest checkpoints with a warning."""
  run_lib.check_finished(storage.normalize(workdir), run_lib.read_config(workdir),
                         allow_unfinished=allow_unfinished, override="allow_unfinished=True")
  return from_loaded(run_lib.load(workdir))
