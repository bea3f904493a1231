"""LoRA (qsft_jax/models/lora.py): adapters over one frozen base in the model, the LoRA train states and
steps, merging, and the base's record in checkpoints.

Checked against independent computations: a new adapter (B = 0) gives the base model's logits bit for
bit; `merge` against numpy's W + scale * A.B; the merged plain model against the unmerged forward; the
Q-SFT step's theta_bar update against numpy's Polyak mix of the adapters, with the base bit-identical and
aliased (never copied) in the compiled step; LoRA Q-SFT on an exact tabular MDP against the closed-form
fixed point of tests/test_qstar.py.
"""
import dataclasses
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qsft_jax import config_lib, losses, sharding, train_steps
from qsft_jax.models import lora as lora_lib
from qsft_jax.models import sharded
from qsft_jax.models.config import get_preset
from qsft_jax.models.transformer import Transformer
import mdp_utils  # tests/mdp_utils.py (pytest puts tests/ on sys.path)

SMALL = dict(d_model=32, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64)
RULES = sharding.DEFAULT_RULES
LORA = lora_lib.LoraConfig(rank=4, alpha=8.0)


def model_config(scan=False, family="llama", remat="none"):
  kv = {} if family == "llama" else {"num_kv_heads": SMALL["num_heads"]}
  return get_preset(f"tiny-{family}", scan_layers=scan, remat_policy=remat, **{**SMALL, **kv})


def one_device_mesh():
  return sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])


def inputs(config, rows=2, length=12, seed=0):
  tokens = np.random.default_rng(seed).integers(1, config.vocab_size, size=(rows, length)).astype(np.int32)
  positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape)
  segments = np.ones_like(tokens)
  segments[1, -3:] = 0  # padding in one row
  return jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments)


@functools.lru_cache(maxsize=None)
def forward(config, lora=None):
  """The jitted logits of Transformer(config, lora=lora) (eager flax is slow on a busy CPU)."""
  return jax.jit(Transformer(config, lora=lora).apply)


@functools.lru_cache(maxsize=None)
def init_variables(config, lora, seed=0):
  x = inputs(config)
  return jax.jit(lambda r: nn.unbox(Transformer(config, lora=lora).init(r, *x)))(jax.random.key(seed))


def randomise_adapters(adapters, seed=1, std=0.3):
  """Every adapter matrix (B included) drawn from normal(0, std)."""
  leaves, tree = jax.tree.flatten(adapters)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(tree, [jnp.asarray(rng.normal(0, std, x.shape), x.dtype) for x in leaves])


@pytest.mark.parametrize("scan,family,remat", [(False, "llama", "none"), (True, "llama", "none"),
                                               (True, "gpt2", "full")],
                         ids=["unscanned-llama", "scanned-llama", "scanned-remat-gpt2"])
def test_new_adapter_is_exactly_the_base_model(scan, family, remat):
  config = model_config(scan, family, remat)
  variables = init_variables(config, LORA)
  paths = lora_lib.adapter_paths(config, LORA)
  layer = "layers" if scan else "layers_1"
  assert {f"{layer}/attn/{n}" for n in "qkvo"} | {f"{layer}/mlp/up", f"{layer}/mlp/down"} <= set(paths)
  assert not any("embed" in p or "lm_head" in p for p in paths)
  assert all(not np.any(b) for b in jax.tree.leaves(variables["lora"]) if b.shape[-1] != LORA.rank)
  x = inputs(config)
  base_logits = forward(config)({"params": variables["params"]}, *x)
  lora_logits = forward(config, LORA)(variables, *x)
  np.testing.assert_array_equal(np.asarray(lora_logits), np.asarray(base_logits))
  # the adapters are not ignored: a nonzero B changes the logits
  changed = forward(config, LORA)({**variables, "lora": randomise_adapters(variables["lora"])}, *x)
  assert np.abs(np.asarray(changed) - np.asarray(base_logits))[:, :, :config.vocab_size].max() > 1e-3


