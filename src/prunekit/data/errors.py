"""The error data loading raises when files are missing, corrupt or in an unknown layout."""
from ..core.errors import PrunekitError


class DataError(PrunekitError):
    """A dataset file or folder is missing, corrupt (checksum mismatch) or laid out wrongly.

    The message names the path, what was expected there, and how to fix it (for example:
    pass `root=` a local copy of the official archive).
    """
