"""All byte I/O of the tool: one small store protocol (Store), one class per kind of store.

`Storage(url, storage_options, settings)` opens a store and returns an object of the kind that serves the URL's
filesystem, tuned by `settings` (convert.settings.StorageSettings, read from the environment by the entry point
when a job starts; the defaults where none are given). Callers type against the protocols of `store`:

- store: the protocols (Store: paths, metadata, reads, writes, life cycle; its capability objects, each an object
  or None: pinning (convert.io.pins.SourcePinning, every kind), positional (PositionalWrites, local),
  multipart (MultipartUploads, S3), conditional (ConditionalObjects, S3)) and the helpers built on them
  (read_json, fetch and Fetched, merge_ranges, copy_by_reading);
- base_storage: the base the kinds share (Storage: fsspec calls, retries, error naming; Pinning: pins of a store
  whose reads take no conditions), the shared helpers (with_retries, storage_error, temp_name) and the kind
  registry (storage_kind, fallback_kind);
- local_storage: LocalStorage, local files (pread on cached descriptors, fadvise; LocalPositional: pwrite, copy
  loops, write-behind, fsync; LocalPinning: stat);
- fsspec_storage: FsspecStorage, any other fsspec filesystem, through its own calls (FsspecPinning: info());
- s3_storage: S3Storage (s3fs): streamed ranged GETs, batched deletes, server-side copies; S3Pinning (pins from
  listings, reads conditional on pinned ETags), S3Multipart (multipart uploads), S3Conditional (conditional
  writes).

The modules are named `<kind>_storage.py` so that a traceback's file names say they are storage code.
Importing this package registers every kind, whichever module of it an importer names; none reads the
environment.
"""

import os  # noqa: F401 - convert.io.storage.os: the os module the stores call (tests patch os.replace through it)

from convert.io.storage.base_storage import (
    Pinning,
    Storage,
    fallback_kind,
    storage_error,
    storage_kind,
    temp_name,
    with_retries,
)
from convert.io.storage.fsspec_storage import PIN_KEYS, PIN_TIME_KEYS, FsspecPinning, FsspecStorage
from convert.io.storage.local_storage import COPY_BUFFER_BYTES, LocalPinning, LocalPositional, LocalStorage
from convert.io.storage.s3_storage import (
    S3Conditional,
    S3Multipart,
    S3Pinning,
    S3RangeReader,
    S3Storage,
    fail_fast_when_unreachable,
)
from convert.io.storage.store import (
    MAX_JSON_BYTES,
    ConditionalObjects,
    Fetched,
    MultipartUploads,
    PositionalWrites,
    SourcePinning,
    Store,
    copy_by_reading,
    fetch,
    merge_ranges,
    read_json,
)
from convert.settings import DEFAULT_STORAGE_SETTINGS, StorageSettings

__all__ = [
    "COPY_BUFFER_BYTES", "DEFAULT_STORAGE_SETTINGS", "MAX_JSON_BYTES", "PIN_KEYS", "PIN_TIME_KEYS",
    "ConditionalObjects", "Fetched", "FsspecPinning", "FsspecStorage", "LocalPinning", "LocalPositional",
    "LocalStorage", "MultipartUploads", "Pinning", "PositionalWrites", "S3Conditional", "S3Multipart", "S3Pinning",
    "S3RangeReader", "S3Storage", "SourcePinning", "Storage", "Store", "StorageSettings", "copy_by_reading", "fetch",
    "fail_fast_when_unreachable", "fallback_kind", "merge_ranges", "read_json", "storage_error", "storage_kind",
    "temp_name", "with_retries",
]