def test_adapter_layout_and_logical_axes():
  config = model_config(scan=True)
  boxed = lora_lib.abstract_variables(config, LORA)
  specs = nn.get_partition_spec(boxed)["lora"]["layers"]
  shapes = nn.unbox(boxed)["lora"]["layers"]
  L, D, H, K, Dh, F, r = config.num_layers, config.d_model, config.num_heads, config.num_kv_heads, \
      config.head_dim, config.mlp_dim, LORA.rank
  assert shapes["attn"]["q"]["lora_a"].shape == (L, D, r)
  assert shapes["attn"]["k"]["lora_b"].shape == (L, r, K, Dh)
  assert shapes["attn"]["o"]["lora_a"].shape == (L, H, Dh, r)
  assert shapes["mlp"]["down"]["lora_b"].shape == (L, r, D)
  assert tuple(specs["attn"]["q"]["lora_a"]) == ("layers", "embed", "lora_rank")
  assert tuple(specs["attn"]["o"]["lora_b"]) == ("layers", "lora_rank", "embed")
  assert tuple(specs["mlp"]["gate"]["lora_b"]) == ("layers", "lora_rank", "mlp")
  # the rule table replicates the rank axis
  assert dict(RULES)["lora_rank"] is None
  # a LoRA model's variables are refused by the plain model (it would silently drop the adapters)
  variables = init_variables(model_config(), LORA)
  with pytest.raises(ValueError, match="LoRA adapter"):
    Transformer(model_config()).apply(variables, *inputs(model_config()))
  # targets select modules
  only_q = lora_lib.LoraConfig(rank=2, targets=("attn/q$",))
  assert lora_lib.adapter_paths(model_config(), only_q) == ("layers_0/attn/q", "layers_1/attn/q")
  assert lora_lib.unmatched_targets(model_config(), lora_lib.LoraConfig(rank=2, targets=("attn/q$", "nope"))) \
      == ("nope",)


@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
def test_merge_matches_numpy_and_the_unmerged_forward(scan):
  config = model_config(scan)
  variables = init_variables(config, LORA)
  variables = {**variables, "lora": randomise_adapters(variables["lora"])}
  merged = lora_lib.merge(variables, config, LORA)
  # one kernel by hand: attn/o [H, Dh, D] (two input axes) of the second layer
  layer = (lambda t: t["layers"]) if scan else (lambda t: t["layers_1"])
  pick = (lambda x: np.asarray(x[1], np.float64)) if scan else (lambda x: np.asarray(x, np.float64))
  w = pick(layer(variables["params"])["attn"]["o"]["kernel"])
  a = pick(layer(variables["lora"])["attn"]["o"]["lora_a"])
  b = pick(layer(variables["lora"])["attn"]["o"]["lora_b"])
  h, dh, d = w.shape
  want = w + (LORA.alpha / LORA.rank) * (a.reshape(h * dh, -1) @ b).reshape(h, dh, d)
  np.testing.assert_allclose(pick(layer(merged["params"])["attn"]["o"]["kernel"]), want, rtol=1e-5, atol=1e-6)
  # unadapted parameters are untouched
  np.testing.assert_array_equal(merged["params"]["embed"]["embedding"], variables["params"]["embed"]["embedding"])
  x = inputs(config)
  unmerged = forward(config, LORA)(variables, *x)
  plain = forward(config)(merged, *x)
  real = slice(0, config.vocab_size)
  np.testing.assert_allclose(np.asarray(plain)[..., real], np.asarray(unmerged)[..., real], rtol=1e-4, atol=1e-4)
  base_only = forward(config)({"params": variables["params"]}, *x)
  assert np.abs(np.asarray(base_only) - np.asarray(unmerged))[..., real].max() > 1e-2


# ----------------------------------------------------------------------------------------------
# Train states and steps


def lora_state(mesh, kind, opt, lora=LORA, config=None, seed=0):
  config = config or model_config()
  model = Transformer(config, lora=lora)
  shardings = train_steps.state_shardings(model, config, opt, mesh, RULES, kind)
  base = sharded.init_params_sharded(config, jax.random.key(seed), mesh, RULES)
  theta = {**base, **sharded.init_adapters_sharded(config, lora, jax.random.key(seed + 1), mesh, RULES)}
  theta = {**theta, "lora": randomise_adapters(theta["lora"], seed=seed + 2, std=0.05)}
  if kind == "bc":
    return jax.jit(lambda v: train_steps.init_lora_bc_state(v, opt, lora), out_shardings=shardings)(theta)
  phi = {**base, "lora": randomise_adapters(theta["lora"], seed=seed + 3, std=0.05)}
  init = lambda t, f: train_steps.init_lora_qsft_state(t, f, opt, lora)
  return jax.jit(init, out_shardings=shardings)(theta, phi)


