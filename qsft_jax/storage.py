"""Paths of workdirs, data, weights and checkpoints on any filesystem `etils.epath` reaches.

A user path is either local (`/tmp/run`, `runs/a`) or a URL (`gs://bucket/run`; also `s3://` and the
other schemes epath knows). `normalize` is applied wherever a user path enters a program: a local path
becomes absolute, a URL is kept as it is (`os.path.abspath` would turn `gs://b/run` into
`./gs:/b/run`). Paths stay strings between modules (`os.path.join` and `os.path.dirname` are correct
on URLs, which always use "/"); every read, write, listing and rename goes through `path(...)`, an
`epath.Path`, so that the same code works on local disk and in a bucket.

On gs:// epath uses fsspec's gcsfs (tf.io.gfile only where TensorFlow is installed), orbax reaches the checkpoints
through tensorstore, and tensorboardX writes its event files with google-cloud-storage; all three take
Google's application default credentials (`gcloud auth application-default login`, a service account
in GOOGLE_APPLICATION_CREDENTIALS, or the VM's metadata server). A few readers only open local files
(a tokenizer or weights folder loaded by transformers / safetensors, a GGUF file): `local_copy` gives
them one, copied once per process into a temporary directory.
"""
from __future__ import annotations

import atexit
import contextlib
import hashlib
import io
import os
import shutil
import tempfile
from typing import IO, Iterator

from etils import epath

PathLike = str | os.PathLike


def is_url(p: PathLike) -> bool:
  """True for `scheme://...` paths (gs://, s3://, ...), False for local ones."""
  return "://" in os.fspath(p)


def normalize(p: PathLike) -> str:
  """A user path as every program keeps it: local paths absolute (as `os.path.abspath`), URLs as given
  without a trailing "/"."""
  p = os.fspath(p)
  if is_url(p):
    return p.rstrip("/") if not p.endswith("://") else p
  return os.path.abspath(p)


def path(p: PathLike) -> epath.Path:
  """The `epath.Path` of a local path or URL (what every file operation goes through)."""
  return epath.Path(p)


@contextlib.contextmanager
def open_atomic(p: PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
  """`open(p, mode)` for writing such that readers never see half a file, and nothing when the block
  raises: locally a temporary file renamed over `p` once the block completes; for a URL an in-memory
  buffer written as one object once the block completes (an object store publishes objects whole).
  `kwargs`: `open`'s (encoding, ...)."""
  p = os.fspath(p)
  if is_url(p):
    buffer = io.BytesIO() if "b" in mode else io.StringIO()
    yield buffer
    with path(p).open(mode) as f:
      f.write(buffer.getvalue())
    return
  tmp = f"{p}.tmp{os.getpid()}"
  try:
    with open(tmp, mode, **kwargs) as f:
      yield f
    os.replace(tmp, p)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text_atomic(p: PathLike, text: str) -> None:
  """Writes `text` to `p` so that readers never see half a file (`open_atomic`)."""
  with open_atomic(p) as f:
    f.write(text)


def append_text(p: PathLike, text: str) -> None:
  """Appends `text` to a file (creating it). Object stores have no append: the object is read and
  written again whole (for small logs such as config_history.jsonl)."""
  target = path(p)
  if not is_url(p):
    with target.open("a") as f:
      f.write(text)
    return
  old = target.read_text() if target.exists() else ""
  target.write_text(old + text)


_CACHE: str | None = None


def _cache_dir() -> str:
  global _CACHE
  if _CACHE is None:
    _CACHE = tempfile.mkdtemp(prefix="qsft_jax_storage_")
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  return _CACHE


def local_copy(p: PathLike) -> str:
  """A local filesystem path holding the file or directory `p`, for readers that only open local
  files. A local `p` is returned as it is; a URL is copied, once per process, into a temporary
  directory removed at exit (a directory recursively). Raises FileNotFoundError when a URL does not
  exist."""
  p = os.fspath(p)
  if not is_url(p):
    return p
  source = path(p)
  if not source.exists():
    raise FileNotFoundError(f"{p}: no such file or directory")
  key = hashlib.sha256(normalize(p).encode()).hexdigest()[:16]
  dst = os.path.join(_cache_dir(), key, source.name)
  if os.path.exists(dst):
    return dst
  tmp = os.path.join(_cache_dir(), f"{key}.partial{os.getpid()}")
  _copy_tree(source, os.path.join(tmp, source.name))
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  os.replace(os.path.join(tmp, source.name), dst)
  shutil.rmtree(tmp, ignore_errors=True)
  return dst


def _copy_tree(source: epath.Path, dst: str) -> None:
  if source.is_dir():
    os.makedirs(dst, exist_ok=True)
    for child in source.iterdir():
      _copy_tree(child, os.path.join(dst, child.name))
  else:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with source.open("rb") as f, open(dst, "wb") as out:
      shutil.copyfileobj(f, out, 1 << 20)


def url_files(p: str, suffix: str) -> list[str]:
  """The files a URL names, sorted: the file itself; every file ending in `suffix` under a directory,
  recursively; or the files matching a glob (`*`, `?`, `[...]` within one level; a recursive `**` is
  refused, since each level costs a listing request). [] when nothing matches."""
  target = path(p)
  if target.is_dir():
    return sorted(_files_under(target, suffix))
  if target.exists():
    return [p]
  parts = p.split("/")
  first = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), None)
  if first is None:
    return []
  if any("**" in part for part in parts[first:]):
    raise FileNotFoundError(f"{p}: a recursive ** glob is not supported on a URL; name the directory "
                            f"(all *{suffix} inside are read) or a one-level glob")
  root = path("/".join(parts[:first]))
  return sorted(os.fspath(f) for f in root.glob("/".join(parts[first:])) if not f.is_dir())


@contextlib.contextmanager
def staged_dir(p: PathLike) -> Iterator[str]:
  """A local directory for writers of local files only (the profiler, safetensors): `p` itself when
  it is local (created); for a URL a temporary directory, uploaded to `p` (`upload_tree`) when the
  block completes and removed either way."""
  p = os.fspath(p)
  if not is_url(p):
    os.makedirs(p, exist_ok=True)
    yield p
    return
  with tempfile.TemporaryDirectory(prefix="qsft_jax_staged_") as tmp:
    yield tmp
    upload_tree(tmp, p)


def upload_tree(local_dir: PathLike, p: PathLike) -> None:
  """Copies the files under the local directory `local_dir` to the same relative paths under `p`."""
  for root, _, names in os.walk(local_dir):
    rel = os.path.relpath(root, local_dir)
    target = path(p) if rel == "." else path(p) / rel
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
      with open(os.path.join(root, name), "rb") as f, (target / name).open("wb") as out:
        shutil.copyfileobj(f, out, 1 << 20)


def _files_under(directory: epath.Path, suffix: str) -> Iterator[str]:
  for child in directory.iterdir():
    if child.is_dir():
      yield from _files_under(child, suffix)
    elif child.name.endswith(suffix):
      yield os.fspath(child)
