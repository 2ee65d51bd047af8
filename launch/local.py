"""`--nproc N`: run a job as N local ranks forked from one process.

The parent imports what every rank needs (torch only when the job computes with it), opens the
rendezvous socket on 127.0.0.1, and forks N workers. Each worker returns from `start` and runs
exactly the code path of a torchrun rank (`launch.dist.init_dist`): only the group differs, a
torch-free hub (launch.hub) that rank 0 serves on the socket the parent opened (no port race).
The parent forwards SIGINT/SIGTERM to the workers, waits for them and exits with the job's
code (rank 0's; every rank returns the same one), printing nothing of its own unless a
worker dies without an exit code of the tool's contract.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

from launch import hub
from launch.readahead import ReadAhead

# Exit codes a rank may end with on its own: ok, failed, refused, SIGINT, SIGTERM.
CONTRACT_CODES = frozenset({0, 1, 2, 130, 143})
# How long the other ranks may take to end with the code they all agree on once one rank has failed.
FAILURE_GRACE_S = 15.0
# How long ranks may take to stop after a forwarded SIGINT/SIGTERM before they are killed.
SIGNAL_GRACE_S = 30.0
_FORWARDED = (signal.SIGINT, signal.SIGTERM)
_WAITED = (*_FORWARDED, signal.SIGCHLD)
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Handover:
    """What a forked worker needs to join the group: its rank and the rendezvous of rank 0's store."""

    rank: int
    world_size: int
    port: int
    listen_fd: int | None  # rank 0 serves the group's hub on the socket the parent opened
    token: bytes  # what a connection must send to be let into the hub


_handover: Handover | None = None


def handover() -> Handover | None:
    """This worker's Handover when it was forked by `start`; None in any other process."""
    return _handover


def nproc_arg(text: str) -> int:
    """argparse type of --nproc: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of processes >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of processes >= 1, got {text!r}")
    return value


def add_nproc_flag(p: argparse.ArgumentParser) -> None:
    """Add --nproc N (ranks forked on this machine; default 1 = this process alone)."""
    p.add_argument("--nproc", type=nproc_arg, default=1, metavar="N",
                   help="run as N ranks on this machine, forked from this process (default 1); "
                        "use torchrun for several nodes")


def already_distributed() -> str | None:
    """The launcher that already made this process one rank of several, or None."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env:
        return "torchrun"
    if env.get("WORLD_SIZE", "1") not in ("", "0", "1"):
        return f"a launcher (WORLD_SIZE={env['WORLD_SIZE']})"
    if "SLURM_PROCID" in env and env.get("SLURM_NTASKS", "1") not in ("", "0", "1"):
        return f"srun (SLURM_NTASKS={env['SLURM_NTASKS']})"
    return None


def refuse_if_distributed(nproc: int) -> None:
    """Exit 2 with one line when --nproc N>1 is given to a process a launcher already started."""
    launcher = already_distributed()
    if launcher is None:
        return
    if launcher_rank() == 0:
        print(f"error: --nproc {nproc} starts its own ranks, but this process was started by {launcher}; "
              "drop --nproc, or run without the launcher", file=sys.stderr)
    exit_after_rank0(2)


REPORT_GRACE_S = 10.0  # how long another rank waits for rank 0 to report an error they all met


def launcher_rank() -> int:
    """This process's rank as its launcher set it (RANK, else SLURM_PROCID; 0 when alone or unreadable)."""
    try:
        return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0)
    except ValueError:
        return 0


def exit_after_rank0(code: int) -> NoReturn:
    """Exit with `code` after an error that every rank meets alike and rank 0 alone reports.

    Another rank first waits up to REPORT_GRACE_S: torchrun stops the whole job as soon as one rank
    exits, and a rank that exited first would have rank 0 stopped before its line is out.
    """
    if launcher_rank() != 0:
        time.sleep(REPORT_GRACE_S)
    sys.exit(code)


def _prepare_parent(preload_torch: bool, readahead: Sequence[str]) -> None:
    """Import, before forking, what every rank needs, so it is loaded once: torch only when the job
    computes with it (casts, LoRA factors, verifying those); the ranks' group itself needs none (launch.hub).
    Meanwhile the files of `readahead` are read into the page cache (launch.readahead)."""
    # numpy (imported by torch) would start OpenBLAS threads we never use; a fork wants none.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    if preload_torch:
        with ReadAhead(readahead):  # stopped (its threads joined) before the fork
            import torch  # noqa: F401 - loaded once here, shared by every fork


