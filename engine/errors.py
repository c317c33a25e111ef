"""One exception type for every problem a user can fix (bad file, bad option, missing model).

The CLI prints `UserError` as one line and exits non-zero; the UI shows it as a message.
Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class Cancelled(Exception):
    """Reading or generation was cancelled by the user between chunks."""
