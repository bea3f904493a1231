"""The data layer: episode format and validation, reward transforms, token-level MDP arrays, packing,
the grain input pipeline and TFDS builders. ``python -m qsft_jax.data validate PATH...`` checks files.

Public API (see each module for details):

- ``DataConfig`` (fields documented in ``loading.py``), ``RewardTransform``, ``MDPConfig``;
- ``load_episodes(paths, config, tokenizer=None) -> LoadedEpisodes``;
  ``validate_paths(paths, config, tokenizer=None) -> (problems, summary)``;
- ``preflight(config, tokenizer) -> Summary``: the trainer's check of every training episode before its
  first step (``check.py``); raises ``EpisodeError`` / ``DataError`` (both ``UserError``s);
- ``episodes_to_batch(episodes, config, tokenizer) -> dict[str, np.ndarray [B, L]]``;
- ``make_train_iterator(config, tokenizer, *, process_index, process_count, batch_size_per_process, seed)``
  and ``iterator_state(it)`` / ``restore_iterator(it, state)`` (``pipeline.py``);
- ``pipeline.top_return_source(config, tokenizer, top_fraction) -> (source, ReturnSelection)``: the records whose
  first-action return is in the top fraction (filtered BC; ``pipeline.py``, ``loading.select_top_returns``).
"""
from qsft_jax.data.episodes import DataError, Episode, EpisodeError, Problem, Turn, parse_episode, parse_line, resolve_paths, write_jsonl
from qsft_jax.data.loading import DataConfig, Dropped, EpisodeProcessor, LoadedEpisodes, ReturnSelection, Summary, episodes_to_batch, load_episodes, validate_paths
from qsft_jax.data.mdp import ARRAY_SPECS, MDPConfig
from qsft_jax.data.rewards import RewardTransform
from qsft_jax.data.check import preflight
