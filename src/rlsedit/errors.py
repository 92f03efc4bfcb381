"""The exceptions rlsedit raises on purpose, and the command's exit code for each.

Every message says what was expected, what came, and how to fix it. The CLI turns any
``RLSEditError`` into a one-line message and the class's ``exit_code``; anything else is a
bug (a traceback and exit code 1). Exit codes of ``rlsedit``:

====  =====================================================================
0     success
1     unexpected error (a bug: please report the traceback)
2     usage: the command line itself is wrong (argparse)
3     invalid input: an edit, a data file, an option value, a configuration
      (also ``edit --skip-bad`` when every edit was skipped)
4     the state directory is locked by another process
5     a state file is corrupt (truncated, damaged, tampered with)
6     the state was made for another model, method, layers or settings
7     numerical refusal: non-finite values or an ill-conditioned system
8     the model could not be loaded
9     the operation is not supported by this method or architecture
10    another state-directory problem (not a state, no snapshot yet, opened read-only)
====  =====================================================================
"""


class RLSEditError(Exception):
    """Base class of every error rlsedit raises deliberately."""

    exit_code = 3


class InvalidRequestError(RLSEditError, ValueError):
    """An edit request (or a file of them) is malformed: missing subject, empty target, ..."""


class UsageError(InvalidRequestError):
    """The command line names no work, or misses an option the work needs (exit code 2, as
    argparse's own refusals)."""

    exit_code = 2


class NumericalError(RLSEditError, ArithmeticError):
    """Non-finite inputs, or a system that is not positive definite. Nothing was applied."""

    exit_code = 7


class ModelLoadError(RLSEditError):
    """A model spec could not be resolved or loaded (offline hub name, missing file, ...)."""

    exit_code = 8


class UnsupportedError(RLSEditError):
    """The operation is not supported by this method or architecture (e.g. exact undo for MEMIT)."""

    exit_code = 9


class StateError(RLSEditError):
    """A lifelong-state directory problem."""

    exit_code = 10


class StateCorruptError(StateError):
    """A state file is truncated, corrupted or tampered with (checksum mismatch)."""

    exit_code = 5


class StateMismatchError(StateError):
    """The state directory belongs to another model, layer set or shape."""

    exit_code = 6


class StateLockedError(StateError):
    """Another process holds the state directory's lock."""

    exit_code = 4
