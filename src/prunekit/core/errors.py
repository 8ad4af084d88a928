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


def load_error_text(err: BaseException, limit: int = 300) -> str:
    """One line from a failed `load_state_dict` / safetensors load, naming what differs.

    torch's message opens with a bare header ('Error(s) in loading state_dict for SmallCNN:')
    and names the keys and shapes on the lines after it; the header is dropped, the rest joined.

    >>> load_error_text(RuntimeError('Error(s) in loading state_dict for M:\\n\\tMissing key(s) in state_dict: "fc.weight".'))
    'Missing key(s) in state_dict: "fc.weight".'
    """
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        lines = lines[1:]
    text = " ".join(lines)
    return (text[:limit] + " ...") if len(text) > limit else (text or type(err).__name__)
