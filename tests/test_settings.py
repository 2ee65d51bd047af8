"""A job's settings and test hooks (convert.settings): read from the environment once, at the entry point, and
passed down in the job's options; a job built in this process takes them from its options, not the environment."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from convert.cli import job_environment
from convert.engine.dest_lock import lock_times
from convert.engine.job import JobOptions, run_job
from convert.engine.sinks import LocalSink, MultipartSink, make_sink
from convert.errors import StorageError
from convert.example import example_tensors, write_checkpoint
from convert.io.storage import Storage, local_storage
from convert.settings import BEFORE_COMMIT, BEFORE_LOCK, JobHooks, Settings, StorageSettings
from helpers import REPO
from launch.dist import Dist


def test_settings_read_the_environment_given_and_default_the_rest():
    env = {"MOE_CONVERT_JOURNAL_SECONDS": "0", "MOE_CONVERT_MAX_PART": str(5 << 20), "MOE_CONVERT_UPLOAD_THREADS": "",
           "MOE_CONVERT_LOCK_STALE_SECONDS": "2", "MOE_CONVERT_LOCK_HEARTBEAT_SECONDS": "9"}
    s = Settings.from_env(env)
    assert s.journal_seconds == 0 and s.max_part == 5 << 20 and s.min_part is None
    assert s.upload_threads == Settings().upload_threads  # empty: the default
    assert Settings.from_env({}) == Settings()
    times = lock_times(s)
    assert times.stale == 2 and times.heartbeat == 0.5  # a heartbeat is at most a quarter of the stale time


def test_the_sinks_take_the_jobs_settings(tmp_path):
    store = Storage(str(tmp_path))
    sink = MultipartSink(store, store, settings=Settings(max_part=7 << 20, min_part=6 << 20, upload_threads=2))
    assert (sink.max_part, sink.min_part) == (7 << 20, 6 << 20)
    local = make_sink(store, store, Settings(journal_bytes=1))
    assert isinstance(local, LocalSink) and local.settings.journal_bytes == 1


def test_hooks_come_from_the_environment_only_where_the_entry_point_reads_it():
    hooks = JobHooks.from_env({"MOE_CONVERT_CRASH_AFTER": "1:300", "MOE_CONVERT_PAUSE_BEFORE_LOCK": "/x"})
    assert hooks.crash_after == (1, 300) and hooks.pause_after is None and dict(hooks.gates) == {BEFORE_LOCK: "/x"}
    assert hooks.on_bytes(0) is None and hooks.on_bytes(1) is not None
    assert JobHooks.from_env({}) == JobHooks()


def test_a_job_in_this_process_waits_at_the_gates_its_options_set(tmp_path, monkeypatch):
    """The gates are the options' (JobOptions.hooks); the environment's are not read by the engine."""
    tensors, cfg = example_tensors("qwen3_moe", layers=1, experts=4, hidden=64, inter=32, seed=3)
    src = tmp_path / "src"
    write_checkpoint(tensors, cfg, str(src), 150_000)
    lock_gate, commit_gate = tmp_path / "lock", tmp_path / "commit"
    lock_gate.touch()
    commit_gate.touch()  # open already: the job only marks that it got there
    monkeypatch.setenv("MOE_CONVERT_PAUSE_BEFORE_COMMIT", str(tmp_path / "never"))
    hooks = JobHooks(gates=((BEFORE_LOCK, str(lock_gate)), (BEFORE_COMMIT, str(commit_gate))))
    opts = JobOptions(src=str(src), dst=str(tmp_path / "out"), layout=None, show_progress=False, hooks=hooks)
    assert run_job(opts, Dist(0, 1)) == 0
    assert Path(str(lock_gate) + ".waiting").exists() and Path(str(commit_gate) + ".waiting").exists()
    assert not Path(str(tmp_path / "never") + ".waiting").exists()


def test_storage_settings_read_the_environment_given_and_default_the_rest():
    env = {"MOE_CONVERT_RETRIES": "3", "MOE_CONVERT_S3_CONDITIONAL_READS": "0", "MOE_CONVERT_WRITE_BEHIND": "",
           "MOE_CONVERT_LOCAL_COPY": "kernel", "MOE_CONVERT_S3_POOL": "9", "MOE_CONVERT_VERIFY_MEMORY": "1000",
           "MOE_CONVERT_READ_AHEAD": "0", "MOE_CONVERT_MERGE_RUN_BYTES": "4096"}
    s = Settings.from_env(env)
    assert s.storage == StorageSettings(retries=3, s3_conditional_reads=False, local_copy="kernel", s3_pool=9,
                                        read_ahead=0)
    assert s.verify_memory == 1000 and s.verify_read_ahead == Settings().verify_read_ahead
    assert s.merge_run_bytes == 4096 and Settings().merge_run_bytes == 48 << 20
    assert StorageSettings.from_env(env) == s.storage and StorageSettings.from_env({}) == StorageSettings()
    assert StorageSettings.from_env({"MOE_CONVERT_WRITE_BEHIND": "1"}).write_behind  # only "0" turns a flag off


def test_the_entry_point_reads_the_stores_settings_when_the_job_starts(monkeypatch):
    """Nothing is read at import: a variable set after every module is loaded still reaches the job's settings."""
    monkeypatch.setenv("MOE_CONVERT_S3_CONDITIONAL_READS", "0")
    monkeypatch.setenv("MOE_CONVERT_S3_STREAM_BYTES", str(1 << 20))
    settings = job_environment()["settings"]
    assert not settings.storage.s3_conditional_reads and settings.storage.s3_stream_bytes == 1 << 20


