r"""Compiles the trainer's BC and Q-SFT steps and the sampler's extraction decode step for a TPU slice
on this CPU machine, and reports per chip: memory against HBM, FLOPs (compiled and analytic), the
collectives and their bytes, the roofline step time and MFU.

    python -m qsft_jax.aot --config=configs/pod_llama3_8b.py [--config.FIELD=VALUE ...] \
        [--topology=v5p:4x4x8] [--num_slices=2] [--steps=bc,qsft,decode] [--no-probes] [--json=PATH]

--config is the trainer's config with its overrides (model, mesh.shape, batch sizes, data.max_length,
loss.chunk_size, microbatches, the storage dtypes bc/qsft.mu_dtype and nu_dtype, qsft.target_dtype and
behaviour_dtype, ...); the other flags describe the hardware and the measurement. --topology and
--num_slices default to the config file's AOT_TOPOLOGY and AOT_NUM_SLICES.
"""
from __future__ import annotations

import json
import runpy
import sys
from typing import Sequence

from absl import flags

from qsft_jax import cli
from qsft_jax import storage
from qsft_jax.aot import driver
from qsft_jax.aot.report import format_report
from qsft_jax.aot.topology import TOPOLOGY_RE

PROG = "python -m qsft_jax.aot"


def define_flags(argv: Sequence[str]) -> tuple[flags.FlagValues, flags.FlagHolder]:
  fv = cli.new_flags()
  config = cli.config_flag(fv, argv)
  flags.DEFINE_string("topology", None, "TPU slice GEN:AxB[xC] (v5e:2x2, v5p:4x4x8, v6e:4x4, v4:2x2x1); "
                      "default: the config file's AOT_TOPOLOGY.", flag_values=fv)
  flags.DEFINE_integer("num_slices", None, "Slices joined over the DCN (on the mesh's data axis); "
                       "default: the config file's AOT_NUM_SLICES, else 1.", lower_bound=1, flag_values=fv)
  flags.DEFINE_list("steps", list(driver.DEFAULT_STEPS), f"Steps to compile, a subset of {driver.STEPS} "
                    "(ilql: the ILQL step with its heads on the frozen phi; ilql_train: with the trunk "
                    "trained, both at qsft's batch size).",
                    flag_values=fv)
  flags.DEFINE_bool("probes", True, "Compile the 1- and 2-layer cost probes of looped programs "
                    "(--no-probes: memory and collectives from the real program only, FLOPs and HBM "
                    "bytes as lower bounds).", flag_values=fv)
  flags.DEFINE_integer("decode_batch", 0, "Rows of the decode step (0: qsft.batch_size).", lower_bound=0,
                       flag_values=fv)
  flags.DEFINE_integer("cache_len", 0, "KV-cache slots of the decode step (0: data.max_length).",
                       lower_bound=0, flag_values=fv)
  flags.DEFINE_string("json", None, "Also write the figures as JSON to this path.", flag_values=fv)
  flags.DEFINE_string("hlo_dir", "", "Write each step's compiled HLO text to this folder.", flag_values=fv)
  flags.register_validator("topology", lambda t: t is None or TOPOLOGY_RE.match(t) is not None,
                           "expected GEN:AxB or GEN:AxBxC with GEN in v4, v5e, v5p, v6e", flag_values=fv)
  flags.register_validator("steps", lambda s: bool(s) and set(s) <= set(driver.STEPS),
                           f"expected a non-empty subset of {','.join(driver.STEPS)}", flag_values=fv)
  return fv, config


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv if argv is None else argv)
  fv, config = define_flags(argv)
  cli.parse(fv, argv, prog=PROG, doc=__doc__, required=["config"])
  from ml_collections import config_flags
  defaults = runpy.run_path(config_flags.get_config_filename(fv["config"]))
  topology = fv.topology or defaults.get("AOT_TOPOLOGY")
  if not topology:
    sys.stderr.write(f"FATAL: {PROG}: no topology: pass --topology or set AOT_TOPOLOGY in the config file\n")
    return 2
  target = driver.Target(topology=topology, num_slices=fv.num_slices or defaults.get("AOT_NUM_SLICES", 1),
                         steps=tuple(fv.steps), probes=fv.probes, decode_batch=fv.decode_batch,
                         cache_len=fv.cache_len, hlo_dir=fv.hlo_dir)
  result = driver.run(config.value, target)
  print(format_report(result), flush=True)
  if fv.json:
    with storage.path(fv.json).open("w") as f:
      json.dump(result, f, indent=1, sort_keys=True)
  return 0


if __name__ == "__main__":
  cli.run(main)
