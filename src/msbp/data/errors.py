"""The one error type of the data loaders."""

from __future__ import annotations


class DataError(ValueError):
    """Data is missing or malformed; the message is one line that says what to do.

    A ``ValueError``, as every bad-input error of msbp is; the CLI prints it without a traceback.
    """
