"""The smallest end-to-end run: for tests and for checking an installation (about a minute on 2 cores).

    python -m qsft_jax.main --config=configs/tiny.py --workdir=/tmp/qsft_tiny

Generates 64 maze episodes, trains a 2-layer character model for 8 BC and 8 Q-SFT steps, and
evaluates on a few episodes. Expect nothing learned: it checks the machinery, not the method.
"""
from qsft_jax import config_lib


def get_config():
  c = config_lib.base_config()
  c.task = "maze"
  c.dataset.num_episodes = 64
  c.dataset.heldout_episodes = 16
  c.data.max_length = 128
  c.data.reward_transform = "terminal_return:-40,-1"
  c.model.preset = "tiny-llama"
  c.model.overrides = {"d_model": 32, "num_heads": 2, "num_kv_heads": 1, "head_dim": 16, "mlp_dim": 64}
  c.bc.steps = c.qsft.steps = 8
  c.bc.batch_size = c.qsft.batch_size = 8
  c.bc.warmup_steps = c.qsft.warmup_steps = 2
  for phase in (c.mc, c.ilql):  # --config.phases="('bc','mc','ilql')": the value-head baselines
    phase.steps, phase.batch_size, phase.warmup_steps = 8, 8, 2
  # --config.phases="('bc','filtered_bc')": BC on the top 10% of episodes by return
  c.filtered_bc.steps, c.filtered_bc.batch_size, c.filtered_bc.warmup_steps = 8, 8, 2
  c.loss.chunk_size = 64
  c.checkpoint.every_steps = 4
  c.log.every_steps = 4
  c.log.progress_bar = False
  c.eval.episodes = 8
  c.eval.betas = (0.0, 4.0)
  c.eval.batch_size = 8
  return c
