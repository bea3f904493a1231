"""The errors a user can fix, and how programs report them.

A `UserError` names what is wrong and where (the file and line, the config field, the step) and what
to do. Every program reports one through `qsft_jax.cli.run`: its message alone as
`FATAL: PROG: message` on stderr (a message of several lines, e.g. a list of bad data lines, keeps
its lines and nothing else), exit status 1 and no traceback; with QSFT_DEBUG=1 in the environment the
traceback is shown too. Anything else is a bug, and keeps its traceback.

A directory that cannot be written (read-only file system, no permission) or a full disk is also the
user's to fix: `storage_error` recognises one in any exception, including orbax's and tensorstore's
asynchronous save failures, which reach the program as other exception types with the OS error in
their message, and turns it into a `StorageError` naming the path.

This module imports nothing from qsft_jax, so every module may raise these errors.
"""
from __future__ import annotations

import errno
import os
import re

DEBUG_ENV = "QSFT_DEBUG"  # QSFT_DEBUG=1: programs show the traceback of a UserError too


class UserError(Exception):
  """A failure caused by the input (config, data, workdir, environment), not by the code."""


class ConfigError(UserError, ValueError):
  """A config that cannot run; the message names the field ("config.FIELD: ...")."""


class NotFoundError(UserError, FileNotFoundError):
  """A file or directory the user named (a workdir, a checkpoint) does not exist or is incomplete."""


class StorageError(UserError):
  """A path a program writes to is read-only, not permitted, or on a full device.

  `errno`: the OS error (EROFS, EACCES, EPERM or ENOSPC); `path`: the path it names (None if unknown).
  """

  def __init__(self, message: str, errno_: int, path: str | None):
    super().__init__(message)
    self.errno, self.path = errno_, path


# errno -> what it means for a program that writes there
_NOT_WRITABLE = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                 errno.EPERM: "operation not permitted"}
_STORAGE_ERRNOS = (*_NOT_WRITABLE, errno.ENOSPC)
# The same failures as other libraries word them: the strerror texts, tensorstore under orbax
# ("... No space left on device [os_error_code='28']"), Python's "[Errno 28] ...".
_CODE = r"\b(?:Errno|OS error|errno|os_error_code)[ =:']*{}\b"
_MESSAGE_PATTERNS = (
    (errno.ENOSPC, re.compile(r"No space left on device|" + _CODE.format(28), re.I)),
    (errno.EROFS, re.compile(r"Read-only file system|" + _CODE.format(30), re.I)),
    (errno.EACCES, re.compile(r"Permission denied|" + _CODE.format(13), re.I)),
    # a bucket refusing the caller: gcsfs ("... does not have storage.objects.create access ..."),
    # tensorstore ("PERMISSION_DENIED: ...")
    (errno.EACCES, re.compile(r"does not have storage\.\w+\.\w+ access|PERMISSION_DENIED")),
    (errno.EPERM, re.compile(r"Operation not permitted|" + _CODE.format(1), re.I)),
)
# A quoted absolute path in a library's message ("Error writing local file \"/w/bc/...\"").
_QUOTED_PATH = re.compile(r"""["'](/[^"']+)["']""")


def _chain(exc: BaseException):
  """`exc`, its causes and contexts, and the members of exception groups, each once."""
  seen, todo = set(), [exc]
  while todo:
    e = todo.pop(0)
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    yield e
    todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]


def _storage_failure(exc: BaseException) -> tuple[int, str | None] | None:
  """(errno, the path named, if any) of the first storage failure in exc's chain, else None."""
  for e in _chain(exc):
    if isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS:
      return e.errno, e.filename if isinstance(e.filename, str) else None
  for e in _chain(exc):
    text = str(e)
    for code, pattern in _MESSAGE_PATTERNS:
      if pattern.search(text):
        path = _QUOTED_PATH.search(text)
        return code, path[1] if path else None
  return None


def storage_error(exc: BaseException, workdir: str | None = None, *,
                  resumes: bool = False) -> StorageError | None:
  """A StorageError describing `exc` when it (or an exception in its chain) is a failure to write:
  read-only file system, permission denied, no space left on the device. None otherwise.

  `workdir`: the directory the program writes into, if it has one: named when the failure names no
  path, and the thing to make writable when the failing path lies inside it.
  `resumes`: the program resumes from its last complete checkpoint when rerun (the trainer); the
  message says so.
  """
  if isinstance(exc, StorageError):
    return exc
  found = _storage_failure(exc)
  if found is None:
    return None
  code, path = found
  path = path or workdir
  rerun = ("rerun the same command: it resumes from the last complete checkpoint" if resumes
           else "rerun the same command")
  if code == errno.ENOSPC:
    elsewhere = "choose another --workdir" if workdir else "write elsewhere"
    message = (f"{path or 'a write'}: no space left on the device; free some space (or "
               f"{elsewhere}), then {rerun}")
  elif workdir and "://" in workdir and (path is None or _inside(path, workdir)):
    message = (f"{path}: {_NOT_WRITABLE[code]}; the credentials in use (Google's application default "
               f"credentials: README, Runs in a bucket) must be allowed to read and write {workdir}, or "
               "choose another --workdir")
  elif workdir and (path is None or _inside(path, workdir)):
    message = (f"{path}: not writable ({_NOT_WRITABLE[code]}); make the workdir {workdir} writable "
               "or choose another --workdir")
  else:
    message = (f"{path or 'a file'}: {_NOT_WRITABLE[code]}; make it writable (and readable) or "
               "choose another path")
  return StorageError(message, code, path)


def _inside(path: str, directory: str) -> bool:
  if "://" not in path + directory:  # local paths; a URL (gs://...) is compared as written
    path, directory = os.path.abspath(path), os.path.abspath(directory)
  return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)
