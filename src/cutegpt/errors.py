"""The one exception type for mistakes a user can cause.

The CLI prints its message (one sentence naming the file or value and what is
wrong) and exits with code 1; anything else is a bug and shows a traceback
with `--debug`.
"""


class CuteGPTError(Exception):
    """A problem with the user's input, files or settings."""
