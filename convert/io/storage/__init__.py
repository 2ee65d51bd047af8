"""All byte I/O of the tool: one store interface (Storage), one class per kind of store.

`Storage(url, storage_options, settings)` opens a store and returns an object of the kind that serves the URL's
filesystem, tuned by `settings` (convert.settings.StorageSettings, read from the environment by the entry point
when a job starts; the defaults where none are given):

- base_storage: the interface (Storage: paths, metadata, reads, writes, capability flags), the shared helpers
  (retries, errors, range merging, Fetched) and the kind registry (storage_kind, fallback_kind);
- local_storage: LocalStorage, local files (pread/pwrite on cached descriptors, fadvise, copy loops);
- fsspec_storage: FsspecStorage, any other fsspec filesystem, through its own calls;
- s3_storage: S3Storage (s3fs): conditional reads on pinned ETags, streamed ranged GETs, batched deletes,
  server-side copies, multipart uploads, conditional writes.

The modules are named `<kind>_storage.py` so that a traceback's file names say they are storage code.
Importing this package registers every kind, whichever module of it an importer names; none reads the
environment.
"""

import os  # noqa: F401 - convert.io.storage.os: the os module the stores call (tests patch os.replace through it)

from convert.io.storage.base_storage import (
    MAX_JSON_BYTES,
    Fetched,
    Storage,
    fallback_kind,
    merge_ranges,
    storage_error,
    storage_kind,
    temp_name,
    with_retries,
)
from convert.io.storage.fsspec_storage import PIN_KEYS, PIN_TIME_KEYS, FsspecStorage
from convert.io.storage.local_storage import COPY_BUFFER_BYTES, LocalStorage
from convert.io.storage.s3_storage import S3RangeReader, S3Storage, fail_fast_when_unreachable
from convert.settings import DEFAULT_STORAGE_SETTINGS, StorageSettings

__all__ = [
    "COPY_BUFFER_BYTES", "DEFAULT_STORAGE_SETTINGS", "MAX_JSON_BYTES", "PIN_KEYS", "PIN_TIME_KEYS", "Fetched",
    "FsspecStorage", "LocalStorage", "S3RangeReader", "S3Storage", "Storage", "StorageSettings",
    "fail_fast_when_unreachable", "fallback_kind", "merge_ranges", "storage_error", "storage_kind", "temp_name",
    "with_retries",
]
