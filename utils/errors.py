"""How a command ends when it cannot go on: one line on stderr and an exit status, never a traceback.

- `UserError`: a mistake the user can fix (a wrong path, a checkpoint for another network, bad data, a flag
  combination that makes no sense). Printed as `error: <what to fix>`, exit status 2 (argparse's status
  for a bad command line). Its message must name the file, flag or setting to change.
- `StopCommand`: the base of every such ending; a subclass sets its exit status and the printed text
  (the training loop's SIGTERM stop exits with 143, as a shell reports a process ended by SIGTERM).

`run_main(main, argv)` is the top level of every command of the repository.
"""
import sys


class StopCommand(Exception):
    """A command stops early on purpose: `run_main` prints the message and returns `exit_status`."""

    exit_status = 1

    def describe(self):
        return str(self)


class UserError(StopCommand):
    """An error caused by the user's input, with a message that says how to fix it."""

    exit_status = 2

    def describe(self):
        return user_message(self)


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


def run_main(main, argv=None, stderr=None):
    """Run `main(argv)`; a StopCommand prints its message on stderr and gives its exit status, else 0."""
    try:
        main(argv)
    except StopCommand as stop:
        print(stop.describe(), file=stderr or sys.stderr)
        return stop.exit_status
    return 0
