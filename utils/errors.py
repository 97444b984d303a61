"""The one exception type for mistakes a user can fix (a wrong path, a checkpoint for another network,
bad data, a flag combination that makes no sense).

Scripts catch it at the top level and print its message without a traceback (exit status 2); the
message itself must say what is wrong and what to change (the file, flag or setting).
"""


class UserError(Exception):
    """An error caused by the user's input, with a message that says how to fix it."""
