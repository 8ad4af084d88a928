"""Errors prunekit raises on purpose. Each message says what is wrong and what to do."""


class PrunekitError(Exception):
    """Base class: every error prunekit raises deliberately derives from it."""


class ConfigError(PrunekitError, ValueError):
    """A config, recipe, target or flag is invalid."""


class ConfigSchemaError(ConfigError):
    """A config written for another schema: another version, or keys this prunekit does not know.
    Unlike other ConfigErrors it says nothing of damage: another prunekit may read it."""


class UnsupportedOpError(PrunekitError):
    """The graph met an operation it has no channel rule for."""


class PruningError(PrunekitError):
    """A plan cannot be applied (group emptied, unknown module, shape mismatch)."""


class CheckpointError(PrunekitError):
    """A saved model, plan or checkpoint is missing, corrupt or does not fit the model."""


class TrainingError(PrunekitError):
    """Training cannot go on (its loss or gradients stopped being finite)."""


class PrunekitWarning(UserWarning):
    """Something prunekit did that the caller should know of (a fallback, a capped target, timings
    taken on more threads than cores); filter it with warnings.simplefilter("ignore", PrunekitWarning)."""


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


def read_json(path, what: str, todo: str, error: type[PrunekitError] = CheckpointError, mapping: bool = False):
    """The JSON document in the file `path`, or one `error` naming the file, what it should be and
    what to do (`todo`): for a missing or unreadable file, text that is not UTF-8 or not JSON,
    nesting too deep for the parser, and (with `mapping`) a document that is not an object.

    >>> read_json("/nonexistent.json", "plan", "save it again")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    prunekit.core.errors.CheckpointError: plan /nonexistent.json cannot be read (FileNotFoundError: ...); save it again
    """
    import json
    from pathlib import Path

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise error(f"{what} {path} cannot be read ({type(err).__name__}: {str(err)[:200]}); {todo}") from None
    except (ValueError, RecursionError) as err:  # ValueError: not UTF-8 or not JSON
        raise error(f"{what} {path} is not valid JSON ({type(err).__name__}: {str(err)[:200]}); {todo}") from None
    if mapping and not isinstance(data, dict):
        raise error(f"{what} {path} holds a JSON {type(data).__name__}, not an object; {todo}")
    return data
