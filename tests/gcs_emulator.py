"""A Google Cloud Storage emulator on 127.0.0.1 for the tests (gcp-storage-emulator, in memory).

Every client the library uses is pointed at it through its own setting, with no credentials:
fsspec's gcsfs (etils.epath's gs:// backend) and google-cloud-storage (tensorboardX's gs:// writer)
through STORAGE_EMULATOR_HOST, tensorstore (orbax's checkpoints) through TENSORSTORE_GCS_HTTP_URL,
array_record's gs:// reader (google-cloud-cpp, for TFDS datasets) through CLOUD_STORAGE_EMULATOR_ENDPOINT.
The metadata-server addresses point at a closed local port so that no client looks for a VM's
credentials on the network.

The emulator leaves out the `x-goog-generation` header of a media download, which real GCS sends and
tensorstore reads (its OCDBT manifest reads fail with "Malformed StorageGeneration" without it);
`start` adds it from the object's stored generation.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

BUCKET = "bucket"


def _add_generation_headers() -> None:
  from gcp_storage_emulator.handlers import objects
  if getattr(objects.download, "with_generation", False):
    return
  download = objects.download

  def with_generation(request, response, storage, *args, **kwargs):
    download(request, response, storage, *args, **kwargs)
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # pylint: disable=broad-except  # a missing object: the 404 as it is
      return
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))

  with_generation.with_generation = True
  objects.download = with_generation


def client_env(url: str) -> dict[str, str]:
  """The environment that points every GCS client at the emulator at `url` (http://HOST:PORT)."""
  closed = "127.0.0.1:9"  # discard port: nothing listens, so metadata-server probes fail at once
  return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
          "GCE_METADATA_ROOT": closed, "GCE_METADATA_HOST": closed, "GCE_METADATA_IP": closed,
          "NO_GCE_CHECK": "true", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


@contextlib.contextmanager
def start() -> Iterator[dict[str, str]]:
  """Runs the emulator (in this process, on a free port, bucket `BUCKET`) with this process's
  environment pointed at it; yields that environment (for subprocesses too)."""
  _add_generation_headers()  # before the server module binds the handlers
  from gcp_storage_emulator.server import create_server
  server = create_server("127.0.0.1", 0, in_memory=True, default_bucket=BUCKET)
  server.start()
  port = server._api._httpd.server_address[1]  # pylint: disable=protected-access  # port 0: the OS chose
  env = client_env(f"http://127.0.0.1:{port}")
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    yield env
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    server.stop()
