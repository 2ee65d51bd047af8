"""All byte I/O of the tool: one store interface (Storage), one class per kind of store.

`Storage(url, storage_options)` opens a store and returns an object of the kind that serves the URL's filesystem:

- base_storage: the interface (Storage: paths, metadata, reads, writes, capability flags), the shared helpers
  (retries, errors, range merging, Fetched) and the kind registry (storage_kind, fallback_kind);
- local_storage: LocalStorage, local files (pread/pwrite on cached descriptors, fadvise, copy loops);
- fsspec_storage: FsspecStorage, any other fsspec filesystem, through its own calls;
- s3_storage: S3Storage (s3fs): conditional reads on pinned ETags, streamed ranged GETs, batched deletes,
  server-side copies, multipart uploads, conditional writes.

The modules are named `<kind>_storage.py` so that a traceback's file names say they are storage code.
Importing this package registers every kind, whichever module of it an importer names.
"""

import os  # noqa: F401 - convert.io.storage.os: the os module the stores call (tests patch os.replace through it)

from convert.io.storage.base_storage import (
    MAX_JSON_BYTES, PIN_WORKERS, RETRIES, S3_GET_BYTES, Fetched, Storage, fallback_kind, merge_ranges, storage_error,
    storage_kind, temp_name, with_retries,
)
from convert.io.storage.fsspec_storage import PIN_KEYS, PIN_TIME_KEYS, FsspecStorage
from convert.io.storage.local_storage import (
    _SYNC_FILE_RANGE_WRITE, COPY_BUFFER_BYTES, LOCAL_COPY, WRITE_BEHIND, LocalStorage, _sync_file_range,
)
from convert.io.storage.s3_storage import (
    S3_CONDITIONAL_READS, S3_POOL, S3_RETRY_ATTEMPTS, S3_RETRY_MODE, S3_STREAM_BYTES, S3RangeReader, S3Storage,
    fail_fast_when_unreachable,
)

__all__ = [
    "COPY_BUFFER_BYTES", "LOCAL_COPY", "MAX_JSON_BYTES", "PIN_KEYS", "PIN_TIME_KEYS", "PIN_WORKERS", "RETRIES",
    "S3_CONDITIONAL_READS", "S3_GET_BYTES", "S3_POOL", "S3_RETRY_ATTEMPTS", "S3_RETRY_MODE", "S3_STREAM_BYTES",
    "WRITE_BEHIND", "Fetched", "FsspecStorage", "LocalStorage", "S3RangeReader", "S3Storage", "Storage",
    "fail_fast_when_unreachable", "fallback_kind", "merge_ranges", "storage_error", "storage_kind", "temp_name",
    "with_retries",
]