def native_threads() -> int:
    """Threads of this process as the OS sees them (Python's and native ones)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        import threading

        return threading.active_count()


def start(nproc: int, preload_torch: bool = False, readahead: Sequence[str] = ()) -> Handover:
    """Fork `nproc` ranks. Returns in each of them (with its Handover); the parent never returns.

    The parent waits for the ranks and exits with the job's exit code (see `supervise`). With `preload_torch`
    it imports torch first, reading the files of `readahead` (the job's input) into the page cache meanwhile.
    """
    global _handover
    _prepare_parent(preload_torch, readahead)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(max(128, nproc))
    port = sock.getsockname()[1]
    token = hub.new_token()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    parent = os.getpid()
    # Blocked from here on in the parent (supervise takes them with sigtimedwait); each rank unblocks them.
    signal.pthread_sigmask(signal.SIG_BLOCK, _WAITED)
    pids: dict[int, int] = {}
    try:
        for rank in range(nproc):
            pid = os.fork()
            if pid == 0:
                try:
                    _become_worker(parent)
                    listen_fd = None
                    if rank == 0:
                        listen_fd = sock.detach()  # the descriptor now belongs to rank 0's hub
                    else:
                        sock.close()
                except BaseException:  # a fork must never carry on as the parent
                    os._exit(1)
                _handover = Handover(rank, nproc, port, listen_fd, token)
                return _handover
            pids[pid] = rank
    except BaseException:  # fork failed (or a signal): leave no rank behind
        for pid in pids:
            _kill(pid, signal.SIGKILL)
        raise
    finally:
        if os.getpid() == parent:
            sock.close()
    code = supervise(pids)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no interpreter teardown: nothing of the parent's is left to clean up


def _become_worker(parent: int) -> None:
    """In a fresh fork: own session (a terminal's Ctrl-C reaches only the parent, which forwards it),
    die with the parent, signals unblocked (their handlers are the parent's: Python's defaults)."""
    os.setsid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _WAITED)


def _kill(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def supervise(pids: dict[int, int]) -> int:
    """Wait for the forked ranks (pid -> rank); returns the job's exit code.

    Called with SIGINT, SIGTERM and SIGCHLD blocked: they are taken with sigtimedwait, so no
    handler ever interrupts the bookkeeping. SIGINT/SIGTERM are forwarded to every rank (a
    second one kills them) and the code is then 128 + signal. A rank that dies by a signal or
    with a code outside the tool's contract fails the job: the others are killed (they would
    wait for it forever) and one line says so; the code is 1. Otherwise rank 0's code; ranks
    that outlive a failed rank by FAILURE_GRACE_S are killed.
    """
    alive = dict(pids)
    got: list[int] = []  # signals received, in order
    codes: dict[int, int] = {}  # rank -> exit code, for ranks that ended on their own
    killed: set[int] = set()  # ranks killed for outliving a failed rank
    died: str | None = None
    deadline = float("inf")
    while alive:
        info = signal.sigtimedwait(_WAITED, 0.25)
        if info is not None and info.si_signo in _FORWARDED:
            for pid in alive:
                _kill(pid, signal.SIGKILL if got else info.si_signo)
            got.append(info.si_signo)
            deadline = min(deadline, time.monotonic() + SIGNAL_GRACE_S)
        while alive:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            rank = alive.pop(pid, None)
            if rank is None:
                continue
            what = _abnormal(status)
            if what is None:
                codes[rank] = code = os.WEXITSTATUS(status)
                if code != 0:
                    deadline = min(deadline, time.monotonic() + FAILURE_GRACE_S)
            elif not got and died is None and rank not in killed:
                died = f"error: rank {rank} died ({what}); re-run the same command to resume"
                for other in alive:
                    _kill(other, signal.SIGKILL)
        if alive and time.monotonic() >= deadline:
            for other, other_rank in alive.items():
                _kill(other, signal.SIGKILL)
                killed.add(other_rank)
            deadline = float("inf")
    if got:
        return 128 + got[0]
    if died is not None:
        print(died, file=sys.stderr)
        return 1
    if 0 in codes:
        return codes[0]
    return next((c for c in codes.values() if c != 0), 1)


def _abnormal(status: int) -> str | None:
    """How a rank ended outside the tool's contract (`signal SIGKILL`, `exit code 137`), or None."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            return f"signal {signal.Signals(sig).name}"
        except ValueError:
            return f"signal {sig}"
    code = os.WEXITSTATUS(status)
    return None if code in CONTRACT_CODES else f"exit code {code}"
