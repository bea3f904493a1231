"""TensorBoard event files read back in tests, without TensorBoard's own reader (not installed)."""
import os
import struct


def read_scalars(folder: str) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value)]} of every scalar in the TensorBoard event files of `folder`, read as
  TFRecords (uint64 length, its CRC, the Event proto, its CRC) without TensorBoard's reader."""
  from tensorboardX.proto import event_pb2

  out: dict = {}
  for name in sorted(os.listdir(folder)):
    assert name.startswith("events.out.tfevents"), name
    with open(os.path.join(folder, name), "rb") as f:
      data = f.read()
    at = 0
    while at < len(data):
      (length,) = struct.unpack("<Q", data[at:at + 8])
      event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
      at += 12 + length + 4
      for v in event.summary.value:
        assert v.WhichOneof("value") == "simple_value", v
        out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out
