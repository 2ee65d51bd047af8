"""Batch runner: several jobs, one broken, one already finished; one job run as two torchrun "nodes"; strict
manifests (every key a flag of its entry point, checked before any job runs), dry_run and verify."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from convert.example import example_tensors, write_checkpoint
from helpers import REPO, load_dir, raw_bytes, run_tool
from s3_server import free_port


def _make_source(path, seed: int) -> None:
    tensors, cfg = example_tensors("qwen3_moe", layers=2, experts=5, hidden=64, inter=40, seed=seed)
    write_checkpoint(tensors, cfg, str(path), 60_000)


def test_batch_continues_past_a_broken_job(tmp_path):
    _make_source(tmp_path / "a", 1)
    _make_source(tmp_path / "b", 2)
    manifest = {
        "defaults": {"max_shard_size": "100KB"},
        "jobs": [
            {"name": "fuse-a", "kind": "fuse_experts", "src": str(tmp_path / "a"), "dst": str(tmp_path / "a-fused")},
            {"name": "broken", "kind": "fuse_experts", "src": str(tmp_path / "missing"), "dst": str(tmp_path / "x")},
            {"name": "split-a", "kind": "split_experts", "src": str(tmp_path / "a-fused"), "dst": str(tmp_path / "a-back")},
            {"name": "stacked-b", "kind": "fuse_experts", "layout": "stacked", "src": str(tmp_path / "b"),
             "dst": str(tmp_path / "b-stacked")},
        ],
    }
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(manifest))
    report = tmp_path / "report.json"
    proc = run_tool("launch.batch", str(tmp_path / "m.yaml"), "--report", str(report), nproc=2, check=False)
    assert proc.returncode == 1, proc.stderr
    rows = {r["name"]: r for r in json.loads(report.read_text())["jobs"]}
    assert rows["fuse-a"]["status"] == "done" and rows["split-a"]["status"] == "done"
    assert rows["stacked-b"]["status"] == "done" and rows["stacked-b"]["bytes"] > 0
    assert rows["broken"]["status"] == "failed" and "missing" in rows["broken"]["error"]
    assert "broken" in proc.stdout and "reason:" in proc.stdout
    before, after = load_dir(tmp_path / "a"), load_dir(tmp_path / "a-back")
    assert set(before) == set(after) and all(raw_bytes(before[k]) == raw_bytes(after[k]) for k in before)

    # a second run skips what is finished and fails the broken job again
    proc = run_tool("launch.batch", str(tmp_path / "m.yaml"), "--report", str(report), check=False)
    rows = {r["name"]: r for r in json.loads(report.read_text())["jobs"]}
    assert rows["fuse-a"]["status"].startswith("skipped") and rows["stacked-b"]["status"].startswith("skipped")
    assert rows["broken"]["status"] == "failed"


def test_two_torchrun_nodes_on_one_host(tmp_path):
    _make_source(tmp_path / "src", 3)
    run_tool("convert.fuse_experts", "--src", str(tmp_path / "src"), "--dst", str(tmp_path / "single"), nproc=2)
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=mn-test",
           "-m", "convert.fuse_experts", "--src", str(tmp_path / "src"), "--dst", str(tmp_path / "multi"),
           "--no-progress"]
    nodes = [subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [n.communicate(timeout=240) for n in nodes]
    assert all(n.returncode == 0 for n in nodes), outs
    # files only: .moe-convert/ holds the output record (compared below: same plan, same record)
    single = {p.name: p.read_bytes() for p in (tmp_path / "single").iterdir() if p.is_file()}
    multi = {p.name: p.read_bytes() for p in (tmp_path / "multi").iterdir() if p.is_file()}
    assert single == multi
    record = Path(".moe-convert") / "output.json"
    assert (tmp_path / "single" / record).read_bytes() == (tmp_path / "multi" / record).read_bytes()


# ----------------------------------------------------------------------------- strict manifests


def call_batch(*argv: str) -> int:
    """launch.batch's main() in this process (world size 1); returns its exit code."""
    from launch import batch

    with pytest.raises(SystemExit) as exc:
        batch.main(list(argv))
    return int(exc.value.code or 0)


def _write(path, doc) -> str:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(path)


