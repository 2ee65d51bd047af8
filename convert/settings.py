"""A job's tuning settings and test hooks: read from the environment once, when a job starts, and passed down.

`Settings` holds the `MOE_CONVERT_*` knobs of the engine (parts and upload threads on an object store, the
journal's pace, the destination lock's times, the verifier's memory, a merge piece's size), and in
`Settings.storage` those of the stores (`StorageSettings`: retries, request sizes, the S3 client, local copies,
read-ahead; docs/ENVIRONMENT.md lists every variable). The entry points (convert.cli and the commands built on it, convert.verify, convert.inspect,
launch.batch) read them with `Settings.from_env()` when a job starts, never at import, and hand them to the job in
its options (JobOptions.settings, VerifyOptions.settings); the job opens its stores with
`Storage(url, storage_options, settings.storage)`. Code that builds a job or opens a store itself passes its own,
or gets the defaults (the environment is then not read).

`JobHooks` are test hooks only: a crash or pause after a rank wrote so many bytes, and gates the job waits at
(before it takes the destination's lock, before its commit). Tests of the engine in this process set them on the
options; tests that run the tool as a subprocess (crash, interrupt and lock tests) inject them through the
environment, which only `JobHooks.from_env()` reads, at the same entry point. A user never sets them.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field


class _Env:
    """Typed reads of one environment mapping: an unset or empty variable gives the default."""

    def __init__(self, environ: Mapping[str, str] | None) -> None:
        self.env: Mapping[str, str] = os.environ if environ is None else environ

    def integer(self, name: str, default: int) -> int:
        """The integer `name` holds, else `default`."""
        text = self.env.get(name)
        return int(text) if text else default

    def optional_integer(self, name: str) -> int | None:
        """The integer `name` holds, else None."""
        text = self.env.get(name)
        return int(text) if text else None

    def number(self, name: str, default: float) -> float:
        """The number `name` holds, else `default`."""
        text = self.env.get(name)
        return float(text) if text else default

    def text(self, name: str, default: str) -> str:
        """The text `name` holds, else `default`."""
        return self.env.get(name) or default

    def flag(self, name: str, default: bool) -> bool:
        """False where `name` is "0", True where it holds anything else, `default` where it is unset or empty."""
        text = self.env.get(name)
        return text != "0" if text else default


@dataclass(frozen=True)
class StorageSettings:
    """The stores' knobs (convert.io.storage; docs/ENVIRONMENT.md): held by every Storage, which takes them when it
    is opened (`Storage(url, storage_options, settings)`); its defaults those of an unset variable."""

    retries: int = 8  # MOE_CONVERT_RETRIES: attempts of an object-store operation that fails transiently
    control_threads: int = 16  # MOE_CONVERT_CONTROL_THREADS: requests at once outside the data phase (pins, copies)
    s3_get_bytes: int = 32 << 20  # MOE_CONVERT_S3_GET_BYTES: the largest ranged GET of merged touching reads
    s3_stream_bytes: int = 256 << 20  # MOE_CONVERT_S3_STREAM_BYTES: bytes of one streamed span of a byte copy
    s3_pool: int = 64  # MOE_CONVERT_S3_POOL: connections of the S3 client (also: header reads at once)
    s3_retry_mode: str = "standard"  # MOE_CONVERT_S3_RETRY_MODE: botocore's retry mode
    s3_retry_attempts: int = 5  # MOE_CONVERT_S3_RETRY_ATTEMPTS: botocore's attempts per request
    s3_conditional_reads: bool = True  # MOE_CONVERT_S3_CONDITIONAL_READS (0: off): reads If-Match the pinned ETag
    local_copy: str = "buffered"  # MOE_CONVERT_LOCAL_COPY: "kernel": local byte copies by copy_file_range
    write_behind: bool = True  # MOE_CONVERT_WRITE_BEHIND (0: off): sync_file_range while local files are written
    read_ahead: int = 64 << 20  # MOE_CONVERT_READ_AHEAD: source bytes a rank asks ahead of its pieces (local; 0: none)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> StorageSettings:
        """The store settings `environ` (default os.environ) sets, every other one at its default (called by
        Settings.from_env, when a job starts)."""
        env, d = _Env(environ), cls()
        return cls(
            retries=env.integer("MOE_CONVERT_RETRIES", d.retries),
            control_threads=env.integer("MOE_CONVERT_CONTROL_THREADS", d.control_threads),
            s3_get_bytes=env.integer("MOE_CONVERT_S3_GET_BYTES", d.s3_get_bytes),
            s3_stream_bytes=env.integer("MOE_CONVERT_S3_STREAM_BYTES", d.s3_stream_bytes),
            s3_pool=env.integer("MOE_CONVERT_S3_POOL", d.s3_pool),
            s3_retry_mode=env.text("MOE_CONVERT_S3_RETRY_MODE", d.s3_retry_mode),
            s3_retry_attempts=env.integer("MOE_CONVERT_S3_RETRY_ATTEMPTS", d.s3_retry_attempts),
            s3_conditional_reads=env.flag("MOE_CONVERT_S3_CONDITIONAL_READS", d.s3_conditional_reads),
            local_copy=env.text("MOE_CONVERT_LOCAL_COPY", d.local_copy),
            write_behind=env.flag("MOE_CONVERT_WRITE_BEHIND", d.write_behind),
            read_ahead=env.integer("MOE_CONVERT_READ_AHEAD", d.read_ahead),
        )


DEFAULT_STORAGE_SETTINGS = StorageSettings()


@dataclass(frozen=True)
class Settings:
    """The engine's tuning knobs (docs/ENVIRONMENT.md): one object per job, its defaults those of an unset variable."""

    upload_threads: int = 64  # MOE_CONVERT_UPLOAD_THREADS: parts a rank builds and uploads at once (min(--workers, this))
    group_parts: int = 3  # MOE_CONVERT_GROUP_PARTS: parts whose source bytes touch are filled together, up to this many
    held_parts: int = 3  # MOE_CONVERT_HELD_PARTS: part bytes held per upload thread, in parts
    min_part: int | None = None  # MOE_CONVERT_MIN_PART: the smallest part but the last (None: S3's 5 MiB)
    max_part: int | None = None  # MOE_CONVERT_MAX_PART: a fixed largest part (None: sized to the job)
    journal_bytes: int = 256 << 20  # MOE_CONVERT_JOURNAL_BYTES: a rank journals finished pieces after this many bytes
    journal_seconds: float = 2.0  # MOE_CONVERT_JOURNAL_SECONDS: ... or after this many seconds of work
    lock_heartbeat_seconds: float = 5.0  # MOE_CONVERT_LOCK_HEARTBEAT_SECONDS: refresh of an object-store lock
    lock_stale_seconds: float = 60.0  # MOE_CONVERT_LOCK_STALE_SECONDS: a lock not refreshed this long is taken over
    verify_memory: int = 256 << 20  # MOE_CONVERT_VERIFY_MEMORY: bytes a verifying rank's comparing threads hold
    verify_read_ahead: int = 128 << 20  # MOE_CONVERT_VERIFY_READ_AHEAD: page cache asked ahead of the comparisons
    merge_run_bytes: int = 48 << 20  # MOE_CONVERT_MERGE_RUN_BYTES: float32 bytes one merge piece of experts works on
    storage: StorageSettings = field(default_factory=StorageSettings)  # the stores' knobs (StorageSettings)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """The settings `environ` (default os.environ) sets, every other one at its default. The one place that
        reads these variables; called by the entry points when a job starts (the module docstring lists them)."""
        env, d = _Env(environ), cls()
        return cls(
            upload_threads=env.integer("MOE_CONVERT_UPLOAD_THREADS", d.upload_threads),
            group_parts=env.integer("MOE_CONVERT_GROUP_PARTS", d.group_parts),
            held_parts=env.integer("MOE_CONVERT_HELD_PARTS", d.held_parts),
            min_part=env.optional_integer("MOE_CONVERT_MIN_PART"),
            max_part=env.optional_integer("MOE_CONVERT_MAX_PART"),
            journal_bytes=env.integer("MOE_CONVERT_JOURNAL_BYTES", d.journal_bytes),
            journal_seconds=env.number("MOE_CONVERT_JOURNAL_SECONDS", d.journal_seconds),
            lock_heartbeat_seconds=env.number("MOE_CONVERT_LOCK_HEARTBEAT_SECONDS", d.lock_heartbeat_seconds),
            lock_stale_seconds=env.number("MOE_CONVERT_LOCK_STALE_SECONDS", d.lock_stale_seconds),
            verify_memory=env.integer("MOE_CONVERT_VERIFY_MEMORY", d.verify_memory),
            verify_read_ahead=env.integer("MOE_CONVERT_VERIFY_READ_AHEAD", d.verify_read_ahead),
            merge_run_bytes=env.integer("MOE_CONVERT_MERGE_RUN_BYTES", d.merge_run_bytes),
            storage=StorageSettings.from_env(environ),
        )


DEFAULT_SETTINGS = Settings()

# The gates a job may be held at (JobHooks.gates): before it takes the destination's lock (its plan's look at the
# destination done), and before the final source check and commit (its lock held, its data written).
BEFORE_LOCK = "before_lock"
BEFORE_COMMIT = "before_commit"


@dataclass(frozen=True)
class JobHooks:
    """Test hooks (crash, interrupt and lock tests; never set by a user): none by default.

    `crash_after` / `pause_after`: (rank, bytes): that rank exits with 137 (a simulated crash) / stops until a signal
    ends it, once it has written that many bytes. `gates`: gate name (BEFORE_LOCK, BEFORE_COMMIT) -> PATH: rank 0
    creates PATH.waiting there and waits (at most 120 s) until PATH exists, so a test can act then.
    """

    crash_after: tuple[int, int] | None = None
    pause_after: tuple[int, int] | None = None
    gates: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> JobHooks:
        """TEST HARNESS ONLY: the hooks a test that runs the tool as a subprocess injects through its environment
        (MOE_CONVERT_CRASH_AFTER, MOE_CONVERT_PAUSE_AFTER = "RANK:BYTES"; MOE_CONVERT_PAUSE_BEFORE_LOCK,
        MOE_CONVERT_PAUSE_BEFORE_COMMIT = PATH). The only place these variables are read (convert.cli, when a job
        starts); without them, no hooks."""
        env = os.environ if environ is None else environ
        gates = ((BEFORE_LOCK, env.get("MOE_CONVERT_PAUSE_BEFORE_LOCK", "")),
                 (BEFORE_COMMIT, env.get("MOE_CONVERT_PAUSE_BEFORE_COMMIT", "")))
        return cls(crash_after=_rank_bytes(env.get("MOE_CONVERT_CRASH_AFTER", "")),
                   pause_after=_rank_bytes(env.get("MOE_CONVERT_PAUSE_AFTER", "")),
                   gates=tuple((name, path) for name, path in gates if path))

    def wait_at(self, gate: str) -> None:
        """Hold the job at `gate` where a test set one: create PATH.waiting, wait (at most 120 s) for PATH."""
        path = dict(self.gates).get(gate)
        if not path:
            return
        open(path + ".waiting", "w").close()
        deadline = time.monotonic() + 120
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.05)

    def on_bytes(self, rank: int) -> Callable[[int], None] | None:
        """What rank `rank` calls with the bytes it has written so far (a crash or a pause once they reach the
        hook's count), or None where no hook concerns it."""
        crash = self.crash_after[1] if self.crash_after and self.crash_after[0] == rank else None
        pause = self.pause_after[1] if self.pause_after and self.pause_after[0] == rank else None
        if crash is None and pause is None:
            return None

        def reached(done: int) -> None:
            if crash is not None and done >= crash:
                os._exit(137)  # a simulated crash, for resume tests
            if pause is not None and done >= pause:
                _pause(rank)

        return reached


def _rank_bytes(spec: str) -> tuple[int, int] | None:
    """"RANK:BYTES" -> (rank, bytes); None where unset."""
    if ":" not in spec:
        return None
    r, n = spec.split(":", 1)
    return int(r), int(n)


def _pause(rank: int) -> None:
    """Stop mid-job until a signal ends this rank (the pause_after hook; interruption tests only). The line names
    the variable the tests wait for."""
    print(f"rank {rank}: paused (MOE_CONVERT_PAUSE_AFTER, pid {os.getpid()})", file=sys.stderr, flush=True)
    while True:
        time.sleep(3600)


NO_HOOKS = JobHooks()
