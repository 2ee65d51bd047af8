"""Byte I/O under every layer: storage (local files, fsspec, S3 with retries), source pins and transient buffer
memory."""
