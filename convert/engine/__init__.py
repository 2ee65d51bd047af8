"""Running a plan: the job (plan / execute / commit), executor, sinks (local files, multipart uploads), storage (local, fsspec, S3), resume journal and output record."""
