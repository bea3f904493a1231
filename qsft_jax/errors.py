"""The errors a user can fix, and how programs report them.

A `UserError` names what is wrong and where (the file and line, the config field, the step) and what
to do. Programs print its message alone, one line, exit with status 1 and no traceback; with
QSFT_DEBUG=1 in the environment the traceback is shown too. Anything else is a bug, and keeps its
traceback.
"""
from __future__ import annotations


class UserError(Exception):
  """A failure caused by the input (config, data, workdir, environment), not by the code."""
