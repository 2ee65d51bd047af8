"""The disk's own bounds for a merge of bench.dequant's FP8 layer: how fast can any tool be on this machine?

    python -m bench.disk --preset full --workdir /tmp --out $OUT      # lent 16-core machine, ~2 minutes
    python -m bench.disk --preset tiny --no-drop-caches               # smoke test, seconds

A merge reads every byte of the base once and writes as many; it also imports torch before its first byte.
This measures each of those alone, on the same inputs (bench.dequant's FP8 DeepSeek-V3 layer), from a cold
page cache as bench.run takes it: reading the base (8 MiB reads, 4 threads, as launch.readahead reads), `cp -r`
of it + sync (reading and writing), `cp -r` of it with the base already in the page cache + sync (writing
alone), `import torch` alone (the code pages warm), and `import torch` while launch.readahead reads the base
(what the --nproc parent does: bytes read ahead by the time torch is in). Writes DISK.md and disk.json to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.run import cold_cache, dir_bytes

REPO = Path(__file__).resolve().parent.parent
WARM = "import torch, safetensors, numpy, convert.merge_adapter"
IMPORT = ("import glob, json, sys, time\nfrom launch.readahead import ReadAhead\nt = time.perf_counter()\n"
          "with ReadAhead(sorted(glob.glob(sys.argv[1] + '/*.safetensors')) if len(sys.argv) > 1 else []) as ra:\n"
          "    import torch\n"
          "print(json.dumps({'import_s': time.perf_counter() - t, 'read_ahead_bytes': ra.requested}))\n")


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Wall seconds of `cmd` (checked) and its stdout."""
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, check=True, capture_output=True, text=True)
    return time.perf_counter() - t, proc.stdout


def measure(base: Path, work: Path, drop: bool) -> dict[str, Any]:
    """Every case on `base` (an FP8 checkpoint directory); copies go below `work` and are removed."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    size = dir_bytes(base)
    out = work / "copy"
    res: dict[str, Any] = {"bytes": size}

    def cold() -> str:
        return cold_cache([base], drop, 1.0, WARM, env, REPO)

    res["cache"] = cold()
    read_all = ("import glob, sys\nfrom launch.readahead import ReadAhead\n"
                "ReadAhead(sorted(glob.glob(sys.argv[1] + '/*.safetensors')), budget=1 << 62).start().wait()\n")
    res["read_s"], _ = timed([sys.executable, "-c", read_all, str(base)], env)
    cold()
    res["cp_s"], _ = timed(["bash", "-c", f'cp -r "{base}" "{out}" && sync "{out}"/*'], env)
    shutil.rmtree(out)
    cold()
    subprocess.run(["bash", "-c", f'cat "{base}"/*.safetensors > /dev/null'], check=True)  # the source in memory
    res["write_s"], _ = timed(["bash", "-c", f'cp -r "{base}" "{out}" && sync "{out}"/*'], env)
    shutil.rmtree(out)
    cold()
    seconds, text = timed([sys.executable, "-c", IMPORT], env)
    res["import_torch"] = {"process_s": seconds, **json.loads(text)}
    cold()
    seconds, text = timed([sys.executable, "-c", IMPORT, str(base)], env)
    res["import_torch_reading_ahead"] = {"process_s": seconds, **json.loads(text)}
    return res


def markdown(res: dict[str, Any], env: str) -> str:
    """The report: each bound in seconds and GB/s."""
    gb = res["bytes"] / 1e9
    alone, ahead = res["import_torch"], res["import_torch_reading_ahead"]
    rows = [("read the base (4 threads, 8 MiB reads)", res["read_s"]), ("`cp -r` + sync (read and write)", res["cp_s"]),
            ("`cp -r` + sync, base already cached (write alone)", res["write_s"])]
    lines = [f"# The disk's bounds for a merge of {gb:.2f} GB", "", f"{env}; cache: {res['cache']}", "",
             "| case | seconds | GB/s |", "|---|---|---|"]
    lines += [f"| {name} | {s:.2f} | {gb / s:.2f} |" for name, s in rows]
    lines += ["", f"`import torch` alone: {alone['process_s']:.2f} s (the process), {alone['import_s']:.2f} s (the "
              f"import); while launch.readahead reads the base: {ahead['import_s']:.2f} s, "
              f"{ahead['read_ahead_bytes'] / 1e9:.2f} GB read ahead by then."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Generate bench.dequant's FP8 layer (--preset), measure, write DISK.md and disk.json to --out."""
    from bench.dequant import FP8_CODES, PRESETS, generate

    p = argparse.ArgumentParser(prog="bench.disk", description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="full")
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    p.add_argument("--no-drop-caches", action="store_true", help="evict with posix_fadvise only")
    p.add_argument("--fp8-codes", choices=FP8_CODES, default=FP8_CODES[0],
                   help="how the FP8 weights' codes are drawn (bench.dequant.FP8_CODES)")
    a = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="moe-disk-", dir=a.workdir))
    try:
        generate(work / "base", dataclasses.replace(PRESETS[a.preset], fp8_codes=a.fp8_codes), os.cpu_count() or 1)
        res = measure(work / "base", work, not a.no_drop_caches)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    env = f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "disk.json").write_text(json.dumps({"env": env, **res}, indent=2))
    (out / "DISK.md").write_text(markdown(res, env))
    print((out / "DISK.md").read_text())


if __name__ == "__main__":
    main()
