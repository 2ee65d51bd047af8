"""`torchrun ... -m launch.batch MANIFEST.yaml`: run a list of conversions, skipping finished ones.

The manifest (YAML or JSON) is `{defaults: {...}, jobs: [{name, kind, src, dst, ...}]}`; each
job's keys are the entry point's flags with `_` for `-` (layout, ep, max_shard_size, dtype,
storage_options, overwrite, ...), `defaults` applies to every job. Kinds: fuse_experts,
split_experts, split_adapter, fuse_adapter. A job whose destination is already complete is
skipped; a failed job is reported and the batch goes on. All ranks run every job together
(one process group). Ends with a summary table and, with --report, a JSON report.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import yaml

from convert.checkpoint import INDEX_NAME
from convert.errors import ConversionError
from convert.families import PER_EXPERT
from convert.job import JobOptions, run_job
from convert.storage import Storage
from convert.transforms import DTYPE_NAMES
from launch.dist import Dist, exit_process, init_dist
from launch.local import add_nproc_flag
from sharding.file_layout import parse_size

JobRunner = Callable[[dict[str, Any], Dist, dict[str, Any]], int]


def _base_options(job: dict[str, Any], layout: str | None) -> JobOptions:
    size = job.get("max_shard_size", "5GB")
    return JobOptions(
        src=job["src"], dst=job["dst"], layout=layout, ep=job.get("ep"),
        max_shard_bytes=parse_size(str(size)) if not isinstance(size, int) else size,
        dtype=DTYPE_NAMES[job.get("dtype", "keep")], overwrite=bool(job.get("overwrite", False)),
        family=job.get("family"), workers=int(job.get("workers", 4)),
        storage_options=dict(job.get("storage_options") or {}), show_progress=False,
    )


def _fuse(job: dict[str, Any], dist: Dist, report: dict[str, Any]) -> int:
    return run_job(_base_options(job, job.get("layout")), dist, report)


def _split(job: dict[str, Any], dist: Dist, report: dict[str, Any]) -> int:
    return run_job(_base_options(job, PER_EXPERT), dist, report)


RUNNERS: dict[str, tuple[JobRunner, str]] = {
    # kind: (runner, file whose presence marks a finished destination)
    "fuse_experts": (_fuse, INDEX_NAME),
    "split_experts": (_split, INDEX_NAME),
}


def register(kind: str, runner: JobRunner, marker: str) -> None:
    """Add a job kind (used by the adapter entry points)."""
    RUNNERS[kind] = (runner, marker)


def _load_adapter_kinds() -> None:
    try:
        from convert import adapter_batch
    except ImportError:
        return
    # Register here too: run as `python -m launch.batch`, this module is __main__, not launch.batch.
    for kind, (runner, marker) in adapter_batch.KINDS.items():
        register(kind, runner, marker)


def load_manifest(path: str) -> list[dict[str, Any]]:
    """The jobs of a manifest, with defaults applied and names filled in; raises ConversionError."""
    try:
        with open(path) as fh:
            doc = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError) as exc:
        raise ConversionError(f"{path}: cannot read manifest ({exc})") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("jobs"), list):
        raise ConversionError(f"{path}: expected a mapping with a 'jobs' list")
    defaults = dict(doc.get("defaults") or {})
    jobs = []
    for i, raw in enumerate(doc["jobs"]):
        if not isinstance(raw, dict):
            raise ConversionError(f"{path}: job {i} is not a mapping")
        job = {**defaults, **raw}
        job.setdefault("name", f"job{i}")
        jobs.append(job)
    return jobs


def _problem(job: dict[str, Any]) -> str | None:
    if job.get("kind") not in RUNNERS:
        return f"unknown kind {job.get('kind')!r} (known: {sorted(RUNNERS)})"
    missing = [k for k in ("src", "dst") if not job.get(k)]
    return f"missing {', '.join(missing)}" if missing else None


def run_batch(jobs: list[dict[str, Any]], dist: Dist) -> list[dict[str, Any]]:
    """Run every job on all ranks; returns one result row per job (meaningful on rank 0)."""
    _load_adapter_kinds()
    rows = []
    for job in jobs:
        row: dict[str, Any] = {"name": job["name"], "kind": job.get("kind"), "src": job.get("src"),
                               "dst": job.get("dst"), "status": "", "bytes": 0, "seconds": 0.0}
        decision: str | None = None
        if dist.is_main:
            decision = _problem(job)
            if decision is None:
                _, marker = RUNNERS[job["kind"]]
                try:
                    if not job.get("overwrite") and Storage(job["dst"], job.get("storage_options")).exists(marker):
                        decision = "skip"
                except Exception as exc:  # noqa: BLE001 - an unreachable destination fails this job only
                    decision = f"cannot read destination: {exc}"
        decision = dist.broadcast(decision)
        if decision == "skip":
            row["status"] = "skipped (already complete)"
        elif decision:
            row.update(status="failed", error=decision)
        else:
            runner, _ = RUNNERS[job["kind"]]
            report: dict[str, Any] = {}
            t0 = time.perf_counter()
            try:
                code = runner(job, dist, report)
            except Exception as exc:  # noqa: BLE001 - one broken job must not stop the batch
                code, report["error"] = 1, f"{type(exc).__name__}: {exc}"
            row["seconds"] = round(time.perf_counter() - t0, 3)
            row["bytes"] = int(report.get("bytes", 0))
            if code == 0:
                row["status"] = "done (resumed)" if report.get("resumed") else "done"
            else:
                row.update(status="failed", error=(report.get("error") or f"exit code {code}").strip())
        rows.append(row)
    return rows


def summary_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table: job, kind, status, bytes, time, throughput, and the reason of failures."""
    lines = [f"{'job':<24} {'kind':<14} {'status':<26} {'GB':>9} {'s':>8} {'GB/s':>7}"]
    for r in rows:
        gbs = r["bytes"] / r["seconds"] / 1e9 if r["seconds"] else 0.0
        lines.append(f"{r['name'][:24]:<24} {str(r['kind'])[:14]:<14} {r['status'][:26]:<26} "
                     f"{r['bytes'] / 1e9:>9.3f} {r['seconds']:>8.2f} {gbs:>7.3f}")
        if r.get("error"):
            lines.append(f"    reason: {r['error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Parse flags, run the manifest, print the summary; exit 1 if any job failed."""
    p = argparse.ArgumentParser(prog="launch.batch", description=__doc__.splitlines()[0])
    p.add_argument("manifest")
    p.add_argument("--report", default=None, help="write the results as JSON here")
    add_nproc_flag(p)
    a = p.parse_args(argv)
    dist = init_dist(nproc=a.nproc)
    try:
        jobs: list[dict[str, Any]] | str = []
        if dist.is_main:
            try:
                jobs = load_manifest(a.manifest)
            except ConversionError as exc:
                jobs = str(exc)
        jobs = dist.broadcast(jobs)
        if isinstance(jobs, str):
            if dist.is_main:
                print(f"error: {jobs}", file=sys.stderr)
            code = 2
        else:
            rows = run_batch(jobs, dist)
            if dist.is_main:
                print(summary_table(rows))
                if a.report:
                    with open(a.report, "w") as fh:
                        json.dump({"jobs": rows}, fh, indent=2)
            code = 1 if any(r["status"] == "failed" for r in rows) else 0
    finally:
        dist.close()
    exit_process(code, dist)


if __name__ == "__main__":
    main()
