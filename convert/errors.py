"""Errors the tool reports to the user (one clear line, non-zero exit)."""


class ConversionError(Exception):
    """Bad input or an impossible request; the message names the file/tensor and what was expected."""
