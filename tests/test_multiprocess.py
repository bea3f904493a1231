"""Two trainer processes under jax.distributed on the CPU (2 x 4 simulated devices, gloo collectives)
train to the same parameters as one process with 8 devices, both with data_shards=2; a SIGTERM to
one of them stops both at the same step, and the resumed pair still ends at those parameters."""
import json
import os
import signal
import socket

import numpy as np
import pytest

import trainer_utils as tu
from trainer_utils import STEPS, SHARED_OVERRIDES

# Same global batches and the same step program over 8 devices; the cross-process reductions (gloo)
# may add in another order, so equality is to float32 rounding, amplified a little by 48 Adam steps.
RTOL, ATOL = 1e-5, 1e-6


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_pair(workdir, name):
  port = free_port()
  procs = []
  for i in range(2):
    env = tu.subprocess_env(device_count=4, QSFT_DISTRIBUTED=1, QSFT_CPU_COLLECTIVES="gloo")
    procs.append(tu.start(
        workdir, *SHARED_OVERRIDES, f"--config.distributed.coordinator_address=127.0.0.1:{port}",
        "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
        env=env, log_name=f"{name}_p{i}"))
  return procs


def wait_pair(procs, timeout=500):
  try:
    return [tu.wait(p, timeout=timeout) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()


def logs(procs):
  return "\n\n".join(f"--- process {i}:\n" + tu.output(p)[-3000:] for i, p in enumerate(procs))


@pytest.mark.slow
def test_two_processes_train_like_one_and_survive_sigterm(tmp_path):
  reference = tu.reference_run()
  workdir = str(tmp_path / "run")

  # 1. Train; SIGTERM to process 1 only, during Q-SFT. JAX's preemption sync makes both processes
  #    save one agreed step and exit 143.
  procs = start_pair(workdir, "first")
  tu.kill_when(procs[1], lambda: 4 in tu.checkpoint_steps(workdir, "qsft"), sig=signal.SIGTERM,
               timeout=500)
  codes = wait_pair(procs)
  assert codes == [143, 143], logs(procs)
  saved = max(tu.checkpoint_steps(workdir, "qsft"))
  assert 4 <= saved < STEPS, saved
  assert not os.path.exists(os.path.join(workdir, "qsft", "DONE"))
  assert not tu.tmp_checkpoints(workdir, "qsft")
  for i, p in enumerate(procs):
    assert f"qsft: saved step {saved} after SIGTERM" in tu.output(p), f"process {i}: " + logs(procs)

  # 2. Resume both: they continue from that step and finish.
  procs = start_pair(workdir, "resume")
  codes = wait_pair(procs)
  assert codes == [0, 0], logs(procs)
  assert f"qsft: resumed from the checkpoint of step {saved}" in tu.output(procs[0])
  assert f"qsft step {STEPS}:" in tu.output(procs[0])  # process 0 logs, process 1 is quiet

  for phase in ("bc", "qsft"):
    assert os.path.exists(os.path.join(workdir, phase, "DONE"))
    data = os.path.join(workdir, phase, "checkpoints", str(STEPS), "data")
    assert sorted(f for f in os.listdir(data) if f.startswith("process_")) == [
        "process_0-of-2.json", "process_1-of-2.json"]  # each process's iterator position
    events = os.listdir(os.path.join(workdir, phase, "tensorboard"))
    assert len(events) == (1 if phase == "bc" else 2), events  # process 0 only, once per start
    got, want = tu.read_state(workdir, phase, STEPS), tu.read_state(reference, phase, STEPS)
    diffs = [np.max(np.abs(got[k].astype(np.float64) - want[k])) for k in got if got[k].size]
    print(f"{phase}: max |2 processes - 1 process| over all leaves = {max(diffs):.3g}")
    tu.assert_states_equal(got, want, rtol=RTOL, atol=ATOL, what=f"{phase}: 2 processes vs 1")
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["distributed"]["num_processes"] == 2
