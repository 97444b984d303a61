"""How a command ends when it cannot go on: one line on stderr and an exit status, never a traceback.

- `UserError`: a mistake the user can fix (a wrong path, a checkpoint for another network, bad data, a flag
  combination that makes no sense). Printed as `error: <what to fix>`, exit status 2 (argparse's status
  for a bad command line). Its message must name the file, flag or setting to change.
- `StopCommand`: the base of every such ending; a subclass sets its exit status and the printed text
  (the training loop's stop on SIGTERM exits with 143 and on SIGINT with 130, as a shell reports a process
  ended by that signal).
- `PeerStopped`: another process of a distributed run met the error and prints it; this one ends with the
  same exit status and prints nothing, so a failing run shows one message, not one per process.

`run_main(main, argv)` is the top level of every command of the repository; Ctrl-C outside the training loop
(which saves and stops on its own) ends a command with one line and exit status 130, without a traceback.
"""
import signal
import sys

# The exit status of a command interrupted by Ctrl-C (128 + SIGINT, as a shell reports it).
EXIT_INTERRUPTED = 128 + signal.SIGINT


class StopCommand(Exception):
    """A command stops early on purpose: `run_main` prints the message and returns `exit_status`."""

    exit_status = 1

    def describe(self):
        return str(self)


class PeerStopped(StopCommand):
    """Another process of the run stopped with an error that it prints; this process stops too, silently."""

    def __init__(self, exit_status):
        super().__init__('')
        self.exit_status = exit_status

    def describe(self):
        return ''


class RelayedError(StopCommand):
    """The error another process met, printed by rank 0 in its place (`text` is the line to print)."""

    def __init__(self, text, exit_status):
        super().__init__(text)
        self.exit_status = exit_status


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
    """Run `main(argv)`; a StopCommand prints its message (if any) on stderr and gives its exit status, Ctrl-C
    gives 130, else 0."""
    stderr = stderr or sys.stderr
    try:
        main(argv)
    except StopCommand as stop:
        text = stop.describe()
        if text:
            print(text, file=stderr)
        return stop.exit_status
    except KeyboardInterrupt:
        print('interrupted (Ctrl-C)', file=stderr)
        return EXIT_INTERRUPTED
    return 0
