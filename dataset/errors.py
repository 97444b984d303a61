"""The error for bad data on disk."""
from utils.errors import UserError


class DataError(UserError):
    """Bad data on disk: a missing root or file, an unreadable image, a label that does not fit."""
