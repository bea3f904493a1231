r"""Ahead-of-time compilation of the trainer's steps for a TPU pod slice, on a CPU machine.

    python -m qsft_jax.aot --config=configs/pod_llama3_8b.py [--config.FIELD=VALUE ...] \
        [--topology=v5p:4x4x8] [--num_slices=2] [--steps=bc,qsft,decode] [--no-probes] [--json=PATH]

The config is the trainer's own (`python -m qsft_jax.main` takes the same file and overrides) and
the programs are the trainer's and the sampler's (`qsft_jax.phases.build`, `sampler.decode_step`),
so what AOT reports is what a pod runs. Modules:

  topology       libtpu's description of a slice: compile-only devices, the (multi-slice) mesh.
  costs          the compiled program read back: collectives from its HLO with their loops' trip
                 counts, XLA's cost analysis, the roofline, the compiler's out-of-memory report.
  driver         lowers and compiles each step and gathers its figures (`run(config, Target)`).
  report         the readable per-chip report.
  scaling_table  regenerates the tables of docs/scaling.md from docs/scaling_results.json.

Needs the libtpu package at the version jax[tpu] pins (requirements-test.txt); the CPU stays JAX's default backend.
"""