BAD_JOBS = [
    ({"lyout": "stacked"}, "job 'bad': unknown key 'lyout' for kind fuse_experts (did you mean 'layout'?)"),
    ({"lay": "stacked"}, "job 'bad': unknown key 'lay' for kind fuse_experts (did you mean 'layout'?)"),
    ({"max-shard-sise": "10KB"}, "job 'bad': unknown key 'max-shard-sise' for kind fuse_experts "
                                 "(did you mean 'max_shard_size'?)"),
    ({"max_shard_size": "10XB"}, "job 'bad': max_shard_size: '10XB' is not a size (examples: 5GB, 500MB, 2GiB, "
                                 "1073741824)"),
    ({"max-shard-size": "10XB"}, "job 'bad': max-shard-size: '10XB' is not a size"),
    ({"ep": 0}, "job 'bad': ep: must be at least 1, got 0"),
    ({"workers": -2}, "job 'bad': workers: must be at least 1, got -2"),
    ({"layout": "foo"}, "job 'bad': layout: invalid choice: 'foo' (choose from 'native', 'stacked', 'transformers')"),
    ({"layout": "per_expert"}, "job 'bad': layout: invalid choice: 'per_expert'"),
    ({"dry_run": "yes"}, "job 'bad': dry_run: expected true or false, got 'yes'"),
    ({"ep": True}, "job 'bad': ep: expected a value for --ep, got true"),
    ({"storage_options": "{nope"}, "job 'bad': storage_options: not valid JSON"),
    ({"storage_options": [1, 2]}, "job 'bad': storage_options: expected a JSON object"),
    ({"max_shard_size": "1MB", "max-shard-size": "2MB"}, "job 'bad': 'max_shard_size' and 'max-shard-size' are the "
                                                         "same flag --max-shard-size; give it once"),
    ({"help": True}, "job 'bad': unknown key 'help' for kind fuse_experts"),
    ({"kind": "split_experts", "layout": "stacked"}, "job 'bad': unknown key 'layout' for kind split_experts"),
    ({"kind": "fuse_expert"}, "job 'bad': unknown kind 'fuse_expert' (did you mean 'fuse_experts'?)"),
    ({"kind": "fuse_adapter"}, "job 'bad': missing required key(s) for kind fuse_adapter: layout"),
    ({"src": None}, "job 'bad': missing required key(s) for kind fuse_experts: src"),
]


@pytest.mark.parametrize("bad, expect", BAD_JOBS, ids=[next(iter(b)) + "-" + str(i) for i, (b, _) in enumerate(BAD_JOBS)])
def test_bad_key_or_value_refuses_the_whole_manifest(tmp_path, capsys, bad, expect):
    _make_source(tmp_path / "a", 1)
    good = {"name": "good", "kind": "fuse_experts", "src": str(tmp_path / "a"), "dst": str(tmp_path / "good-out")}
    job = {"name": "bad", "kind": "fuse_experts", "src": str(tmp_path / "a"), "dst": str(tmp_path / "bad-out"), **bad}
    manifest = _write(tmp_path / "m.yaml", {"jobs": [good, job]})
    code = call_batch(manifest, "--report", str(tmp_path / "report.json"))
    out = capsys.readouterr()
    assert code == 2 and out.err == f"error: {manifest}: {expect}" + out.err.split(expect, 1)[1], out.err
    assert len(out.err.strip().splitlines()) == 1 and out.out == ""
    assert not (tmp_path / "good-out").exists() and not (tmp_path / "bad-out").exists(), "no job may run"
    assert not (tmp_path / "report.json").exists()


