"""Evaluation: play a bundled environment with BC, Q-SFT extraction at several beta, and the ratio policy.

    python -m qsft_jax.evaluate --workdir=DIR [--episodes N] [--seed S] [--betas 0,1,4,16]
        [--batch_size B] [--max_new_tokens T] [--temperature 0] [--no_ratio] [--dataset_mean_return X]
        [--allow_unfinished]

A run whose phases have not all reached their configured steps (no DONE marker) is refused, naming
each such phase, its checkpoint step and its steps; --allow_unfinished evaluates its latest
checkpoints anyway, with a warning, and results.json lists those phases. SIGTERM stops an evaluation
before its next batch of actions: exit status 143, one line on stderr, and no results.json written.

Every policy plays the same N episodes: episode i resets its environment with seed S + i. A policy acts
through `qsft_jax.sampler.Sampler`: each history (the episode's turns so far, ending with an
observation) becomes prompt tokens exactly as the data layer tokenises training episodes
(`qsft_jax.data.mdp.prompt_tokens`; plain format: BOS, then each turn's text through the data config's
templates, encoded separately and concatenated; chat format: the chat template's rendering with the
generation prompt), and the continuation ends at the format's stop (`mdp.action_stops`; plain: cut
after the environment's action stop string "\\n"; chat: the end-of-turn token, the message content
then sent with the stop string, `mdp.action_text`). The tokens of `suppressed_token_ids` are never
emitted (the tokenizer's pad, BOS and EOS, which no plain-format training action holds, other than a
chat end-of-turn token, and the Q-SFT dummy token), and an action that decodes to no text is sent as
an empty line (the stop string).

Policies (names in results.json):
- "bc": extraction with beta = 0, i.e. pi_phi alone (theta never runs);
- "qsft_beta{b}": log_softmax(z_phi) + b * softmax(z_theta), for each b > 0 of --betas;
- "ratio": greedy argmax of p_theta / pi_phi over pi_phi's support (qsft.support_min);
- "control_beta{b}" and "control_ratio": the same with theta from the control phase (every target 1,
  docs/algorithm.md section 7), when the run has one.
No policy emits qsft.dummy_token (it carries 1 - w of the training targets, not an action).
Without theta (only phase 1 done) only "bc" is played. Decoding is greedy by default
(--temperature > 0 samples instead; "ratio" is always greedy).

Writes DIR/eval/results.json:

    {"env": NAME, "episodes": N, "dataset_mean_return": x,
     "policies": {NAME: {"mean_return": x, "stderr": x, "success_rate": x, "beta": x}},
     "checkpoint_steps": {"phi": n, "theta": n, "theta_bar": n, "control": n},
     "unfinished_phases": [{"phase": NAME, "step": n, "steps": n}],
     "value_correlation": {"qsft" | "control": {"all_turns": x, "turn0": x}}}

checkpoint_steps: the step of the checkpoint each evaluated parameter set was read from (null for a
set the run does not have); unfinished_phases: the configured phases that had not reached their
steps (empty for a finished run).

value_correlation (when the run has held-out episodes, WORKDIR/data/heldout.jsonl): the correlation of
p_theta / pi_phi at each turn's first action token with the observed return-to-go
(`qsft_jax.diagnostics`; the full diagnostics in DIR/eval/value_diagnostics[_control].{json,png}).

with returns in the task's original units (the environments report them so; rewards are only
transformed for training), stderr = sample standard deviation (ddof = 1) / sqrt(N) (null for N = 1),
beta null for "ratio"; the same as a markdown table in DIR/eval/results.md, and each policy's episodes
in DIR/eval/episodes_NAME.jsonl.

The same figures go to TensorBoard in DIR/eval/tensorboard (unless log.tensorboard is off), beside
the phases' DIR/<phase>/tensorboard, each at the step of the checkpoint its parameters were read
from (`write_tensorboard`). While it plays, each policy's episodes done, their rate and the ETA go to
stderr (`qsft_jax.progress`).
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
from typing import Any, Callable, Mapping, Sequence

from absl import flags
import jax
import numpy as np

from qsft_jax import cli
from qsft_jax import losses
from qsft_jax import progress
from qsft_jax import run as run_lib
from qsft_jax import storage
from qsft_jax.data import DataConfig, load_episodes
from qsft_jax.data import mdp
from qsft_jax.envs import make_env, play_batch
from qsft_jax.sampler import Sampler

DEFAULT_BETAS = (0.0, 1.0, 4.0, 16.0)
SIGTERM_EXIT_STATUS = 143  # 128 + SIGTERM, as the trainer exits on preemption


class EvaluationInterrupted(SystemExit):
  """SIGTERM arrived during an evaluation: it stopped before its next batch of actions, with nothing
  written as results.json. A SystemExit with status 143: a program ends quietly after the one line
  `StopOnSigterm.check` printed."""


class StopOnSigterm:
  """While entered (in the main thread), SIGTERM sets a flag that `check` turns into
  EvaluationInterrupted; the previous handler (the trainer's preemption flag, which evaluation never
  polls) comes back on exit.

      with StopOnSigterm(workdir) as stop:
        ...
        stop.check("policy 'bc'")  # between batches of actions
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.received = False
    self._previous: Any = None
    self._installed = False

  def __enter__(self) -> StopOnSigterm:
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handler)
      self._installed = True
    except ValueError:  # not the main thread (a notebook's worker): no handler, nothing to poll
      pass
    return self

  def __exit__(self, *exc) -> None:
    if self._installed:
      signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)

  def _handler(self, signum, frame) -> None:
    self.received = True

  def check(self, where: str) -> None:
    """Raises EvaluationInterrupted (after one line on stderr) when SIGTERM has arrived."""
    if not self.received:
      return
    results = os.path.join(self.workdir, "eval", "results.json")
    sys.stderr.write(f"evaluate: SIGTERM: evaluation interrupted during {where}; nothing was written "
                     f"as {results} (run python -m qsft_jax.evaluate --workdir={self.workdir} to "
                     "evaluate again)\n")
    sys.stderr.flush()
    raise EvaluationInterrupted(SIGTERM_EXIT_STATUS)