def check_lora_state_layout(state):
  assert set(state) == set(train_steps.QSFT_KEYS) | {"base"}
  for key in ("params", "target_params", "behaviour_params"):
    assert set(state[key]) == {"lora"}
  assert set(state["base"]) == {"params"}
  assert {x.dtype for x in jax.tree.leaves(state["base"])} == {jnp.dtype("bfloat16")}
  assert {x.dtype for x in jax.tree.leaves(state["params"])} == {jnp.dtype("float32")}
  # the optimizer state mirrors the adapters only
  adam = state["opt_state"][0]
  assert jax.tree.structure(adam.mu) == jax.tree.structure(state["params"])


def _alias_pairs(hlo_text: str) -> set[tuple[int, int]]:
  """(output index, parameter number) of the compiled module's input_output_alias entries."""
  header = hlo_text[:hlo_text.index("\n")]
  return {(int(o), int(p)) for o, p in re.findall(r"\{(\d+)\}: \((\d+), \{\}", header)}


@pytest.mark.parametrize("mesh_shape", [{"data": 2, "fsdp": 2, "tensor": 2}], ids=["data2-fsdp2-tensor2"])
def test_qsft_step_updates_adapters_only_and_aliases_the_base(mesh_shape):
  mesh = sharding.make_mesh(mesh_shape)
  opt = optax.adam(1e-2)
  tau = 0.25
  config = model_config()
  model = Transformer(config, lora=LORA)
  step = train_steps.make_qsft_step(model, config, opt, mesh, RULES, losses.TargetConfig(support_min=1e-3),
                                    train_steps.TargetUpdate(tau=tau), train_steps.StepOptions(chunk_size=8))
  state = lora_state(mesh, "qsft", opt, config=config)
  check_lora_state_layout(state)
  batch = sharding.global_batch_from_host_local(
      mdp_utils.random_batch(np.random.default_rng(0), 8, 16, config.vocab_size), mesh, RULES)

  compiled = step.lower(state, batch).compile()
  # The base is the first entry of the flattened state, in and out ("base" sorts first): each of its
  # leaves must be an output aliased to its own donated input, and no new output buffer can hold it.
  base_leaves = jax.tree.leaves(state["base"])
  aliases = _alias_pairs(compiled.as_text())
  missing = [i for i in range(len(base_leaves)) if (i, i) not in aliases]
  assert not missing, f"base leaves {missing} are not aliased in the compiled step"
  memory = compiled.memory_analysis()
  base_bytes = sum(x.addressable_shards[0].data.nbytes for x in base_leaves)
  fresh_output = memory.output_size_in_bytes - memory.alias_size_in_bytes
  assert fresh_output < base_bytes, (fresh_output, base_bytes)

  before = jax.device_get(state)
  new_state, metrics = step(state, batch)
  after = jax.device_get(new_state)
  assert np.isfinite(float(metrics["loss"]))
  same = lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  jax.tree.map(same, after["base"], before["base"])
  jax.tree.map(same, after["behaviour_params"], before["behaviour_params"])
  moved = [np.abs(np.asarray(x, np.float64) - y).max()
           for x, y in zip(jax.tree.leaves(after["params"]), jax.tree.leaves(before["params"]))]
  assert min(moved) > 0  # every adapter matrix took a step
  t = np.float32(tau)
  want = jax.tree.map(lambda bar, theta: (np.float32(1) - t) * bar + t * theta,
                      before["target_params"], after["params"])
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), after["target_params"], want)


