"""The exceptions rlsedit raises on purpose.

Every message says what was expected, what came, and how to fix it. The CLI turns any
``RLSEditError`` into a one-line message and a non-zero exit; anything else is a bug.
"""


class RLSEditError(Exception):
    """Base class of every error rlsedit raises deliberately."""


class InvalidRequestError(RLSEditError, ValueError):
    """An edit request (or a file of them) is malformed: missing subject, empty target, ..."""


class NumericalError(RLSEditError, ArithmeticError):
    """Non-finite inputs, or a system that is not positive definite. Nothing was applied."""


class ModelLoadError(RLSEditError):
    """A model spec could not be resolved or loaded (offline hub name, missing file, ...)."""


class UnsupportedError(RLSEditError):
    """The operation is not supported by this method or architecture (e.g. exact undo for MEMIT)."""


class StateError(RLSEditError):
    """A lifelong-state directory problem."""


class StateCorruptError(StateError):
    """A state file is truncated, corrupted or tampered with (checksum mismatch)."""


class StateMismatchError(StateError):
    """The state directory belongs to another model, layer set or shape."""


class StateLockedError(StateError):
    """Another process holds the state directory's lock."""