@pytest.mark.parametrize("doc, expect", [
    ({"defaults": {"workrs": 2}, "jobs": [{"kind": "split_experts", "src": "a", "dst": "b"}]},
     "defaults: unknown key 'workrs' (did you mean 'workers'?)"),
    ({"defaults": {"layout": "stacked"}, "jobs": [{"kind": "split_experts", "src": "a", "dst": "b"}]},
     "defaults: unknown key 'layout' (no job of this manifest has the flag --layout)"),
    ({"jobs": [{"kind": "split_experts", "src": "a", "dst": "b", "verfy": True}]},
     "jobs[0]: unknown key 'verfy' for kind split_experts (did you mean 'verify'?)"),
    ({"job": []}, "expected a mapping with a 'jobs' list"),
    ({"jobs": [], "default": {}}, "unknown top-level key 'default' (did you mean 'defaults'?)"),
    ({"jobs": [{"name": "x", "kind": "split_experts", "src": "a", "dst": "b"},
               {"name": "x", "kind": "split_experts", "src": "c", "dst": "d"}]},
     "job 'x': the name 'x' is used by an earlier job; names must be unique"),
])
def test_manifest_level_problems_are_named(tmp_path, capsys, doc, expect):
    manifest = _write(tmp_path / "m.yaml", doc)
    assert call_batch(manifest) == 2
    err = capsys.readouterr().err
    assert err == f"error: {manifest}: {expect}\n", err


def test_a_key_given_twice_in_yaml_is_refused(tmp_path, capsys):
    (tmp_path / "m.yaml").write_text("jobs:\n  - kind: fuse_experts\n    src: a\n    dst: b\n    layout: stacked\n"
                                     "    layout: transformers\n")
    assert call_batch(str(tmp_path / "m.yaml")) == 2
    assert "key 'layout' is given twice" in capsys.readouterr().err


def test_manifest_keys_parse_like_the_command_line(tmp_path):
    from launch.manifest import load_manifest

    doc = {"defaults": {"max-shard-size": "10KB", "storage_options": {"anon": True}},
           "jobs": [{"name": "f", "kind": "fuse_experts", "src": "a", "dst": "b", "layout": "stacked", "ep": 3,
                     "dry_run": True, "verify": False, "workers": 2},
                    {"kind": "split_adapter", "src": "c", "dst": "d", "base_config": "cfg.json", "dtype": "bf16"}]}
    jobs = load_manifest(_write(tmp_path / "m.yaml", doc))
    assert jobs[0]["max_shard_size"] == 10_000 and jobs[0]["storage_options"] == {"anon": True}
    assert (jobs[0]["layout"], jobs[0]["ep"], jobs[0]["dry_run"], jobs[0]["verify"], jobs[0]["workers"]) == \
        ("stacked", 3, True, False, 2)
    assert jobs[1]["name"] == "job1" and jobs[1]["base_config"] == "cfg.json" and jobs[1]["dtype"] == "bf16"
    assert jobs[1]["ep"] is None and jobs[1]["no_progress"] and not jobs[1]["overwrite"]


