"""One job per destination: the lock a conversion holds on its --dst while it writes there.

Rank 0 takes the lock (`.moe-convert/lock.json` in --dst) before it writes anything there (before an
--overwrite discards an earlier output) and removes it when the job ends, done or failed; a second job on
the same --dst is refused (exit 2) with one line naming the job that holds it (host, pid, since when).
The lock names its holder: host, pid, the process's start time, the boot and pid namespace it runs in, a
random token and when it was taken.

- Local (and network) filesystems: the file is held with flock(2) for as long as the job runs; the kernel
  lets it go when the process ends however it ends, so a lock file left by a crashed job is one nobody
  holds: the next job takes it over, with a line saying so. Taking it is race-free (a lock of the file
  by one process at a time; a file removed or replaced between its open and its lock is opened again).
  On NFS the lock is the server's (NFSv4 leases, NLM), so jobs on several hosts exclude each other too.
- S3: the object is created only where none exists (PUT If-None-Match: *); the holder refreshes it every
  `heartbeat` seconds by a PUT on condition of its own ETag (If-Match). A lock whose holder ran on this
  host (same boot and pid namespace) and is gone (its pid dead, or reused: the start time differs), or,
  from elsewhere, whose last refresh is older than `stale` seconds by the store's own clock (its Date
  against the object's LastModified), is stale and is taken over by a PUT on condition of the stale
  object's ETag: of several jobs taking it over at once, one wins.

Before the commit writes the output's completion marker the job checks that it still holds the lock
(its token), and fails without committing where another job took it over. The lock is never an output
file: the output record does not name it, --overwrite neither counts nor removes it, and a destination
holding nothing else is empty.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from convert.engine.sinks import LOCK_FILE, STATE_DIR
from convert.errors import ConversionError, chain, service_error
from convert.io.storage import ConditionalObjects, PositionalWrites, Store, storage_error
from convert.settings import DEFAULT_SETTINGS, Settings

HEARTBEAT_SECONDS = 5.0
STALE_SECONDS = 60.0
_held: set[str] = set()  # the locks this process holds (their URLs): its own lock is never another job's
_deferred: list[list[DestinationLock]] = []  # held_until_done(): locks whose release waits for its end


@dataclass(frozen=True)
class LockTimes:
    """How often a holder refreshes an object-store lock, and how old a refresh may be before the lock is stale."""

    heartbeat: float = HEARTBEAT_SECONDS
    stale: float = STALE_SECONDS


def lock_times(settings: Settings = DEFAULT_SETTINGS) -> LockTimes:
    """The lock's times for a job with `settings` (Settings.lock_heartbeat_seconds and lock_stale_seconds:
    MOE_CONVERT_LOCK_HEARTBEAT_SECONDS and MOE_CONVERT_LOCK_STALE_SECONDS, read when the job starts), 5 s and 60 s
    by default. A heartbeat is at most a quarter of the stale time."""
    stale = float(settings.lock_stale_seconds or STALE_SECONDS)
    heartbeat = float(settings.lock_heartbeat_seconds or HEARTBEAT_SECONDS)
    return LockTimes(heartbeat=max(0.05, min(heartbeat, stale / 4)), stale=stale)


class DestinationInUse(ConversionError):
    """Another moe-convert job holds the destination's lock (a refusal: exit 2)."""


class LockLost(ConversionError):
    """The lock this job held was taken over by another job, or removed: the job must not commit."""


@contextmanager
def held_until_done() -> Iterator[None]:
    """Within this context a job's lock outlives the job: it is given up when the context ends (a conversion's
    --verify, which may rename the completion marker, runs under the conversion's lock)."""
    waiting: list[DestinationLock] = []
    _deferred.append(waiting)
    try:
        yield
    finally:
        _deferred.remove(waiting)
        for lock in waiting:
            lock.release()


# -- who holds a lock ------------------------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, /proc/<pid>/stat), or None where it does not exist."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def _namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _now_text(t: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if t is None else t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def holder_record(token: str) -> dict[str, Any]:
    """What a lock says of the job that takes it now."""
    pid = os.getpid()
    return {"tool": "moe-convert", "host": socket.gethostname(), "pid": pid, "start_time": _start_time(pid),
            "boot_id": _read("/proc/sys/kernel/random/boot_id"), "pid_namespace": _namespace(), "token": token,
            "since": _now_text()}