def history_tokens(history: Sequence[Mapping[str, Any]], tokenizer, data_config: DataConfig) -> list[int]:
  """Prompt token ids of a history (turn dicts of the episode format): `mdp.prompt_tokens`, the data
  layer's own path, so acting sees the token sequences training saw (plain: BOS + each templated turn
  encoded separately; chat: the template's rendering with the generation prompt)."""
  return mdp.prompt_tokens(history, tokenizer, data_config.mdp)


def suppressed_token_ids(tokenizer, dummy_token: int | None = None, keep: Sequence[int] = ()) -> list[int]:
  """Sorted token ids no policy may emit and no next-action ranking may list: the tokenizer's pad, BOS
  and EOS (plain-format training actions never hold them: the data layer adds only a BOS, in front) and
  the Q-SFT dummy token when there is one (`TargetConfig.dummy_token`: all of 1 - w of every training
  target goes there, so p_theta puts much of its mass on it, but it is no action; docs/algorithm.md
  section 3), except the ids of `keep`: the format's stop token ids (`mdp.action_stops`; in chat format
  the end-of-turn token, which ends every training action and is often the tokenizer's EOS).
  Evaluation, `qsft_jax.analysis.Analysis.play` and `Analysis.next_token_values` all use this one rule."""
  ids = {int(tokenizer.pad_id), int(tokenizer.bos_id), int(tokenizer.eos_id)}
  if dummy_token is not None:
    ids.add(int(dummy_token))
  return sorted(i for i in ids if i >= 0 and i not in set(keep))


def generate_actions(sampler: Sampler, behaviour_params, theta_params, prompts: Sequence[Sequence[int]], tokenizer,
                     data_config: DataConfig, env_stop: str, **kwargs) -> list[str]:
  """The action text the environment receives for each prompt (`mdp.action_text`), generated until the
  format's stops (`mdp.action_stops`): plain, the env's stop string; chat, the end-of-turn token, whose
  message content (the tokens before it, decoded) is the action. kwargs: `Sampler.decode`'s."""
  stops = mdp.action_stops(tokenizer, data_config.mdp, env_stop)
  if stops.token_ids:
    seqs = sampler.generate(behaviour_params, theta_params, prompts, stop_token_ids=stops.token_ids, **kwargs)
    texts = [tokenizer.decode(s[:-1] if s and s[-1] in stops.token_ids else s) for s in seqs]
  else:
    texts = sampler.generate_text(behaviour_params, theta_params, prompts, tokenizer,
                                  stop_strings=stops.strings, **kwargs)
  return [mdp.action_text(t, data_config.mdp, env_stop) for t in texts]


