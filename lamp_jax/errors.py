"""The exception types the command line turns into one line: mistakes in what a user asked for
(:class:`UsageError`, exit status 2) and failed writes to a run's storage (:class:`StorageError`,
exit status 75).

A missing file, a bad config value, a model directory that is not one, an unknown relation, a
prompt without ``[MASK]``: raise :class:`UsageError` (or :class:`MissingFileError`) with a
message that names the file, line, field or relation, and what would be right. The command
line (:mod:`lamp_jax.cli`) prints ``error: <message>`` and exits with status 2, without a
traceback; everything else is a bug and keeps its traceback. Both subclass the built-in types
that code and tests already catch (``ValueError``, ``FileNotFoundError``).
"""

from __future__ import annotations


class UsageError(ValueError):
    """A mistake in the user's input: the message alone says what is wrong and where."""


class MissingFileError(UsageError, FileNotFoundError):
    """A file or directory the user named does not exist (or is not what it should be)."""


class StorageError(OSError):
    """A write to the run's storage failed (a full disk, a bucket error, a permission lost
    mid-run): the run stopped with its last committed checkpoint intact. The command line
    prints ``error: <message>`` (naming the path and the error) and exits with status 75
    (EX_TEMPFAIL, as a preemption): rerun the same command once the storage is fixed.

    ``writes_in_flight``: raised by a real write (:func:`lamp_jax.paths.storage_write`), after
    which client threads may still be busy with the storage that failed (Orbax's threads of a
    failed checkpoint wait up to 300 s for one another; a bucket write past its deadline keeps
    retrying). The command line then leaves at once instead of waiting for them at exit."""

    writes_in_flight = False
