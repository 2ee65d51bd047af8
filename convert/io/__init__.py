"""Byte I/O under every layer: storage (local files, fsspec, S3 with retries) and transient buffer memory."""