def test_bc_step_trains_adapters_over_the_base():
  mesh = one_device_mesh()
  opt = optax.adam(1e-2)
  config = model_config()
  step = train_steps.make_bc_step(Transformer(config, lora=LORA), config, opt, mesh, RULES,
                                  train_steps.StepOptions(chunk_size=8))
  state = lora_state(mesh, "bc", opt, config=config)
  batch = sharding.global_batch_from_host_local(
      mdp_utils.random_batch(np.random.default_rng(0), 8, 16, config.vocab_size), mesh, RULES)
  base = jax.device_get(state["base"])
  losses_seen = []
  for _ in range(3):
    state, metrics = step(state, batch)
    losses_seen.append(float(metrics["loss"]))
  assert losses_seen[-1] < losses_seen[0]
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state["base"]), base)


# ----------------------------------------------------------------------------------------------
# LoRA Q-SFT on the exact tabular MDPs of tests/test_qstar.py


def _lora_table(base, adapters, lora):
  """The tabular model's logits [S, V_pad]: `lora.merge` of a frozen base table and its adapter."""
  return lora_lib.merge({"params": {"table": {"kernel": base}}, "lora": {"table": adapters}}, None,
                        lora)["params"]["table"]["kernel"]


@functools.partial(jax.jit, static_argnames=("lora", "vocab", "steps", "rounds", "bc"))
def _train_lora_table(batch, one_hot, base, adapters, phi_table, lora, vocab, steps, rounds, bc):
  """Adam on the adapter only (the base table frozen): BC when `bc`, else Q-SFT with theta_bar's
  adapter hard-copied from theta's (`train_steps.update_target`) every `steps` steps, `rounds` times."""
  import test_qstar
  n = losses.action_token_count(batch["action_mask"])
  opt = optax.adam(optax.cosine_decay_schedule(0.1, steps * rounds, alpha=0.01), b2=0.99)
  targets = losses.TargetConfig(support_min=test_qstar.SUPPORT_MIN, dummy_token=test_qstar.DUMMY)

  def loss_fn(ad, target_ad):
    table = _lora_table(base, ad, lora)
    if bc:
      return losses.chunked_bc_loss(one_hot, table, losses.to_rows(batch["tokens"]),
                                    losses.to_rows(batch["action_mask"], False), n, vocab_size=vocab,
                                    chunk_size=3)[0]
    return losses.qsft_loss(one_hot, table, one_hot, _lora_table(base, target_ad, lora), one_hot, phi_table,
                            batch, n, vocab_size=vocab, chunk_size=4, targets=targets)[0]

  update = train_steps.TargetUpdate(every=steps)

  def step(carry, _):
    ad, target_ad, opt_state, count = carry
    grads = jax.grad(loss_fn)(ad, target_ad)
    updates, opt_state = opt.update(grads, opt_state)
    ad = optax.apply_updates(ad, updates)
    return (ad, train_steps.update_target(target_ad, ad, count + 1, update), opt_state, count + 1), None

  carry = (adapters, adapters, opt.init(adapters), jnp.zeros((), jnp.int32))
  (adapters, _, _, _), _ = jax.lax.scan(step, carry, None, length=steps * rounds)
  return adapters


@pytest.mark.parametrize("mdp_name", ["one_turn", "two_turns"])
def test_lora_qsft_reaches_the_exact_fixed_point(mdp_name):
  """The tabular model of test_qstar with LoRA on: a frozen random base table [S, V_pad] plus A.B
  (rank V_pad: any table), A and B trained; theta's adapter starts from phi's (theta_init "phi")."""
  import test_qstar
  mdp, dataset_kwargs = test_qstar.mdps()[mdp_name]
  vocab, v_pad = test_qstar.VOCABS["vocab8"]
  host, one_hot, index = test_qstar.build(mdp, dataset_kwargs)
  batch = {k: jnp.asarray(v) for k, v in host.items()}
  num_states = one_hot.shape[-1]
  lora = lora_lib.LoraConfig(rank=v_pad, alpha=float(v_pad))
  rng = np.random.default_rng(0)
  base = jnp.asarray(rng.normal(0, 1, (num_states, v_pad)), jnp.float32)
  start = {"lora_a": jnp.asarray(rng.normal(0, 1 / np.sqrt(num_states), (num_states, v_pad)), jnp.float32),
           "lora_b": jnp.zeros((v_pad, v_pad), jnp.float32)}
  rounds = 1 + int(host["action_mask"].sum(1).max())
  phi_ad = _train_lora_table(batch, one_hot, base, start, None, lora, vocab, 600, 1, True)
  phi_table = _lora_table(base, phi_ad, lora)
  theta_ad = _train_lora_table(batch, one_hot, base, phi_ad, phi_table, lora, vocab, 250, rounds, False)
  pi, theta = test_qstar.probs(phi_table, vocab), test_qstar.probs(_lora_table(base, theta_ad, lora), vocab)
  states = mdp_utils.state_ids(host["tokens"], host["segment_ids"], dict(index))
  visited = sorted({int(states[b, i - 1]) for b, i in zip(*np.nonzero(host["action_mask"]))})
  want = test_qstar.numpy_fixed_point(host, states, pi, test_qstar.DUMMY, rounds)
  np.testing.assert_allclose(theta[visited], want[visited], atol=3e-3)
  assert np.abs(pi[visited] - want[visited]).max() > 0.1  # far from where theta started