def _parse(data: bytes | str) -> dict[str, Any] | None:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) and doc.get("token") else None


def _on_this_host(holder: dict[str, Any]) -> bool:
    """True where `holder` ran on this machine, in this boot and pid namespace: its pid can be looked up here."""
    return (holder.get("host") == socket.gethostname() and holder.get("boot_id") == _read("/proc/sys/kernel/random/boot_id")
            and holder.get("pid_namespace") == _namespace())


def _gone(holder: dict[str, Any]) -> bool:
    """True where `holder` ran on this host and its process is gone (its pid dead, or now another process's)."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or not _on_this_host(holder):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # another user's process: alive
    started = _start_time(pid)
    return started is None or (holder.get("start_time") is not None and started != holder.get("start_time"))


def _age(holder: dict[str, Any] | None, age: float | None) -> float | None:
    """Seconds since an object-store lock was last refreshed: by the store's clock (`age`), else (an answer without a
    Date) by its own heartbeat field against this host's clock; None where neither is known."""
    if age is not None or holder is None:
        return age
    try:
        beat = datetime.strptime(str(holder.get("heartbeat") or holder.get("since")), "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return None
    return max(0.0, time.time() - beat.replace(tzinfo=timezone.utc).timestamp())


def describe_holder(holder: dict[str, Any] | None) -> str:
    """'host H, pid P, running since T' (what is known of it)."""
    if not holder:
        return "its details not written yet"
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, running since {holder.get('since', '?')}"


def in_use(dst: Store, holder: dict[str, Any] | None, stale: float | None = None) -> DestinationInUse:
    """The refusal of a second job on `dst`, naming the job `holder` that holds it."""
    where = f"{dst.display(LOCK_FILE)}"
    after = f"; a lock whose job stopped is taken over {int(stale)} s after its last heartbeat" if stale else ""
    return DestinationInUse(f"{dst.url} is in use by another moe-convert job ({describe_holder(holder)}): wait for it "
                            f"to end, or choose another --dst (its lock: {where}{after})")


def _say_taken_over(dst: Store, holder: dict[str, Any] | None, why: str) -> None:
    print(f"warning: {dst.url}: taking over the lock of a moe-convert job that {why} ({describe_holder(holder)})",
          file=sys.stderr, flush=True)


def _precondition(exc: BaseException) -> str | None:
    """'failed' (412: the object is not as the condition says), 'conflict' (409: another conditional write of it
    is under way), 'absent' (404), 'unsupported' (501: the store takes no such condition), else None."""
    answer = service_error(exc)
    if answer is None:
        return "absent" if any(isinstance(e, FileNotFoundError) for e in chain(exc)) else None
    status, code = answer[0], answer[1]
    if status == 412 or code == "PreconditionFailed":
        return "failed"
    if status == 409 or code in ("ConditionalRequestConflict", "OperationAborted"):
        return "conflict"
    if status == 404 or code in ("NoSuchKey", "NotFound"):
        return "absent"
    if status == 501 or code == "NotImplemented":
        return "unsupported"
    return None


# -- the lock ----------------------------------------------------------------------------------------------------


class DestinationLock:
    """The lock a job holds on its destination (acquire(), then confirm() before the commit, release() at the end)."""

    def __init__(self, dst: Store, token: str, times: LockTimes) -> None:
        self.dst, self.token, self.times = dst, token, times
        self.url = dst.display(LOCK_FILE)
        self.files = dst.positional  # local files: the lock is flock'ed there
        self.objects = dst.conditional  # else S3: the lock is a conditionally written object
        self._fd: int | None = None  # local: the descriptor holding the flock
        self._etag: str | None = None  # S3: the ETag of the lock object as we last wrote it
        self._lost: str | None = None  # why the lock is no longer ours, once known
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._beats: threading.Thread | None = None
        self.held = False

    @classmethod
    def acquire(cls, dst: Store, times: LockTimes | None = None) -> DestinationLock:
        """Take `dst`'s lock for this job: DestinationInUse where another job holds it; a stale one is taken over,
        with a line on stderr saying so. A filesystem without locks or a store without conditional writes gets
        an unheld lock and a warning (the job runs, unguarded)."""
        lock = cls(dst, os.urandom(12).hex(), times or lock_times())
        if lock.files is not None:
            lock._acquire_local(lock.files)
        elif lock.objects is not None:
            lock._acquire_s3(lock.objects)
        else:
            print(f"warning: {dst.url}: this filesystem takes no lock; another job on the same --dst is not detected",
                  file=sys.stderr, flush=True)
        if lock.held:
            _held.add(lock.url)
        return lock

    # -- local -------------------------------------------------------------------------------------------------
    def _acquire_local(self, files: PositionalWrites) -> None:
        path = files.path(LOCK_FILE)
        busy = 0
        for _ in range(50):
            self.dst.makedirs()  # its own error names --dst, as a failure to create it always did
            self.dst.makedirs(STATE_DIR)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:  # the directory went (a job ending removed it): again
                continue
            except OSError as exc:
                raise storage_error("create", self.url, exc) from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_fd(fd)
                os.close(fd)
                busy += 1
                if busy < 4:  # a job looking at the lock (refuse_if_locked) holds it shared for a moment
                    time.sleep(0.05 * busy)
                    continue
                raise in_use(self.dst, holder) from None
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    print(f"warning: {self.dst.url}: this filesystem takes no lock ({os.strerror(exc.errno)}); "
                          "another job on the same --dst is not detected", file=sys.stderr, flush=True)
                    self._remove_if_empty(path)
                    return
                raise storage_error("lock", self.url, exc) from exc
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # removed (or replaced) by the job that held it, between our open and our lock: again
                os.close(fd)
                continue
            left = _read_fd(fd, wait=False)  # nobody writes it while we hold it
            if left is not None:  # written by a job that no longer holds it: it ended without removing it
                _say_taken_over(self.dst, left, "is no longer running")
            data = json.dumps(holder_record(self.token)).encode()
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, data, 0)
            except OSError as exc:
                os.close(fd)
                raise storage_error("write", self.url, exc) from exc
            self._fd, self.held = fd, True
            return
        raise in_use(self.dst, None)

    def _remove_if_empty(self, path: str) -> None:
        try:
            if os.path.getsize(path) == 0:
                os.unlink(path)
        except OSError:
            pass

    # -- S3 ----------------------------------------------------------------------------------------------------
    def _body(self) -> bytes:
        return json.dumps({**holder_record(self.token), "since": self._since, "heartbeat": _now_text()}).encode()

    def _acquire_s3(self, objects: ConditionalObjects) -> None:
        self._since = _now_text()
        for _ in range(20):
            try:
                self._etag = objects.put_if(LOCK_FILE, self._body(), absent=True)
            except OSError as exc:
                why = _precondition(exc)
                if why == "unsupported":
                    print(f"warning: {self.dst.url}: the store takes no conditional writes (If-None-Match), so no "
                          "lock: another job on the same --dst is not detected", file=sys.stderr, flush=True)
                    return
                if why not in ("failed", "conflict"):
                    raise
                if self._take_over_if_stale(objects):
                    return
                continue
            self._started()
            return
        raise in_use(self.dst, None, self.times.stale)

    def _take_over_if_stale(self, objects: ConditionalObjects) -> bool:
        """The lock exists: True where it was ours already or stale and is ours now; DestinationInUse where it is
        another live job's; False where it changed meanwhile (try again)."""
        found = objects.read_object(LOCK_FILE)
        if found is None:
            return False  # released meanwhile
        data, etag, age = found
        holder = _parse(data)
        age = _age(holder, age)
        if holder is not None and holder.get("token") == self.token:  # our own create, its answer lost and retried
            self._etag = etag
            self._started()
            return True
        gone = holder is not None and _gone(holder)
        if not gone and (age is None or age <= self.times.stale or (holder is not None and _on_this_host(holder))):
            raise in_use(self.dst, holder, self.times.stale)
        try:
            self._etag = objects.put_if(LOCK_FILE, self._body(), etag=etag)
        except OSError as exc:
            if _precondition(exc) in ("failed", "conflict", "absent"):
                return False  # another job took it over or it was released: look again
            raise
        _say_taken_over(self.dst, holder, "is no longer running" if gone else
                        f"has not refreshed it for {int(age or 0)} s")
        self._started()
        return True

    def _started(self) -> None:
        self.held = True
        self._beats = threading.Thread(target=self._heartbeat, name="moe-convert-lock", daemon=True)
        self._beats.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.times.heartbeat):
            try:
                self._refresh()
            except LockLost:
                return
            except Exception:  # noqa: BLE001 - a transient failure: the next beat tries again (confirm() reports)
                pass

    def _refresh(self) -> None:
        """S3: rewrite the lock on condition of its ETag (LockLost where another job replaced or removed it)."""
        objects = self.objects
        assert objects is not None  # refreshed only where _acquire_s3 took it
        with self._mutex:
            if self._lost:
                raise LockLost(self._lost)
            try:
                self._etag = objects.put_if(LOCK_FILE, self._body(), etag=self._etag)
            except OSError as exc:
                if _precondition(exc) not in ("failed", "absent"):
                    raise
                found = objects.read_object(LOCK_FILE)
                holder = _parse(found[0]) if found else None
                if holder is not None and holder.get("token") == self.token:  # our write landed, its answer lost
                    self._etag = found[1] if found else self._etag
                else:
                    self._lost = (f"{self.dst.url} was taken over by another moe-convert job ({describe_holder(holder)})"
                                  if holder else f"the lock {self.url} of this job was removed")
                    raise LockLost(self._lost) from None

    # -- every kind --------------------------------------------------------------------------------------------
    def confirm(self) -> None:
        """Raise LockLost unless this job still holds the lock (its token in the lock the destination has now)."""
        if not self.held:
            return
        if self._fd is not None and self.files is not None:
            path = self.files.path(LOCK_FILE)
            try:
                same = os.stat(path).st_ino == os.fstat(self._fd).st_ino
            except FileNotFoundError:
                same = False
            holder = _read_fd(self._fd, wait=False) if same else None
            if holder is None or holder.get("token") != self.token:
                raise LockLost(f"the lock {self.url} of this job was removed or replaced")
            return
        self._refresh()

    def release(self) -> None:
        """Give the lock up and remove it (only where it is still ours); never raises. Inside held_until_done(),
        at its end."""
        if not self.held:
            return
        if _deferred:
            if self not in _deferred[-1]:
                _deferred[-1].append(self)
            return
        self.held = False
        _held.discard(self.url)
        self._stop.set()
        try:
            if self._fd is not None:
                self._release_local()
            else:
                with self._mutex:  # after a refresh under way; a later one finds the object gone (If-Match)
                    if not self._lost and self.objects is not None:
                        self.objects.delete_if(LOCK_FILE, self._etag)
        except Exception as exc:  # noqa: BLE001 - the job's outcome is decided: a lock left is taken over later
            print(f"warning: could not remove the lock {self.url}: {exc}", file=sys.stderr, flush=True)

    def _release_local(self) -> None:
        fd, self._fd = self._fd, None
        assert fd is not None and self.files is not None
        path = self.files.path(LOCK_FILE)
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                os.unlink(path)  # while still locked: a job that opened it meanwhile finds it gone and opens anew
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)
        try:
            os.rmdir(self.files.path(STATE_DIR))  # only where nothing else is left there
        except OSError:
            pass