def _documented() -> list[tuple[str, str, str, str]]:
    """(variable, default, class, field) of every row of docs/ENVIRONMENT.md read in convert/settings.py."""
    text = (REPO / "docs" / "ENVIRONMENT.md").read_text()
    row = re.compile(r"^\| `(MOE_CONVERT_\w+)` \| ([^|]+) \| `convert/settings\.py` \(`(\w+)\.(\w+)`", re.M)
    return [(m[1], m[2].strip(), m[3], m[4]) for m in row.finditer(text)]


def _changed(value: object) -> str:
    """A variable's text that sets a field whose default is `value` to something else."""
    if isinstance(value, bool):
        return "0" if value else "1"
    if isinstance(value, (int, float)):
        return str(value + 1)
    return "something-else" if value is not None else "7"


def test_every_documented_variable_sets_its_field_and_its_documented_default_is_the_fields():
    """Each row of docs/ENVIRONMENT.md read in convert/settings.py names the field from_env sets from it and that
    field's default; every field of Settings and StorageSettings has its row."""
    rows = _documented()
    fields = {(cls.__name__, f.name) for cls in (Settings, StorageSettings) for f in dataclasses.fields(cls)}
    assert {(cls, field) for _, _, cls, field in rows} == fields - {("Settings", "storage")}
    for name, default, cls, field in rows:
        want = getattr(StorageSettings() if cls == "StorageSettings" else Settings(), field)
        got = Settings.from_env({name: _changed(want)})
        got_field = getattr(got.storage if cls == "StorageSettings" else got, field)
        assert got_field != want, f"{name} does not set {cls}.{field}"
        if want is None:  # documented in words (S3's minimum, sized to the job)
            continue
        mib = re.fullmatch(r"(\d+) MiB", default)
        shown = int(mib[1]) << 20 if mib else default.strip("`")
        if isinstance(want, bool):
            assert shown == ("1" if want else "0"), (name, default, want)
        elif isinstance(want, (int, float)):
            assert float(shown) == want, (name, default, want)
        else:
            assert shown == want, (name, default, want)


def test_a_store_keeps_the_settings_it_was_opened_with(tmp_path):
    tuned = StorageSettings(retries=2, s3_pool=3, s3_retry_mode="adaptive", s3_retry_attempts=4)
    assert Storage(str(tmp_path)).settings == StorageSettings()
    s3 = Storage("s3://moe-settings-bucket/x", {"endpoint_url": "http://127.0.0.1:9"}, tuned)  # nothing is sent
    assert s3.settings is tuned
    config = s3.fs.config_kwargs
    assert config["max_pool_connections"] == 3 and config["retries"] == {"mode": "adaptive", "max_attempts": 4}
    calls: list[int] = []

    def slow() -> None:
        calls.append(1)
        raise TimeoutError("slow")  # transient: retried, the settings' retries times

    with pytest.raises(StorageError):
        Storage("memory://moe-settings", settings=tuned)._retry("read", "f", slow)
    assert len(calls) == 2
    calls.clear()
    with pytest.raises(StorageError):
        Storage(str(tmp_path), settings=tuned)._retry("read", "f", slow)  # a local error is not retried
    assert len(calls) == 1


def test_a_job_opens_its_stores_with_its_settings(tmp_path, monkeypatch):
    """The job's settings (JobOptions.settings.storage) reach the stores it writes through: write-behind off
    there hands nothing to the kernel."""
    tensors, cfg = example_tensors("qwen3_moe", layers=1, experts=4, hidden=64, inter=32, seed=3)
    src = tmp_path / "src"
    write_checkpoint(tensors, cfg, str(src), 150_000)
    handed: list[int] = []

    def sync_file_range(fd: int, start: int, n: int, flags: int) -> int:
        handed.append(n)
        return 0

    monkeypatch.setattr(local_storage, "_sync_file_range", sync_file_range)
    for name, write_behind in (("on", True), ("off", False)):
        handed.clear()
        settings = Settings(storage=StorageSettings(write_behind=write_behind))
        opts = JobOptions(src=str(src), dst=str(tmp_path / name), layout=None, show_progress=False, settings=settings)
        assert run_job(opts, Dist(0, 1)) == 0
        assert bool(handed) == write_behind, (name, len(handed))
