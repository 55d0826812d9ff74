"""The one base of the errors a person can act on.

A bad YAML key, a task without data, a damaged checkpoint, a stage that cannot start: each raises a subclass of
``AlterDsError`` whose message says what is wrong and what to do. The entry points (``alter-ds``, the trainer)
print such an error as one line and exit with status 2 on every rank; any other exception is a bug and keeps
its traceback. Each subclass also keeps the builtin base it had (``ValueError`` or ``RuntimeError``), so code
that catches those still does.
"""

from __future__ import annotations


class AlterDsError(Exception):
    """An error in what the user asked for or gave (config, data, files), not in alter-ds itself."""


class UsageError(AlterDsError, ValueError):
    """A model or stage asked for something it cannot do: a train entry that matches nothing, a router that
    needs shared experts, a task that already exists, a directory that is not an alter-ds model."""


class MissingFileError(AlterDsError, FileNotFoundError):
    """A file or directory the run needs is not there (a model, a stage's export, the launcher)."""
