"""The one error type of the data loaders."""

from __future__ import annotations


class DataError(Exception):
    """Data is missing or malformed; the message is one line that says what to do."""