def _readme_manifest() -> str:
    text = (REPO / "README.md").read_text()
    block = text.split("### Batches", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    return block


def test_readme_and_example_manifests_parse(tmp_path):
    from launch.manifest import load_manifest

    (tmp_path / "readme.yaml").write_text(_readme_manifest())
    jobs = {j["name"]: j for j in load_manifest(str(tmp_path / "readme.yaml"))}
    assert jobs["qwen3-stacked"]["verify"] and jobs["qwen3-stacked"]["layout"] == "stacked"
    # the defaults' max_shard_size is for the base weights: vLLM (the adapter job's target) reads one file (issue 22)
    assert jobs["adapter-plan"]["dry_run"] and jobs["adapter-plan"]["max_shard_size"] is None
    assert jobs["qwen3-stacked"]["max_shard_size"] == 5_000_000_000
    assert jobs["adapter-plan"]["notes"] == ["defaults' max_shard_size not applied: the target vllm reads one "
                                             "adapter_model.safetensors, not a sharded adapter (configs/targets/"
                                             "vllm.json: sharded false); written as one file"]
    example = load_manifest(str(REPO / "configs" / "batch-example.yaml"))
    assert [j["kind"] for j in example] == ["fuse_experts", "fuse_experts", "split_experts", "split_adapter",
                                            "split_adapter", "fuse_adapter"]
    assert all(j["ep"] == 8 for j in example)


def test_dry_run_and_verify_are_honoured_and_reported(tmp_path, capsys, monkeypatch):
    import convert.verify.run

    _make_source(tmp_path / "a", 4)
    jobs = [
        {"name": "plan-only", "kind": "fuse_experts", "src": str(tmp_path / "a"), "dst": str(tmp_path / "plan"),
         "dry_run": True, "layout": "stacked", "max-shard-size": "10KB", "verify": True},
        {"name": "checked", "kind": "fuse_experts", "src": str(tmp_path / "a"), "dst": str(tmp_path / "checked"),
         "verify": True},
        {"name": "corrupted", "kind": "fuse_experts", "src": str(tmp_path / "a"), "dst": str(tmp_path / "corrupted"),
         "verify": True, "layout": "stacked"},
    ]
    real_plan = convert.verify.run.plan_verify

    def corrupt_then_plan(opts):
        # Flip one byte of the "corrupted" job's output just before the real verifier reads it.
        if opts.dst.endswith("corrupted"):
            shard = next((tmp_path / "corrupted").glob("*.safetensors"))
            data = bytearray(shard.read_bytes())
            data[-3] ^= 0xFF
            shard.write_bytes(bytes(data))
        return real_plan(opts)

    monkeypatch.setattr(convert.verify.run, "plan_verify", corrupt_then_plan)
    report = tmp_path / "report.json"
    code = call_batch(_write(tmp_path / "m.yaml", {"jobs": jobs}), "--report", str(report))
    out = capsys.readouterr().out
    assert code == 1
    rows = {r["name"]: r for r in json.loads(report.read_text())["jobs"]}
    assert rows["plan-only"]["status"] == "dry run" and rows["plan-only"]["dry_run"] and rows["plan-only"]["bytes"] == 0
    assert not (tmp_path / "plan").exists(), "a dry run writes nothing"
    assert "plan: qwen3_moe per_expert -> stacked" in out and "model-00002-of-" in out, "the plan is shown"
    assert rows["checked"]["status"] == "done, verified" and rows["checked"]["verify"]
    assert rows["checked"]["verify_result"] == {"code": 0, "mismatches": 0, "error": ""}
    assert (tmp_path / "checked" / "model.safetensors.index.json").exists()
    bad = rows["corrupted"]
    assert bad["status"] == "failed: verify found 1 mismatch" and bad["verify_result"]["mismatches"] == 1
    assert "renamed" in bad["error"] and "OK:" in out
    assert not (tmp_path / "corrupted" / "model.safetensors.index.json").exists()
    assert (tmp_path / "corrupted" / "model.safetensors.index.json.unverified").exists()
    for status in ("dry run", "done, verified", "failed: verify found 1 mismatch"):
        assert status in out


def test_strict_manifest_under_torchrun(tmp_path):
    _make_source(tmp_path / "a", 5)
    jobs = [
        {"name": "fuse", "kind": "fuse_experts", "src": str(tmp_path / "a"), "dst": str(tmp_path / "fused"),
         "verify": True, "max-shard-size": "50KB", "ep": 3},
        {"name": "plan", "kind": "split_experts", "src": str(tmp_path / "fused"), "dst": str(tmp_path / "back"),
         "dry_run": True},
    ]
    report = tmp_path / "report.json"
    proc = run_tool("launch.batch", _write(tmp_path / "m.yaml", {"jobs": jobs}), "--report", str(report), nproc=2)
    rows = {r["name"]: r for r in json.loads(report.read_text())["jobs"]}
    assert rows["fuse"]["status"] == "done, verified" and rows["plan"]["status"] == "dry run", proc.stdout
    assert "on 2 rank(s)" in proc.stdout and len(list((tmp_path / "fused").glob("*.safetensors"))) > 1
    assert not (tmp_path / "back").exists()
    # a misspelled key: refused on every rank before any job runs
    jobs[1].update(dry_run=False, dst=str(tmp_path / "back2"), wrkers=2)
    jobs[0]["dst"] = str(tmp_path / "fused2")
    proc = run_tool("launch.batch", _write(tmp_path / "m2.yaml", {"jobs": jobs}), nproc=2, check=False)
    assert proc.returncode != 0  # 2 without torchrun; torchrun itself reports 1 for any failed rank
    assert f"error: {tmp_path / 'm2.yaml'}: job 'plan': unknown key 'wrkers' for kind split_experts " \
           "(did you mean 'workers'?)" in proc.stderr
    assert not (tmp_path / "fused2").exists() and not (tmp_path / "back2").exists()