def _read_fd(fd: int, wait: bool = True) -> dict[str, Any] | None:
    """The holder a lock file (open as `fd`) names. `wait`: another process holds it, and may be writing it
    (between its lock and its write the file is empty or partial): read again a moment later where so."""
    for attempt in range(10 if wait else 1):
        if attempt:
            time.sleep(0.02)
        try:
            data = os.pread(fd, 1 << 16, 0)
        except OSError:
            return None
        holder = _parse(data)
        if holder is not None or (not data and attempt >= 2):
            return holder
    return None


def refuse_if_locked(dst: Store, times: LockTimes | None = None) -> None:
    """Before a job writes anything (its plan's look at the destination): raise DestinationInUse where another live
    job holds `dst`'s lock. Reads only; a stale lock, or none, passes (acquire() takes it)."""
    url = dst.display(LOCK_FILE)
    if url in _held:
        return
    files = dst.positional
    if files is not None:
        path = files.path(LOCK_FILE)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_fd(fd)
            raise in_use(dst, holder) from None
        except OSError:
            return
        finally:
            os.close(fd)
        return
    objects = dst.conditional
    if objects is None:
        return
    times = times or lock_times()
    found = objects.read_object(LOCK_FILE)
    if found is None:
        return
    data, _, age = found
    holder = _parse(data)
    age = _age(holder, age)
    if holder is not None and _gone(holder):
        return
    if (holder is not None and _on_this_host(holder)) or age is None or age <= times.stale:
        raise in_use(dst, holder, times.stale)

