"""The one error type for problems the user can fix: printed as one line (`error: ...`, exit 2), never a traceback.

Raise it (or a subclass) with a message that names the fix. Modules below the CLI raise it too, so the
CLI needs no list of exception types to translate.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or environment; the message says what to do about it."""
