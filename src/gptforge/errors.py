"""The one exception type for bad input.

Library code raises GptforgeError with a single line that says what is wrong and what to do.
The CLI prints it as `gptforge: error: <message>` and exits with status 2, without a traceback.
Anything else escaping is a bug and keeps its traceback.
"""


class GptforgeError(Exception):
    """A user-facing error: one line naming the problem and the fix."""

    exit_code = 2