def policy_specs(betas: Sequence[float], ratio: bool = True, have_theta: bool = True,
                 have_control: bool = False) -> list[dict]:
  """[{"name", "mode", "beta", "theta"}]: "bc" for beta 0, "qsft_beta{b}" for each b > 0, then
  "ratio"; with the control, "control_beta{b}" and "control_ratio" after them. "theta" names the
  parameters a policy reads ("theta" or "control"). Without theta only "bc"."""
  specs = [{"name": "bc", "mode": "extract", "beta": 0.0, "theta": "theta"}]
  for b in betas:
    if b < 0:
      raise ValueError(f"beta={b} must be >= 0")
  for source, prefix, present in (("theta", "qsft", have_theta), ("control", "control", have_control)):
    if not present:
      continue
    specs += [{"name": f"{prefix}_beta{b:g}", "mode": "extract", "beta": float(b), "theta": source}
              for b in betas if b > 0]
    if ratio:
      specs.append({"name": "ratio" if source == "theta" else "control_ratio", "mode": "ratio",
                    "beta": None, "theta": source})
  return specs


def summarize(returns: Sequence[float], successes: Sequence[bool]) -> dict:
  """mean_return, stderr (ddof = 1 standard deviation / sqrt(n); None for n < 2), success_rate."""
  r = np.asarray(returns, np.float64)
  n = len(r)
  if n == 0:
    raise ValueError("no episodes to summarize")
  stderr = float(r.std(ddof=1) / math.sqrt(n)) if n > 1 else None
  return {"mean_return": float(r.mean()), "stderr": stderr, "success_rate": float(np.mean(successes))}


def dataset_mean_return(paths, data_config: DataConfig | Mapping | None = None) -> float:
  """Mean undiscounted episode return in original units (sum of the action turns' rewards) of JSONL files."""
  loaded = load_episodes(paths, DataConfig.from_config(data_config))
  if not loaded.episodes:
    raise ValueError(f"no episodes in {paths}")
  return float(np.mean([sum(t.reward for t in ep.turns if t.action) for ep in loaded.episodes]))


def policy_sampler(model_config, tokenizer, data_config: DataConfig, max_new_tokens: int, *, batch_size: int = 1,
                   mesh=None, rules=None, lora=None) -> Sampler:
  """The sampler policies act through, in evaluation and in `analysis.Analysis.play`: a KV cache of
  min(max_position_embeddings, 2 * data_config.max_length) + max_new_tokens slots (a policy's episode may
  run longer than the training rows, e.g. more wall bumps), which `evaluate_policies` grows with
  `Sampler.fit` when a history outgrows it (an untrained policy's actions can each run to
  max_new_tokens); one batch bucket of batch_size rows, so episodes ending early recompile nothing."""
  cache_len = min(model_config.max_position_embeddings, 2 * data_config.max_length) + max_new_tokens
  return Sampler(model_config, mesh=mesh, rules=rules, pad_id=tokenizer.pad_id, cache_len=cache_len,
                 min_batch_bucket=batch_size, lora=lora)