# ----------------------------------------------------------------------------------------------
# Checkpoints, config


def test_lora_checkpoint_restores_onto_another_mesh_and_refuses_another_base(tmp_path):
  import ml_collections
  from qsft_jax import checkpoints
  from qsft_jax.errors import ConfigError
  config = model_config()
  opt = optax.adam(1e-3)
  model = Transformer(config, lora=LORA)
  mesh8 = sharding.make_mesh({"data": 8})
  state = lora_state(mesh8, "qsft", opt, config=config)
  record = lora_lib.base_record(state["base"], "random", LORA)
  c = ml_collections.ConfigDict({"checkpoint": {"keep": 2, "keep_every": 0, "async_save": False}})
  manager = checkpoints.make_manager(str(tmp_path), "qsft", c)
  checkpoints.save(manager, 3, checkpoints.without_base(state), base_record=record)
  manager.wait_until_finished()
  saved = jax.device_get(checkpoints.without_base(state))

  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  shardings = checkpoints.without_base(train_steps.state_shardings(model, config, opt, mesh, RULES, "qsft"))
  shapes = jax.eval_shape(lambda: checkpoints.without_base(jax.device_get(state)))
  restored = checkpoints.restore(manager, 3, sharding.abstract_with_shardings(shapes, shardings))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), saved)
  q_a = restored["params"]["lora"]["layers_0"]["attn"]["q"]["lora_a"]  # [D, r]: D over fsdp
  assert q_a.sharding.spec[0] == "fsdp" and len(q_a.sharding.device_set) == 8
  # the base's checksum does not depend on the mesh it is sharded over
  base_other = jax.device_put(state["base"], train_steps.state_shardings(model, config, opt, mesh, RULES,
                                                                         "qsft")["base"])
  assert lora_lib.base_checksum(base_other) == record["checksum"]
  checkpoints.check_base_record(manager, 3, record, label="qsft")
  # another base (one element of one kernel changed) is refused, naming both records
  leaves, tree = jax.tree.flatten(state["base"])
  changed = np.asarray(leaves[3]).copy()
  changed.flat[5] = (changed.flat[5].astype(np.float32) * 1.01 + 1e-3).astype(changed.dtype)
  assert changed.flat[5] != np.asarray(leaves[3]).flat[5]
  leaves[3] = jax.device_put(changed, leaves[3].sharding)
  other = lora_lib.base_record(jax.tree.unflatten(tree, leaves), "random", LORA)
  assert other["checksum"] != record["checksum"]
  with pytest.raises(ConfigError, match=f"{record['checksum']}.*{other['checksum']}"):
    checkpoints.check_base_record(manager, 3, other, label="qsft")
  with pytest.raises(ConfigError, match="base_dtype='float32'"):
    checkpoints.check_base_record(manager, 3, {**record, "base_dtype": "float32"}, label="qsft")
  manager.close()


@pytest.mark.parametrize("field,value,message", [
    ("rank", -1, "model.lora.rank: must be an integer >= 0"),
    ("alpha", 0.0, "model.lora.alpha: must be a finite number > 0"),
    ("targets", ("attn/(q",), "model.lora.targets: 'attn/\\(q' is not a regular expression"),
    ("targets", (), "model.lora.targets: is empty"),
    ("quantization", "int4", "model.lora.quantization: 'int4': expected one of"),
    ("base_dtype", "int8", "model.lora.base_dtype: 'int8' is not a floating-point dtype"),
])
def test_check_config_rejects_bad_lora_fields(field, value, message):
  config = config_lib.base_config()
  config.task = "maze"
  config.model.lora.rank = 4
  config.model.lora[field] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.check_config(config, 8)


