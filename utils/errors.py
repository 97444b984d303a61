"""The one exception type for mistakes a user can fix (a wrong path, a checkpoint for another network,
bad data, a flag combination that makes no sense).

Scripts catch it at the top level and print its message without a traceback (exit status 2); the
message itself must say what is wrong and what to change (the file, flag or setting).
"""


class UserError(Exception):
    """An error caused by the user's input, with a message that says how to fix it."""


# A DataLoader worker re-raises its exception in the main process with the worker's traceback folded
# into the message, under this header; the user needs only the last line, the original message.
_WORKER_HEADER = 'Original Traceback (most recent call last):'


def user_message(error):
    """The message of a UserError as a user should see it: `error: <what to fix>`."""
    text = str(error)
    if _WORKER_HEADER in text:
        last = text.strip().splitlines()[-1]
        name = type(error).__name__ + ': '
        text = last.split(name, 1)[1] if name in last else last
    return f'error: {text}'
