"""User-facing errors.

Anything the user can fix (bad path, bad spec, mismatched shapes, ...) is raised as a
:class:`CompressError`. The CLI turns it into one line on stderr and exit code 2; library
users catch it like any other exception.
"""

from __future__ import annotations


class CompressError(Exception):
    """An error caused by the user's input, with a message that says how to fix it."""

    exit_code = 2
