"""`torchrun ... -m launch.batch MANIFEST.yaml`: run a list of conversions, skipping finished ones.

The manifest (YAML or JSON) is `{defaults: {...}, jobs: [{name, kind, src, dst, ...}]}`. Kinds:
fuse_experts, split_experts, split_adapter, fuse_adapter (convert.kinds). Every other key of a
job is a flag of that kind's entry point, parsed by its own parser (launch.manifest): unknown
keys or bad values refuse the whole manifest before any job runs. `dry_run: true` prints the
job's plan, `verify: true` checks its output with convert.verify. A job whose destination is
already complete is skipped; a failed job is reported and the batch goes on. All ranks run
every job together (one process group). Ends with a summary table and, with --report, a JSON report.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from convert.engine.output_record import is_complete_output
from convert.errors import ConversionError, describe
from convert.io.storage import Storage
from convert.kinds import KINDS, entry_point
from convert.settings import Settings, StorageSettings
from convert.toplevel import ToolParser, finish, run_guarded, settle
from launch.dist import Dist, init_dist
from launch.local import add_nproc_flag
from launch.manifest import job_namespace, load_manifest

JobRunner = Callable[[argparse.Namespace, Dist, dict[str, Any]], int]

RUNNERS: dict[str, tuple[JobRunner, str]] = {
    # kind: (runner, file whose presence marks a finished destination)
    kind: (entry_point(kind).run, entry_point(kind).MARKER) for kind in KINDS
}


def _problem(job: dict[str, Any]) -> str | None:
    if job.get("kind") not in RUNNERS:
        return f"unknown kind {job.get('kind')!r} (known: {sorted(RUNNERS)})"
    missing = [k for k in ("src", "dst") if not job.get(k)]
    return f"missing {', '.join(missing)}" if missing else None


def run_batch(jobs: list[dict[str, Any]], dist: Dist, settings: StorageSettings | None = None) -> list[dict[str, Any]]:
    """Run every job on all ranks; returns one result row per job (meaningful on rank 0). `settings`: the store
    settings of the batch's own look at each destination (None: the defaults); each job reads its own as it
    starts."""
    rows = []
    for job in jobs:
        row: dict[str, Any] = {"name": job["name"], "kind": job.get("kind"), "src": job.get("src"),
                               "dst": job.get("dst"), "dry_run": bool(job.get("dry_run")),
                               "verify": bool(job.get("verify")), "status": "", "bytes": 0, "seconds": 0.0,
                               "notes": list(job.get("notes") or [])}
        decision: str | None = None
        if dist.is_main:
            decision = _problem(job)
            if decision is None:
                _, marker = RUNNERS[job["kind"]]
                try:
                    if not job.get("overwrite") and is_complete_output(
                            Storage(job["dst"], job.get("storage_options"), settings), marker):
                        decision = "skip"
                except Exception as exc:  # noqa: BLE001 - an unreachable destination fails this job only
                    decision = f"cannot read destination: {describe(exc)}"
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
                code = runner(job_namespace(job), dist, report)
            except Exception as exc:  # noqa: BLE001 - one broken job must not stop the batch
                code, report["error"] = 1, describe(exc)
            row["seconds"] = round(time.perf_counter() - t0, 3)
            row["bytes"] = int(report.get("bytes", 0))
            row.update(_outcome(code, row, report))
        rows.append(row)
    return rows


def _outcome(code: int, row: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    """The status (and error, verifier result) of a job that ran, for its summary row."""
    checked = report.get("verify")
    out: dict[str, Any] = {"verify_result": checked} if checked else {}
    if code == 0:
        if row["dry_run"]:
            return {**out, "status": "dry run"}
        status = "done (resumed)" if report.get("resumed") else "done"
        return {**out, "status": status + (", verified" if checked else "")}
    error = (report.get("error") or "").strip()
    if checked and checked["code"] == 1:
        n = checked["mismatches"]
        return {**out, "status": f"failed: verify found {n} mismatch{'es' if n != 1 else ''}",
                "error": error or f"{row['dst']} is not a correct conversion of {row['src']}; its completion "
                                  "marker was renamed *.unverified"}
    if checked and checked["code"] == 2:
        return {**out, "status": "failed: could not verify", "error": checked.get("error") or error}
    return {**out, "status": "failed", "error": error or f"exit code {code}"}


def summary_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table: job, kind, status, bytes, time, throughput, the reason of failures and the jobs' notes."""
    lines = [f"{'job':<24} {'kind':<14} {'status':<36} {'GB':>9} {'s':>8} {'GB/s':>7}"]
    for r in rows:
        gbs = r["bytes"] / r["seconds"] / 1e9 if r["seconds"] else 0.0
        lines.append(f"{r['name'][:24]:<24} {str(r['kind'])[:14]:<14} {r['status'][:36]:<36} "
                     f"{r['bytes'] / 1e9:>9.3f} {r['seconds']:>8.2f} {gbs:>7.3f}")
        if r.get("error"):
            lines.append(f"    reason: {r['error']}")
        lines += [f"    note: {n}" for n in r.get("notes") or []]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Parse flags, run the manifest, print the summary; exit 1 if any job failed."""
    p = ToolParser(prog="launch.batch", description=__doc__.splitlines()[0])
    p.add_argument("manifest")
    p.add_argument("--report", default=None, help="write the results as JSON here")
    add_nproc_flag(p)
    a = p.parse_args(argv)
    finish(run_guarded(lambda: _run(a)))


def _run(a: argparse.Namespace) -> int:
    settings = Settings.from_env()  # the stores' knobs (settings.storage): read once, as the batch starts
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
            rows = run_batch(jobs, dist, settings.storage)
            if dist.is_main:
                print(summary_table(rows))
                if a.report:
                    with open(a.report, "w") as fh:
                        json.dump({"jobs": rows}, fh, indent=2)
            code = 1 if any(r["status"].startswith("failed") for r in rows) else 0
        settle(code)
        dist.barrier()  # nobody leaves before rank 0 has printed the summary (a launcher then stops every rank)
    finally:
        dist.close()
    return code


if __name__ == "__main__":
    from convert.toplevel import run_program

    run_program(main)
