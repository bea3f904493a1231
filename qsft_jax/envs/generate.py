"""Dataset generators for the bundled environments, and their command line.

    python -m qsft_jax.envs.generate --task maze --episodes 5000 --seed 0 --out maze.jsonl \\
        [--policy trap] [--opt key=value ...]

writes one episode per line (docs/algorithm.md section 1) and prints the episode count, the mean return in
the task's original units, the success rate and the generation speed (while it runs, the count, rate
and ETA go to stderr: `qsft_jax.progress`). ``--opt`` values are Python
literals where they parse as one (``max_steps=30``, ``traps={'4,1': 'd'}``), strings otherwise
(``actions=words``); each goes to the environment or the behaviour policy, whichever takes it.

Determinism: episode ``i`` of a dataset draws its environment seed and its policy's randomness from
``random.Random(f"{seed}/{i}")``, so a dataset is a function of (task, policy, options, seed), and its
first k episodes do not depend on how many are generated. ``meta["seed"]`` replays the environment
side: ``env.reset(meta["seed"])`` gives the episode's first observation again.
"""
from __future__ import annotations

import ast
import inspect
import json
import random
import time
from typing import Iterator, Sequence

from absl import flags

from qsft_jax import cli
from qsft_jax import progress
from qsft_jax import storage
from qsft_jax.envs.base import episode_summary, play_batch
from qsft_jax.envs.policies import POLICIES, BehaviourPolicy
from qsft_jax.envs.registry import ENVS, make_env


def _parameters(cls: type) -> set[str]:
    return {name for name in inspect.signature(cls.__init__).parameters if name != "self"}


def split_options(task: str, policy: str, options: dict) -> tuple[dict, dict]:
    """Split ``options`` into (environment kwargs, policy kwargs) by the constructors' parameters.

    An option that both take (``engine_path``) goes to both; one that neither takes is an error.
    """
    if task not in ENVS:
        raise ValueError(f"unknown task {task!r}; known: {sorted(ENVS)}")
    if (task, policy) not in POLICIES:
        known = sorted(name for t, name in POLICIES if t == task)
        raise ValueError(f"unknown behaviour policy {policy!r} for {task}; known: {known}")
    env_params, policy_params = _parameters(ENVS[task]), _parameters(POLICIES[(task, policy)])
    unknown = sorted(set(options) - env_params - policy_params)
    if unknown:
        raise ValueError(
            f"options {unknown} are taken neither by the {task} environment ({sorted(env_params)}) "
            f"nor by its {policy!r} policy ({sorted(policy_params)})"
        )
    env_kwargs = {k: v for k, v in options.items() if k in env_params}
    policy_kwargs = {k: v for k, v in options.items() if k in policy_params}
    return env_kwargs, policy_kwargs


def make_policy(task: str, policy: str, **kwargs) -> BehaviourPolicy:
    """The behaviour policy ``policy`` of ``task`` (see policies.py) built with ``kwargs``."""
    split_options(task, policy, {})  # validates the names
    return POLICIES[(task, policy)](**kwargs)


def generate_episodes(task: str, num_episodes: int, seed: int, policy: str = "paper", **options) -> Iterator[dict]:
    """Yield ``num_episodes`` episodes of ``task`` played by the behaviour policy ``policy``.

    ``options`` configure the environment and the policy (``split_options``). Each episode is a dict
    with exactly ``turns``, ``done``, ``id`` (``"{task}-{policy}-{seed}-{i}"``) and ``meta`` = {task,
    policy, seed (the environment's reset seed), return (original units), success, truncated}. The
    environment and the policy (chess engines) are closed when the iterator is exhausted or closed.
    """
    if isinstance(num_episodes, bool) or not isinstance(num_episodes, int) or num_episodes < 0:
        raise ValueError(f"num_episodes must be a non-negative int, got {num_episodes!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    env_kwargs, policy_kwargs = split_options(task, policy, options)
    env = make_env(task, **env_kwargs)
    try:
        behaviour = make_policy(task, policy, **policy_kwargs)
    except BaseException:
        env.close()
        raise
    try:
        for i in range(num_episodes):
            rng = random.Random(f"{seed}/{i}")
            env_seed = rng.getrandbits(31)

            def act(histories, rng=rng):
                if len(histories[0]) == 1:  # just reset: per-episode choices of the policy
                    behaviour.begin_episode(env, rng)
                return [behaviour.act(env, rng)]

            (episode,) = play_batch([env], [env_seed], act)
            episode["id"] = f"{task}-{policy}-{seed}-{i}"
            episode["meta"] = {"task": task, "policy": policy, **episode["meta"]}
            yield episode
    finally:
        behaviour.close()
        env.close()


def parse_option(text: str) -> tuple[str, object]:
    """``key=value`` -> (key, value), the value a Python literal when it parses as one, else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--opt needs key=value, got {text!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key.strip(), value


def define_flags() -> flags.FlagValues:
    fv = cli.new_flags()
    flags.DEFINE_enum("task", None, sorted(ENVS), "Bundled environment.", flag_values=fv)
    flags.DEFINE_integer("episodes", None, "Episodes to generate.", lower_bound=0, flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Dataset seed (episode i draws from random.Random(f'{seed}/{i}')).",
                         flag_values=fv)
    flags.DEFINE_string("out", None, "JSONL file to write.", flag_values=fv)
    flags.DEFINE_string("policy", "paper", "Behaviour policy: "
                        + ", ".join(f"{t}/{p}" for t, p in sorted(POLICIES)) + ".", flag_values=fv)
    flags.DEFINE_multi_string("opt", [], "KEY=VALUE for the environment or the policy.",
                              flag_values=fv)
    return fv


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m qsft_jax.envs.generate``; argv as sys.argv holds it (the program name first)."""
    prog = "python -m qsft_jax.envs.generate"
    fv = define_flags()
    cli.parse(fv, argv, prog=prog, doc=__doc__, required=["task", "episodes", "out"])
    try:
        options = dict(parse_option(item) for item in fv.opt)
        split_options(fv.task, fv.policy, options)
    except ValueError as e:
        cli.usage_error(prog, str(e))
    start = time.perf_counter()
    stats = []
    with storage.path(fv.out).open("w") as f:  # a local path or a URL
        episodes = generate_episodes(fv.task, fv.episodes, fv.seed, policy=fv.policy, **options)
        for episode in progress.track(episodes, fv.episodes, f"{fv.task}/{fv.policy}", "episodes"):
            f.write(json.dumps(episode) + "\n")
            stats.append({"meta": episode["meta"]})
    seconds = time.perf_counter() - start
    summary = episode_summary(stats)
    print(
        f"{fv.task}/{fv.policy}: wrote {summary['episodes']} episodes to {fv.out}; "
        f"mean return {summary['mean_return']:.3f} (original units), success rate {summary['success_rate']:.3f}, "
        f"{summary['episodes'] / max(seconds, 1e-9):.1f} episodes/s"
    )
    print(json.dumps({"task": fv.task, "policy": fv.policy, **summary, "seconds": round(seconds, 2)}))
    return 0


if __name__ == "__main__":
    cli.run(main)
