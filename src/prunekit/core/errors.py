"""Errors prunekit raises on purpose. Each message says what is wrong and what to do."""


class PrunekitError(Exception):
    """Base class: every error prunekit raises deliberately derives from it."""


class ConfigError(PrunekitError, ValueError):
    """A config, recipe, target or flag is invalid."""


class UnsupportedOpError(PrunekitError):
    """The graph met an operation it has no channel rule for."""


class PruningError(PrunekitError):
    """A plan cannot be applied (group emptied, unknown module, shape mismatch)."""


class CheckpointError(PrunekitError):
    """A saved model, plan or checkpoint is missing, corrupt or does not fit the model."""
