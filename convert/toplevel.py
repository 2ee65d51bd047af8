"""What every entry point does around its work: one line per error, the documented exit code, quiet Ctrl-C.

`run_guarded(fn)` runs `fn` and turns what escapes it into `error: <message>` on stderr (rank
0 only, or the rank whose own error it is) and an exit code; SIGINT/SIGTERM end the process at
once with 130/143 and, on rank 0, the line "interrupted: <dst> is incomplete; re-run the same
command to resume". `ToolParser` adds `--debug` and the exit codes to every --help.
`run_main(body, nproc)` joins the ranks' group under any launcher, runs `body` on this rank
guarded so, and exits with its code; `default_workers(dst)` is --workers' default. Every
entry point, the verifier's included, takes them from here (not from convert.cli, the
conversions' shared flags, which the verifier does not import).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

from convert.errors import (
    EXIT_FAILED,
    debug_enabled,
    describe,
    exit_code,
    interrupted_line,
    is_comm_error,
    set_debug,
)
from launch.local import exit_after_rank0, launcher_rank

if TYPE_CHECKING:
    from launch.dist import Dist

EXIT_BROKEN_PIPE = 128 + 13  # stdout closed by the reader (`| head`): quiet, like a tool killed by SIGPIPE
EXIT_CODES = """exit codes:
  0    success (verify: the output is correct)
  1    the job failed while running (I/O error, a rank died, commit failed; verify: mismatch);
       the destination is left incomplete and re-running the same command resumes
  2    refused before anything was written (bad input, flags or manifest, unreadable source,
       no credentials; verify: could not verify)
  130  interrupted (Ctrl-C; 143 for SIGTERM): re-run the same command to resume
"""


class ToolParser(argparse.ArgumentParser):
    """An ArgumentParser with --debug, the exit codes in --help, and usage errors printed by rank 0 only."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("epilog", EXIT_CODES)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help="show the Python traceback of an error as well")

    def parse_known_args(self, *args: Any, **kwargs: Any) -> Any:  # parse_args goes through here
        namespace, extras = super().parse_known_args(*args, **kwargs)
        set_debug(bool(getattr(namespace, "debug", False)))
        return namespace, extras

    def error(self, message: str) -> NoReturn:
        if launcher_rank() == 0:
            self.print_usage(sys.stderr)
            sys.stderr.write(f"{self.prog}: error: {message}\n")
        exit_after_rank0(2)


def _write_stderr(text: str) -> None:
    """Write straight to fd 2 (safe inside a signal handler, whatever Python's stderr object is doing)."""
    data = text.encode(errors="replace")
    while data:
        try:
            n = os.write(2, data)
        except OSError:
            return
        data = data[n:]


_settled: list[int] = []  # the exit code, once the outcome is decided and reported


def settle(code: int) -> None:
    """The outcome is decided and reported: a signal from now on (a launcher stopping the ranks once one has
    exited) ends the process quietly with `code` instead of reporting an interruption."""
    _settled[:] = [code]


def _on_signal(signum: int, frame: FrameType | None) -> None:
    """SIGINT/SIGTERM: rank 0 prints the interrupted line; every rank ends now with 128 + signum.

    Ending at once (not unwinding) is what a crash does, and resume is built for crashes: a
    piece is journaled only after its bytes are on disk, an S3 part exists whole or not at all.
    """
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    if _settled:
        os._exit(_settled[0])
    try:
        sys.stdout.flush()
    except Exception:  # noqa: BLE001 - a closed or busy stdout must not keep us from exiting
        pass
    if launcher_rank() == 0:
        lead = "\n" if os.isatty(2) else ""
        stack = "".join(traceback.format_stack(frame)) if debug_enabled() and frame is not None else ""
        _write_stderr(f"{lead}{stack}{interrupted_line()}\n")
    os._exit(128 + signum)


