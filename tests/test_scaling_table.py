"""docs/scaling.md's tables are those of docs/scaling_results.json, and each row's commands run the
job its cached figures describe (no compilation: the config side of each command only)."""
from __future__ import annotations

import json
import math

import pytest

from qsft_jax import cli, config_lib
from qsft_jax.aot import __main__ as aot_main
from qsft_jax.aot import scaling_table
from qsft_jax.aot.topology import parse_topology


@pytest.fixture(scope="module")
def results():
  with open(scaling_table.CACHE) as f:
    return json.load(f)


def test_doc_tables_are_the_cached_figures(results):
  with open(scaling_table.DOC) as f:
    doc = f.read()
  assert scaling_table.render(doc, results) == doc
  assert scaling_table.render(doc, {}) != doc  # the tables do come from the figures


@pytest.mark.parametrize("name", list(scaling_table.ROWS))
def test_row_commands_describe_the_cached_job(results, name):
  row, cached = scaling_table.ROWS[name], results[name]
  for run in row.compiles:
    argv = ["aot"] + row.args(run)
    fv, config = aot_main.define_flags(argv)
    cli.parse(fv, argv, prog="aot")
    c = config.value
    slice_dims = parse_topology(fv.topology or cached["topology"])[1]
    assert (fv.topology or "") in ("", cached["topology"])
    chips = math.prod(slice_dims) * (fv.num_slices or 1)
    assert chips == cached["chips"] and (fv.num_slices or 1) == cached["num_slices"]
    assert config_lib.check_config(c, chips) == cached["mesh"]
    assert (c.qsft.batch_size, c.data.max_length) == (cached["batch"], cached["seq"])
    for field in ("target_dtype", "behaviour_dtype"):
      assert (c.qsft[field] or "float32") == cached.get(field, cached["param_dtype"])
    assert set(fv.steps) <= set(cached["steps"]) and fv.probes == all(
        cached["steps"][k]["probes"] for k in fv.steps)
