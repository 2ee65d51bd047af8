"""Process-group setup under torchrun, accelerate launch, SLURM (srun), `--nproc N` or a plain `python -m`.

The tool only needs a CPU group for its control messages: each rank's part of the plan, barriers,
the status exchange and a shared progress counter. Its ranks join a torch-free group (launch.hub),
so a job that moves bytes never imports torch: `--nproc N` (launch.local) forks the ranks from one
process, whose socket rank 0's hub serves; under torchrun (and accelerate launch, which starts
torchrun) rank 0 serves the hub on every interface and publishes its address and token in
torchrun's own store (launch.store), where the other ranks read it. gloo remains for launchers
without torchrun's store (srun, a store torchrun does not share) and with MOE_CONVERT_GROUP=gloo.
"""

from __future__ import annotations

import datetime
import json
import os
import pickle
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from launch import hub, local
from launch.readahead import ReadAhead
from launch.store import StoreClient, StoreError


class _LazyTorchDistributed:
    """`torch.distributed`, imported on first use: a world of one never needs torch (~1 s to import)."""

    def __getattr__(self, name: str) -> Any:
        import torch.distributed

        return getattr(torch.distributed, name)


dist: Any = _LazyTorchDistributed()


@dataclass
class Dist:
    """This process's place in the job."""

    rank: int
    world_size: int
    initialized_here: bool = False
    _counters: dict[str, int] = field(default_factory=dict)
    group: hub.HubClient | None = None  # the torch-free group (launch.hub); None: gloo

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.world_size == 1:
            return obj
        if self.group is not None:
            return self.group.gather(obj if self.rank == 0 else None)[0]
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        if self.group is not None:
            return self.group.gather(obj)
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def gather_main(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj`, in rank order, on rank 0 only (None on the other ranks)."""
        if self.world_size == 1:
            return [obj]
        if self.group is not None:
            return self.group.gather_main(obj)
        out: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out

    def scatter(self, part: Callable[[int], Any] | None) -> Any:
        """Rank r's part `part(r)`, built on rank 0 (which passes `part`; the others pass None).

        Rank 0 builds and sends one rank's part at a time, so no process ever holds every
        rank's part but rank 0's planner; each rank receives only its own.
        """
        if self.world_size == 1:
            assert part is not None
            return part(0)
        if self.group is not None:
            return self.group.scatter(part)
        import torch

        if self.rank != 0:
            size = torch.zeros(1, dtype=torch.int64)
            dist.recv(size, src=0)
            buf = torch.empty(int(size.item()), dtype=torch.uint8)
            dist.recv(buf, src=0)
            return pickle.loads(buf.numpy().tobytes())
        assert part is not None, "rank 0 of a scatter gives every rank's part"
        for r in range(1, self.world_size):
            payload = bytearray(pickle.dumps(part(r), protocol=pickle.HIGHEST_PROTOCOL))
            dist.send(torch.tensor([len(payload)], dtype=torch.int64), dst=r)
            dist.send(torch.frombuffer(payload, dtype=torch.uint8), dst=r)
            del payload
        return part(0)

    def barrier(self) -> None:
        """Wait until every rank has called it."""
        if self.world_size > 1:
            if self.group is not None:
                self.group.gather(None)
            else:
                dist.barrier()

    def counter_add(self, key: str, amount: int) -> int:
        """Atomically add to a job-wide counter and return its new value (local when alone)."""
        if self.group is not None:
            return self.group.add(key, amount)
        store = self._store()
        if store is None:
            self._counters[key] = self._counters.get(key, 0) + amount
            return self._counters[key]
        return int(store.add(key, amount))

    def _store(self) -> Any:
        if self.world_size == 1:
            return None
        try:
            return dist.distributed_c10d._get_default_store()
        except Exception:  # noqa: BLE001 - whole-job progress is best effort
            return None

    def close(self) -> None:
        """Leave the group at the end of the process (every rank has passed the last barrier).

        The group is not destroyed: destroy_process_group takes ~0.2 s at 16 ranks and buys
        nothing when the process ends right after (exit_process); the OS closes its sockets.
        """


class _ErrorFileTap:
    """Under torchrun, this rank's stderr: everything passes through; the first line starting with
    "error:" or "interrupted:" is also written to the error file the torchrun agent reads
    (TORCHELASTIC_ERROR_FILE), so its failure summary shows that line instead of "<N/A>"."""

    PREFIXES = ("error:", "interrupted:")

    def __init__(self, stream: Any, path: str) -> None:
        self._stream = stream
        self._path = path
        self._line = ""
        self.recorded = False

    def write(self, text: str) -> int:
        if not self.recorded:
            self._line += text
            *done, self._line = self._line.split("\n")
            for line in done:
                line = line.strip("\r")
                if line.startswith(self.PREFIXES):
                    self.record(line)
                    break
            self._line = self._line[-4096:]
        return self._stream.write(text)

    def record(self, message: str) -> None:
        """Write `message` as this rank's failure, in torch.distributed.elastic's error-file format."""
        self.recorded = True
        data = {"message": {"message": message,
                            "extraInfo": {"py_callstack": message, "timestamp": str(int(time.time()))}}}
        try:
            with open(self._path, "w") as fh:
                json.dump(data, fh)
        except OSError:
            pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _tap_stderr() -> None:
    """Install _ErrorFileTap on sys.stderr when torchrun passed an error file (once)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path and not isinstance(sys.stderr, _ErrorFileTap):
        sys.stderr = _ErrorFileTap(sys.stderr, path)


CODE_MEANINGS = {1: "failed while running", 2: "refused before writing", 130: "interrupted (SIGINT)",
                 143: "interrupted (SIGTERM)"}


def exit_process(code: int, dist: Dist) -> NoReturn:
    """End this process with `code` once the job is done and the group left.

    A rank of several skips the interpreter's teardown, which takes 1-2 s once torch is
    loaded (finalizing its modules), on every rank and at every job's end: all files are
    closed and all data written by then; stdio is flushed here.
    """
    if code != 0 and isinstance(sys.stderr, _ErrorFileTap) and not sys.stderr.recorded:
        sys.stderr.record(f"exit code {code}: {CODE_MEANINGS.get(code, 'failed')}; rank 0's messages say why")
    if dist.world_size > 1:
        hard_exit(code)
    sys.exit(code)


def hard_exit(code: int) -> NoReturn:
    """Flush stdout and stderr, then end the process with `code` at once (os._exit: no interpreter teardown)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed stream must not change the exit code
            pass
    os._exit(code)


def _from_slurm() -> None:
    """Map SLURM's variables to torch's when a job is started with srun (one task per rank)."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    ntasks = int(os.environ.get("SLURM_NTASKS", "1"))
    if ntasks <= 1:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = str(ntasks)
    os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    if "MASTER_ADDR" not in os.environ:
        raise RuntimeError("SLURM launch: set MASTER_ADDR (and MASTER_PORT) to the first node, see launch/slurm.sbatch")
    os.environ.setdefault("MASTER_PORT", "29500")


def init_dist(timeout_s: float = 3600.0, nproc: int = 1, preload_torch: bool = False,
              readahead: Sequence[str] = ()) -> Dist:
    """Join the job's process group (gloo) if launched with several ranks; else a world of one.

    `nproc` > 1 (the --nproc flag) forks that many ranks on this machine first (launch.local):
    the calling process becomes their supervisor and never returns (it exits with the job's
    code); each rank returns here with its Dist. Refused (exit 2) under a launcher. With
    `preload_torch` torch is imported here (in the parent before forking: jobs that compute with it),
    and meanwhile the files of `readahead` (the job's input, local paths) are read into the page cache:
    by the --nproc parent, by a lone process, or shared among the ranks of a one-node launcher.
    """
    if nproc > 1:
        local.refuse_if_distributed(nproc)
        local.start(nproc, preload_torch, readahead)
    hand = local.handover()
    if hand is not None:
        return _join_forked(hand, timeout_s)
    _tap_stderr()
    _from_slurm()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if preload_torch:
        _import_torch_reading_ahead(readahead, world)
    if world <= 1:
        return Dist(0, 1)
    if "torch.distributed" in sys.modules and dist.is_initialized():  # a program that set up its own group
        return Dist(dist.get_rank(), dist.get_world_size())
    if _torchrun_store_shared():
        return _join_torchrun(rank, world, timeout_s)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(rank, world, initialized_here=True)


def _import_torch_reading_ahead(paths: Sequence[str], world: int) -> None:
    """Import torch while `paths` are read ahead: all of them in a world of one; the ranks of one node
    (LOCAL_WORLD_SIZE == WORLD_SIZE) each take every LOCAL_WORLD_SIZE-th chunk; over several nodes none
    (each node reads only its own ranks' part)."""
    share: tuple[int, int] | None = (0, 1)
    if world > 1:
        try:
            local_rank, local_world = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
        except (KeyError, ValueError):
            local_rank, local_world = -1, 0
        share = (local_rank, world) if local_world == world and 0 <= local_rank < world else None
    with ReadAhead(paths if share else (), share=share or (0, 1)):  # nothing over several nodes
        import torch  # noqa: F401 - the job computes with it


_joins = 0  # groups this process has joined: each join publishes under a key of its own


def _torchrun_store_shared() -> bool:
    """Whether torchrun's agent shares its store with the ranks (MASTER_ADDR:MASTER_PORT), and the hub may be used."""
    env = os.environ
    return (env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and bool(env.get("MASTER_ADDR"))
            and bool(env.get("MASTER_PORT")) and env.get("MOE_CONVERT_GROUP", "hub") != "gloo")


def _join_torchrun(rank: int, world: int, timeout_s: float) -> Dist:
    """A torchrun rank: rank 0 serves the hub and publishes where, with its token, in torchrun's store;
    the others read that and connect. Exits 1 with one line when the store or the hub cannot be reached."""
    global _joins
    _joins += 1
    env = os.environ
    key = f"moe_convert/{env.get('TORCHELASTIC_RUN_ID', '')}/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}/{_joins}/hub"
    try:
        store = StoreClient(env["MASTER_ADDR"], int(env["MASTER_PORT"]), timeout_s)
        try:
            if rank == 0:
                token = hub.new_token()
                port = hub.serve_everywhere(world, token)
                hosts = _addresses(store.local_address())
                store.set(key, json.dumps({"hosts": hosts, "port": port, "token": token.hex()}).encode())
            else:
                where = json.loads(store.get(key))
                hosts, port, token = where["hosts"], int(where["port"]), bytes.fromhex(where["token"])
        finally:
            store.close()
        group = hub.HubClient(hosts, port, token, rank, world, timeout_s)
    except (StoreError, hub.GroupError, OSError, ValueError, KeyError) as exc:
        print(f"error: rank {rank} cannot join the job's group: {exc}", file=sys.stderr)
        hard_exit(1)
    return Dist(rank, world, initialized_here=True, group=group)


def _addresses(store_facing: str) -> list[str]:
    """Where other ranks may reach this host, most likely first: the address that reaches torchrun's
    store, this host's name's addresses, then the loopback (ranks on this host)."""
    found = [store_facing]
    try:
        # sockaddr[0]: the host, a str for AF_INET (typeshed's union covers AF_CAN's int too)
        found += [str(info[4][0]) for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)]
    except OSError:
        pass
    routable = [a for a in dict.fromkeys(found) if not a.startswith("127.")]
    return routable + ["127.0.0.1"]


def _join_forked(hand: local.Handover, timeout_s: float) -> Dist:
    """A rank forked by --nproc: joins the torch-free group that rank 0 serves on the parent's socket."""
    os.environ.update(RANK=str(hand.rank), WORLD_SIZE=str(hand.world_size), LOCAL_RANK=str(hand.rank),
                      LOCAL_WORLD_SIZE=str(hand.world_size))
    group = hub.join(hand.port, hand.listen_fd, hand.token, hand.rank, hand.world_size, timeout_s)
    return Dist(hand.rank, hand.world_size, initialized_here=True, group=group)