def _quiet_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so the interpreter's final flush stays silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def run_guarded(fn: Callable[[], int], debug: bool | None = None) -> int:
    """Run `fn` (returns an exit code) with quiet interrupts and one-line errors; returns the exit code.

    Errors that escape `fn` print `error: <message>` (from convert.errors.describe) on rank 0, and
    on another rank only when it is that rank's own error (not a lost connection to a rank
    that failed); the code is convert.errors.exit_code's. A closed stdout exits 141, silently.
    `debug` None keeps what ToolParser's --debug set.
    """
    if debug is not None:
        set_debug(debug)
    _settled.clear()
    handlers = []
    if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
        handlers = [(s, signal.getsignal(s)) for s in (signal.SIGINT, signal.SIGTERM)]
        for s, _ in handlers:
            signal.signal(s, _on_signal)
    try:
        code = fn()
        sys.stdout.flush()
    except BrokenPipeError:
        _quiet_stdout()
        code = EXIT_BROKEN_PIPE
    except Exception as exc:  # noqa: BLE001 - every error becomes one line and an exit code
        if launcher_rank() == 0 or not is_comm_error(exc):
            print(f"error: {describe(exc)}", file=sys.stderr)
        code = exit_code(exc) if not is_comm_error(exc) else EXIT_FAILED
    finally:
        for s, h in handlers:
            signal.signal(s, h)
        _settled.clear()
        set_debug(False)  # a later in-process call parses its own --debug
    return code


def finish(code: int) -> NoReturn:
    """Exit with `code`. Among several ranks at once (os._exit, after flushing): a launcher stops the other
    ranks as soon as one has exited, and a rank still tearing down the interpreter (where Python no longer
    handles signals) would die of that SIGTERM instead of exiting with its code."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        from launch.dist import hard_exit

        hard_exit(code)
    sys.exit(code)


def run_program(main: Callable[[], object]) -> NoReturn:
    """Run a command's `main` as the program itself (`python -m convert.<tool>`) and exit with its code without
    the interpreter's teardown (0.1-0.3 s once the object-store client is loaded: finalizing its modules and
    pools): by then every file is closed and every byte written; stdio is flushed here. Other exceptions than
    SystemExit (a bug's traceback) take the normal way out."""
    try:
        main()
        code = 0
    except SystemExit as exc:
        if isinstance(exc.code, int) or exc.code is None:
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    from launch.dist import hard_exit

    hard_exit(code)


def default_workers(dst: str) -> int:
    """--workers when not given, for destination `dst`: 4, or on local disk one per core this rank's share of
    the machine has (cores / ranks on this machine), at most 16. A local byte copy holds a 1 MiB buffer per
    worker, so more workers mostly add I/O in flight; an object store's parts are held in memory."""
    if "://" in dst and not dst.startswith("file://"):
        return 4
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))
    return max(4, min(16, cores // local_ranks))


def local_safetensors(locations: Sequence[str]) -> list[str]:
    """The *.safetensors files of those of `locations` that are local directories or files, in name order
    (URLs and missing paths give none)."""
    files: list[str] = []
    for location in locations:
        path = location.removeprefix("file://")
        if "://" in path:
            continue
        if os.path.isdir(path):
            files += sorted(e.path for e in os.scandir(path) if e.name.endswith(".safetensors") and e.is_file())
        elif path.endswith(".safetensors") and os.path.isfile(path):
            files.append(path)
    return files


def run_main(body: Callable[[Dist], int], nproc: int = 1, preload_torch: bool = False,
             inputs: Sequence[str] = ()) -> None:
    """Join the process group (first forking `nproc` local ranks when > 1), run `body`, leave the group
    and exit with its code. `preload_torch`: the job computes with torch, so it is imported first (by the
    --nproc parent once before forking), and meanwhile the *.safetensors files of `inputs` (checkpoint
    locations the job reads whole) are read into the page cache (launch.readahead).

    Errors that escape `body` become one line and an exit code, Ctrl-C a quiet exit 130
    (run_guarded); --debug (ToolParser) adds tracebacks.
    """
    from launch.dist import exit_process, init_dist

    joined: list[Dist] = []

    def go() -> int:
        readahead = local_safetensors(inputs) if preload_torch else []
        dist = init_dist(nproc=nproc, preload_torch=preload_torch, readahead=readahead)
        joined.append(dist)
        try:
            code = body(dist)
            settle(code)
            # Nobody leaves before rank 0 has printed its report: a launcher stops every rank once one has exited.
            dist.barrier()
        finally:
            dist.close()
        return code

    code = run_guarded(go)
    if joined:
        exit_process(code, joined[0])
    finish(code)
