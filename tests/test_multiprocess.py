"""Two trainer processes under jax.distributed on the CPU (2 x 4 simulated devices, gloo collectives)
train to the same parameters as one process with 8 devices, both with data_shards=2."""
import json
import os
import socket

import numpy as np
import pytest

import trainer_utils as tu
from trainer_utils import STEPS, SHARED_OVERRIDES

# Same global batches and the same step program over 8 devices; only the cross-process reductions
# (gloo) may add in another order. Measured: see assert_states_equal's message when it fails.
RTOL, ATOL = 1e-5, 1e-6


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
  reference = tu.reference_run()
  workdir = str(tmp_path / "run")
  port = free_port()
  procs = []
  for i in range(2):
    env = tu.subprocess_env(device_count=4, QSFT_DISTRIBUTED=1, QSFT_CPU_COLLECTIVES="gloo")
    procs.append(tu.start(
        workdir, *SHARED_OVERRIDES, f"--config.distributed.coordinator_address=127.0.0.1:{port}",
        "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
        env=env, log_name=f"p{i}"))
  try:
    codes = [tu.wait(p, timeout=500) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert codes == [0, 0], "\n\n".join(tu.output(p)[-3000:] for p in procs)
  # process 0 logs; both trained (process 1 prints nothing but exits cleanly)
  assert f"qsft step {STEPS}:" in tu.output(procs[0])

  for phase in ("bc", "qsft"):
    assert os.path.exists(os.path.join(workdir, phase, "DONE"))
    data = os.path.join(workdir, phase, "checkpoints", str(STEPS), "data")
    assert sorted(f for f in os.listdir(data) if f.startswith("process_")) == [
        "process_0-of-2.json", "process_1-of-2.json"]  # each process's iterator position
    assert len(os.listdir(os.path.join(workdir, phase, "tensorboard"))) == 1  # process 0 only
    got, want = tu.read_state(workdir, phase, STEPS), tu.read_state(reference, phase, STEPS)
    tu.assert_states_equal(got, want, rtol=RTOL, atol=ATOL, what=f"{phase}: 2 processes vs 1")
    diffs = [np.max(np.abs(got[k].astype(np.float64) - want[k])) for k in got if got[k].size]
    print(f"{phase}: max |2 processes - 1 process| over all leaves = {max(diffs):.3g}")
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["distributed"]["num_processes"] == 2