def test_targets_matching_no_projection_are_an_error():
  from qsft_jax import main
  main.check_lora_targets(model_config(), LORA)
  with pytest.raises(config_lib.ConfigError, match=r"model.lora.targets: 'mlp/fc\$'.*attn/q"):
    main.check_lora_targets(model_config(), lora_lib.LoraConfig(rank=2, targets=("attn/q$", "mlp/fc$")))


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_sampler_runs_phi_and_theta_as_adapters_over_one_base(quantization):
  from qsft_jax.models import quant, quant_base
  from qsft_jax.sampler import Sampler
  # a large init std, so that the logits compared are not dominated by float noise
  config = get_preset("tiny-llama", vocab_size=40, init_std=0.4, **SMALL)
  lora = dataclasses.replace(LORA, quantization=quantization)
  mesh = one_device_mesh()
  base = sharded.init_params_sharded(config, jax.random.key(0), mesh, RULES)
  if quantization != "none":  # the base as the trainer and run.load store it: kernels quantised
    base = quant_base.quantized_base(base, config, lora, mesh, RULES)
  adapters = [sharded.init_adapters_sharded(config, lora, jax.random.key(s), mesh, RULES) for s in (1, 2)]
  phi, theta = ({**base, "lora": randomise_adapters(a["lora"], seed=s, std=0.2)} for s, a in enumerate(adapters))
  sampler = Sampler(config, mesh, RULES, cache_len=32, min_prompt_bucket=8, lora=lora)
  placed = [sampler._place(p) for p in (phi, theta)]
  assert all(a is b for a, b in zip(jax.tree.leaves(placed[0]["params"]), jax.tree.leaves(placed[1]["params"])))
  prompts = [[1, 5, 6, 7], [1, 9]]
  out = sampler.decode(phi, theta, prompts, mode="extract", beta=2.0, max_new_tokens=4, greedy=True, record=True)
  # reference: the merged plain model, one uncached forward over each whole sequence
  for name, params, got in (("phi", phi, out.phi_logits), ("theta", theta, out.theta_logits)):
    # a quantised base as the forward reads it (dequantised to the float32 compute dtype), merged in float32
    dense = lambda x: quant.dense(x, jnp.float32) if isinstance(x, quant.QuantizedArray) else x
    dense_base = jax.tree.map(dense, params["params"], is_leaf=lambda x: isinstance(x, quant.QuantizedArray))
    merged = lora_lib.merge({**params, "params": dense_base}, config, lora)
    for i, prompt in enumerate(prompts):
      seq = np.asarray([prompt + out.sequences()[i]], np.int32)
      ref = np.asarray(forward(config)(merged, seq, np.arange(seq.shape[1])[None], np.ones_like(seq)))[0]
      for t in range(out.num_generated[i]):
        np.testing.assert_allclose(got[i, t, :config.vocab_size], ref[len(prompt) - 1 + t, :config.vocab_size],
                                   atol=2e-4, rtol=1e-4, err_msg=name)


def test_theta_init_picks_thetas_adapter():
  from qsft_jax import main
  base = {"params": "BASE"}
  adapters = lambda offset: {"lora": f"new{offset}"}
  phi = lambda: {"lora": "phi_trained"}
  start = functools.partial(main.initial_lora_params, base=base, adapters=adapters, phi=phi)
  assert start("bc", "phi") == {"params": "BASE", "lora": "new0"}
  behaviour = {"params": "BASE", "lora": "phi_trained"}
  assert start("qsft", "phi") == (behaviour, behaviour)
  for init in ("phi_init", "pretrained"):  # the adapter phi started from: B = 0, the base model
    assert start("qsft", init) == ({"params": "BASE", "lora": "new0"}, behaviour)
  assert start("control", "fresh") == ({"params": "BASE", "lora": "new1"}, behaviour)