def evaluate_policies(env_name: str, env_kwargs: Mapping | None, model_config, tokenizer, behaviour_params,
                      theta_params, *, policies: Sequence[Mapping], episodes: int, seed: int,
                      data_config: DataConfig | Mapping | None = None, batch_size: int = 64,
                      max_new_tokens: int = 16, temperature: float = 0.0,
                      targets: losses.TargetConfig = losses.TargetConfig(),
                      dataset_mean_return: float | None = None, mesh=None, rules=None,
                      sampler: Sampler | None = None, record: dict | None = None,
                      control_params=None, interrupt: Callable[[str], None] | None = None,
                      lora=None) -> dict:
  """Plays `episodes` episodes (seeds seed .. seed + episodes - 1) with every policy of `policies`
  ({"name", "mode", "beta"}, see `policy_specs`) and returns the results.json dict.

  data_config: the training data config (templates, max_length); temperature 0 = greedy.
  `record`, when a dict, receives each policy's played episodes (name -> list of episode dicts).
  control_params: theta of the control phase, read by specs with "theta": "control".
  targets: the run's target settings: the "ratio" policy's support is pi_phi >= targets.support_min,
  and no policy emits targets.dummy_token or another id of `suppressed_token_ids`.
  interrupt: called with a description of where the evaluation is before every batch of actions;
    it raises to stop the evaluation (`StopOnSigterm.check`).
  lora: the LoraConfig when the parameter sets are LoRA variables (`Sampler`).
  sampler: a `policy_sampler` to reuse (with its compiled programs) over several calls; default a new
    one. Its cache grows in place (`Sampler.fit`) before any batch of actions whose histories outgrow it.
  """
  if episodes < 1:
    raise ValueError(f"episodes={episodes} must be >= 1")
  data_config = DataConfig.from_config(data_config)
  env_kwargs = dict(env_kwargs or {})
  seeds = [seed + i for i in range(episodes)]
  envs = [make_env(env_name, **env_kwargs) for _ in range(min(batch_size, episodes))]
  stop = envs[0].action_stop
  suppress = suppressed_token_ids(tokenizer, targets.dummy_token,
                                  keep=mdp.action_stops(tokenizer, data_config.mdp, stop).token_ids)
  if sampler is None:
    sampler = policy_sampler(model_config, tokenizer, data_config, max_new_tokens, batch_size=len(envs),
                             mesh=mesh, rules=rules, lora=lora)
  results = {"env": env_name, "episodes": episodes, "dataset_mean_return": dataset_mean_return, "policies": {}}
  try:
    for spec in policies:
      calls = [0]

      theta = control_params if spec.get("theta", "theta") == "control" else theta_params
      needs_theta = spec["mode"] != "extract" or (spec["beta"] or 0.0) > 0
      if needs_theta and theta is None:
        raise ValueError(f"policy {spec['name']!r} needs {spec.get('theta', 'theta')} parameters")

      def act(histories, spec=spec, calls=calls, theta=theta):
        if interrupt is not None:
          interrupt(f"policy {spec['name']!r}")
        prompts = [history_tokens(h, tokenizer, data_config) for h in histories]
        rng = jax.random.fold_in(jax.random.key(seed), calls[0])
        calls[0] += 1
        # An action that decodes to nothing is an empty line (`mdp.action_text`): the same for the
        # environment, and it still tokenises (the data layer rejects actions without tokens).
        return generate_actions(
            sampler.fit(max(map(len, prompts)), max_new_tokens), behaviour_params, theta, prompts, tokenizer,
            data_config, stop, mode=spec["mode"], beta=0.0 if spec["beta"] is None else spec["beta"],
            greedy=temperature <= 0, temperature=temperature if temperature > 0 else 1.0,
            support_min=targets.support_min, max_new_tokens=max_new_tokens, suppress_token_ids=suppress,
            rng=rng)

      played = []
      with progress.Progress(episodes, f"evaluate {spec['name']}", "episodes") as bar:
        for start in range(0, episodes, len(envs)):
          chunk = seeds[start:start + len(envs)]

          def act_and_count(histories, end=start + len(chunk)):
            bar.update_to(end - len(histories))  # play_batch passes the histories still running
            bar.set_postfix(playing=len(histories), turn=(len(histories[0]) + 1) // 2)
            return act(histories)
          played.extend(play_batch(envs[:len(chunk)], chunk, act_and_count))
          bar.update_to(len(played))
      summary = summarize([ep["meta"]["return"] for ep in played], [ep["meta"]["success"] for ep in played])
      results["policies"][spec["name"]] = {**summary, "beta": spec["beta"]}
      if record is not None:
        record[spec["name"]] = played
  finally:
    for env in envs:
      env.close()
  return results


def results_markdown(results: Mapping) -> str:
  """The results dict as a markdown table (returns in original units)."""
  def fmt(x):
    return "n/a" if x is None else f"{x:.3f}"

  corr = results.get("value_correlation") or {}

  def corr_cells(name):
    c = corr.get("control" if name.startswith("control") else "qsft") if name != "bc" else None
    return "- | -" if c is None else f"{fmt(c['all_turns'])} | {fmt(c['turn0'])}"

  lines = [f"# Evaluation: {results['env']}, {results['episodes']} episodes per policy", "",
           f"Dataset mean return: {fmt(results['dataset_mean_return'])}", ""]
  steps = {k: v for k, v in (results.get("checkpoint_steps") or {}).items() if v is not None}
  if steps:
    lines += ["Checkpoint steps: " + ", ".join(f"{k} {v}" for k, v in steps.items()), ""]
  for p in results.get("unfinished_phases") or ():
    at = "no checkpoint" if p["step"] is None else f"checkpoint step {p['step']}"
    lines += [f"Unfinished: phase {p['phase']} ({at} of {p['steps']} steps)", ""]
  lines += ["| policy | beta | mean return | stderr | success rate | value corr. (all turns) | "
            "value corr. (turn 0) |", "| --- | --- | --- | --- | --- | --- | --- |"]
  for name, r in results["policies"].items():
    beta = "-" if r["beta"] is None else f"{r['beta']:g}"
    lines.append(f"| {name} | {beta} | {fmt(r['mean_return'])} | {fmt(r['stderr'])} | "
                 f"{fmt(r['success_rate'])} | {corr_cells(name)} |")
  if corr:
    lines += ["", "value corr.: correlation of p_theta / pi_phi (first action token of each turn) with "
              "the observed return-to-go on the held-out episodes; the control's theta learns no values."]
  return "\n".join(lines) + "\n"


def write_results(workdir: str, results: Mapping, record: Mapping | None = None) -> str:
  """Writes WORKDIR/eval/results.json, results.md and (with `record`) episodes_NAME.jsonl, each whole
  (written aside, then renamed), results.json last; returns the eval directory."""
  out = os.path.join(workdir, "eval")
  storage.path(out).mkdir(parents=True, exist_ok=True)

  def write(name: str, text: str) -> None:  # whole files only (a local path or a URL)
    storage.write_text_atomic(os.path.join(out, name), text)

  for name, played in (record or {}).items():
    write(f"episodes_{name}.jsonl", "".join(json.dumps(ep) + "\n" for ep in played))
  write("results.md", results_markdown(results))
  write("results.json", json.dumps(results, indent=1))  # last: results.json means a whole evaluation
  return out


def checkpoint_step_of(policy: str, checkpoint_steps: Mapping[str, int | None]) -> int | None:
  """The checkpoint step of the parameters a policy of `policy_specs` acts with: phi's for "bc", the
  control's for "control_*", theta's for the others."""
  if policy == "bc":
    return checkpoint_steps.get("phi")
  return checkpoint_steps.get("control" if policy.startswith("control") else "theta")


def write_tensorboard(workdir: str, results: Mapping) -> str:
  """Writes the results as TensorBoard scalars into WORKDIR/eval/tensorboard and returns that folder:
  eval/POLICY/{mean_return, stderr, success_rate} at the step of the policy's checkpoint
  (`checkpoint_step_of`; stderr left out for one episode), eval/qsft|control/{value_corr,
  value_corr_turn0} at theta's / the control's step, eval/dataset/mean_return at theta's step (phi's
  without theta). Steps missing from results["checkpoint_steps"] count as 0."""
  from tensorboardX import SummaryWriter

  steps = results.get("checkpoint_steps") or {}
  step = lambda s: int(s or 0)
  out = os.path.join(workdir, "eval", "tensorboard")
  with SummaryWriter(out) as writer:
    for name, r in results["policies"].items():
      at = step(checkpoint_step_of(name, steps))
      for key in ("mean_return", "stderr", "success_rate"):
        if r.get(key) is not None:
          writer.add_scalar(f"eval/{name}/{key}", float(r[key]), at)
    for name, corr in (results.get("value_correlation") or {}).items():
      at = step(steps.get("control" if name == "control" else "theta"))
      writer.add_scalar(f"eval/{name}/value_corr", float(corr["all_turns"]), at)
      writer.add_scalar(f"eval/{name}/value_corr_turn0", float(corr["turn0"]), at)
    if results.get("dataset_mean_return") is not None:
      at = step(steps.get("theta") if steps.get("theta") is not None else steps.get("phi"))
      writer.add_scalar("eval/dataset/mean_return", float(results["dataset_mean_return"]), at)
  return out


def training_data_paths(workdir: str, config) -> list[str]:
  """The training data files of a run: data.path, or the generated WORKDIR/data/train.jsonl."""
  path = config.data.get("path", "") if hasattr(config.data, "get") else ""
  if path:
    return list(path) if isinstance(path, (list, tuple)) else [path]
  generated = run_lib.data_files(workdir)["train"]
  return [generated] if storage.path(generated).exists() else []


def run(loaded: run_lib.Run, *, episodes: int | None = None, seed: int | None = None,
        betas: Sequence[float] | None = None, ratio: bool = True, batch_size: int | None = None,
        max_new_tokens: int | None = None, temperature: float = 0.0,
        dataset_return: float | None = None, control: bool = True, value_diagnostics: bool = True) -> dict:
  """Evaluates a loaded run (`qsft_jax.run.load(workdir)`) and writes the results into its workdir.

  Unset options come from the run's config (`eval.*`, `task`, `env`) and its target settings
  (`Run.targets`: the ratio policy's support_min, the dummy token never emitted).
  control: also play the control phase's policies when the run has one. value_diagnostics: add the
  held-out value correlations (and write their files) when WORKDIR/data/heldout.jsonl exists.
  The results (also in TensorBoard: `write_tensorboard`, unless log.tensorboard is off) record the
  checkpoint step of each parameter set and the configured phases that had not reached their steps
  (`evaluate_workdir` refuses those unless told otherwise). SIGTERM stops the evaluation before its
  next batch of actions with EvaluationInterrupted (exit status 143), writing no results.
  """
  config = loaded.config
  ev = config.get("eval", {}) if hasattr(config, "get") else {}
  task = config.task
  if not task:
    raise ValueError("config.task is empty: there is no environment to evaluate on")
  episodes = episodes or ev.get("episodes", 100)
  seed = ev.get("seed", 10000) if seed is None else seed
  betas = tuple(ev.get("betas", DEFAULT_BETAS)) if betas is None else tuple(betas)
  batch_size = batch_size or ev.get("batch_size", 64)
  max_new_tokens = max_new_tokens or ev.get("max_new_tokens", 16)
  if dataset_return is None:
    paths = training_data_paths(loaded.workdir, config)
    dataset_return = dataset_mean_return(paths, loaded.data_config) if paths else None
  control_params = loaded.control_params if control else None
  specs = policy_specs(betas, ratio=ratio, have_theta=loaded.theta_params is not None,
                       have_control=control_params is not None)
  unfinished = [p for p in run_lib.phase_progress(loaded.workdir, config) if not p.done]
  steps = {"phi": loaded.behaviour_step, "theta": loaded.theta_step, "theta_bar": loaded.target_step,
           "control": loaded.control_step if control_params is not None else None}
  if jax.process_index() == 0:
    print(f"evaluate: {loaded.workdir}: {episodes} episodes per policy ("
          f"{', '.join(s['name'] for s in specs)}); checkpoint steps "
          f"{', '.join(f'{k} {v}' for k, v in steps.items() if v is not None)}", flush=True)
  record: dict = {}
  with StopOnSigterm(loaded.workdir) as stop:
    results = evaluate_policies(
        task, dict(config.get("env", {})), loaded.model_config, loaded.tokenizer,
        loaded.behaviour_params, loaded.theta_params, policies=specs, episodes=episodes, seed=seed,
        data_config=loaded.data_config, batch_size=batch_size, max_new_tokens=max_new_tokens,
        temperature=temperature, targets=loaded.targets, dataset_mean_return=dataset_return,
        mesh=loaded.mesh, rules=loaded.rules, record=record, control_params=control_params,
        interrupt=stop.check, lora=loaded.lora)
    results["checkpoint_steps"] = steps
    results["unfinished_phases"] = [p.to_json() for p in unfinished]
    if value_diagnostics:
      stop.check("the value diagnostics")
      results["value_correlation"] = heldout_correlations(loaded, control=control)
    stop.check("the writing of the results")
    write_results(loaded.workdir, results, record)
    if config.get("log", {}).get("tensorboard", True) and jax.process_index() == 0:
      write_tensorboard(loaded.workdir, results)
  return results


def heldout_correlations(loaded: run_lib.Run, control: bool = True) -> dict:
  """{"qsft" | "control": {"all_turns", "turn0"}} from `diagnostics.heldout_value_diagnostics` (which
  writes DIR/eval/value_diagnostics[_control].{json,png}); {} without theta or held-out episodes.
  control: include the control phase's theta when the run has one."""
  from qsft_jax import diagnostics

  if not storage.path(run_lib.data_files(loaded.workdir)["heldout"]).exists():
    return {}
  out = {}
  for name, view in (("qsft", loaded),
                     ("control", loaded.with_theta(loaded.control_params, theta_step=loaded.control_step)
                      if control else None)):
    if view is None or view.theta_params is None:
      continue
    d = diagnostics.heldout_value_diagnostics(view, suffix="" if name == "qsft" else "_control")
    out[name] = {"all_turns": d["correlation"], "turn0": d["first_turn_correlation"]}
  return out


def evaluate_workdir(workdir: str, allow_unfinished: bool = False, **options) -> dict:
  """Loads the latest checkpoints of a workdir (`qsft_jax.run.load`) and runs `run` on them (options
  as `run`'s); what the command line does. A run with unfinished phases is refused
  (`run.UnfinishedRunError`, naming them) unless allow_unfinished."""
  workdir = storage.normalize(workdir)
  run_lib.check_finished(workdir, run_lib.read_config(workdir), allow_unfinished=allow_unfinished,
                         override="--allow_unfinished")
  return run(run_lib.load(workdir), **options)


def define_flags() -> flags.FlagValues:
  fv = cli.new_flags()
  flags.DEFINE_string("workdir", None, "Run directory of `python -m qsft_jax.main`.", flag_values=fv)
  flags.DEFINE_integer("episodes", None, "Episodes per policy [config eval.episodes].", flag_values=fv)
  flags.DEFINE_integer("seed", None, "First environment seed [config eval.seed].", flag_values=fv)
  flags.DEFINE_list("betas", None, "Comma-separated betas, e.g. 0,1,4,16 [config eval.betas].",
                    flag_values=fv)
  flags.DEFINE_integer("batch_size", None, "Episodes played together.", flag_values=fv)
  flags.DEFINE_integer("max_new_tokens", None, "Longest action in tokens.", flag_values=fv)
  flags.DEFINE_float("temperature", 0.0, "0 = greedy; > 0 samples.", flag_values=fv)
  flags.DEFINE_bool("ratio", True, "Play the greedy p_theta / pi_phi policy (--no_ratio skips it).",
                    flag_values=fv)
  flags.DEFINE_float("dataset_mean_return", None, "The dataset's mean return [read from the run's "
                     "training data].", flag_values=fv)
  flags.DEFINE_bool("allow_unfinished", False, "Evaluate the latest checkpoints of phases that have "
                    "not reached their configured steps (refused without it).", flag_values=fv)
  return fv


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m qsft_jax.evaluate`; argv as sys.argv holds it (the program name first)."""
  prog = "python -m qsft_jax.evaluate"
  fv = define_flags()
  cli.parse(fv, argv, prog=prog, doc=__doc__, required=["workdir"])
  try:
    betas = None if fv.betas is None else [float(b) for b in fv.betas if b.strip()]
  except ValueError:
    cli.usage_error(prog, f"--betas={','.join(fv.betas)}: not a comma-separated list of numbers")
  results = evaluate_workdir(fv.workdir, episodes=fv.episodes, seed=fv.seed, betas=betas,
                ratio=fv.ratio, batch_size=fv.batch_size, max_new_tokens=fv.max_new_tokens,
                temperature=fv.temperature, dataset_return=fv.dataset_mean_return,
                allow_unfinished=fv.allow_unfinished)
  print(results_markdown(results))
  print(f"wrote {os.path.join(fv.workdir, 'eval', 'results.json')}")
  return 0


if __name__ == "__main__":
  cli.run(main)
