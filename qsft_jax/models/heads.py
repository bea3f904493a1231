"""Value heads on the LM's final hidden state: the MC-returns and ILQL baselines (docs/algorithm.md section 9).

Shapes: h [..., D] the final-normed hidden state (`Transformer.hidden_states`, the input of the
unembedding), J the number of Q heads (1 for MC, 2 for ILQL), V = `config.padded_vocab_size` columns of
which the first `config.vocab_size` are real (as the LM head).

Parameter tree (the Flax variables {"params": tree} of `ValueHeads(config, num_q)`):

  q_kernel  [J, D, V]   (None, embed, vocab)   Q_j(s, a) = h . q_kernel[j, :, a] + q_bias[j, a]
  q_bias    [J, V]      (None, vocab)
  v_kernel  [D]         (embed,)               V(s) = h . v_kernel + v_bias
  v_bias    []          ()

so the rule table shards the Q kernels as it shards the unembedding. The Q kernels start from a normal
of std q_init / sqrt(D) (|h| ~ sqrt(D) after the norm: Q starts within about q_init of 0, and the two
ILQL heads differ), the V kernel and all biases at 0.

The functions below take the inner tree (or the variables dict) and compute in float32 with the
hidden state's dtype for the matmuls, as `transformer.logits_from_hidden` does; padded columns of Q are
PAD_LOGIT.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from qsft_jax.models.config import ModelConfig
from qsft_jax.models.transformer import logits_from_hidden
from qsft_jax.sharding import Rules, logical_to_sharding

Q_KEYS = ("q_kernel", "q_bias")


class ValueHeads(nn.Module):
  """J Q heads over the vocabulary and one V head (see the module docstring); `__call__(h)` returns
  (Q [J, ..., V] float32, V [...] float32)."""
  config: ModelConfig
  num_q: int = 1
  q_init: float = 1e-2

  @nn.compact
  def __call__(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
    c = self.config
    d, v = c.d_model, c.padded_vocab_size
    dtype = jnp.dtype(c.param_dtype)
    param = lambda name, init, shape, axes: self.param(name, nn.with_logical_partitioning(init, axes),
                                                       shape, dtype)
    q_kernel = param("q_kernel", nn.initializers.normal(self.q_init / math.sqrt(d)), (self.num_q, d, v),
                     (None, "embed", "vocab"))
    q_bias = param("q_bias", nn.initializers.zeros, (self.num_q, v), (None, "vocab"))
    v_kernel = param("v_kernel", nn.initializers.zeros, (d,), ("embed",))
    v_bias = param("v_bias", nn.initializers.zeros, (), ())
    tree = {"q_kernel": q_kernel, "q_bias": q_bias, "v_kernel": v_kernel, "v_bias": v_bias}
    return q_values(tree, h, c.vocab_size), state_values(tree, h)


def inner(heads: Mapping[str, Any]) -> Mapping[str, Any]:
  """The heads' parameter tree from their variables {"params": tree} (or the tree itself)."""
  return heads["params"] if "params" in heads and "q_kernel" not in heads else heads


def q_values(heads: Mapping[str, Any], h: jax.Array, vocab_size: int) -> jax.Array:
  """Q_j(s, .) of every head: h [..., D] -> float32 [J, ..., V] (padded columns PAD_LOGIT)."""
  t = inner(heads)
  kernel, bias = t["q_kernel"], t["q_bias"]
  real = jnp.arange(bias.shape[-1]) < vocab_size
  bias = jnp.where(real, bias.astype(jnp.float32), 0.0)
  return jnp.stack([logits_from_hidden(h, kernel[j], vocab_size) + bias[j] for j in range(kernel.shape[0])])


def state_values(heads: Mapping[str, Any], h: jax.Array) -> jax.Array:
  """V(s): h [..., D] -> float32 [...]."""
  t = inner(heads)
  v = jnp.einsum("...d,d->...", h, t["v_kernel"].astype(h.dtype), preferred_element_type=jnp.float32)
  return v + t["v_bias"].astype(jnp.float32)


def acting_values(heads: Mapping[str, Any], h: jax.Array, vocab_size: int) -> jax.Array:
  """min_j Q_j(s, .) - V(s): h [..., D] -> float32 [..., V], the term that beta scales when acting
  (`sampler` mode "heads"); for ILQL pass the target Q heads with the V head."""
  return jnp.min(q_values(heads, h, vocab_size), axis=0) - state_values(heads, h)[..., None]


@functools.lru_cache(maxsize=16)
def _abstract(config: ModelConfig, num_q: int):
  h = jax.ShapeDtypeStruct((1, config.d_model), jnp.dtype(config.dtype))
  return jax.eval_shape(lambda r, x: ValueHeads(config, num_q).init(r, x), jax.random.key(0), h)


def param_shapes(config: ModelConfig, num_q: int) -> Any:
  """ShapeDtypeStructs of the variables {"params": tree} of ValueHeads(config, num_q)."""
  return nn.unbox(_abstract(config, num_q))


def param_shardings(config: ModelConfig, num_q: int, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings of the variables {"params": tree} by the rule table."""
  boxed = _abstract(config, num_q)
  return logical_to_sharding(nn.get_partition_spec(boxed), mesh, rules, shapes=nn.unbox(boxed))


def init_sharded(config: ModelConfig, num_q: int, rng: jax.Array, mesh: Mesh, rules: Rules) -> Any:
  """New heads {"params": tree}, created in their shards."""
  h = jnp.zeros((1, config.d_model), jnp.dtype(config.dtype))
  init = jax.jit(lambda r: nn.unbox(ValueHeads(config, num_q).init(r, h)),
                 out_shardings=param_shardings(config, num_q, mesh, rules))
  return init(rng)


def q_part(heads: Mapping[str, Any]) -> dict:
  """{"params": {q_kernel, q_bias}}: the part of the heads that ILQL's target copies hold."""
  t = inner(heads)
  return {"params": {k: t[k] for k in Q_KEYS}}
