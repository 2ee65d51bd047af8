"""Hypothesis properties of the engine, in-process with simulated ranks (no torchrun).

Random families, E, layers, shapes, dtypes, source sharding, --ep, world size and shard size:
- a plan writes every output byte exactly once and reads every source byte exactly once;
- the ranks' piece assignments partition the pieces, each expert piece on the rank of its slice;
- output files are packed exactly (header, then slots back to back) and respect the shard size;
- split(fuse(x)) == x byte for byte (also through a widening and narrowing cast), and the
  independent verifier accepts every step, its ranks' shares partitioning the checks.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from convert.engine.job import JobOptions, plan_job
from convert.engine.sinks import STATE_DIR, SinkJob, make_sink
from convert.families import PER_EXPERT, load_families
from convert.formats.checkpoint import open_checkpoint
from convert.formats.shard_layout import layout_files
from convert.io.storage import Storage
from convert.plan.base import plan_conversion
from convert.verify.run import VerifyOptions, check_share, plan_verify, share, summarize
from launch.dist import Dist
from sharding.ep import expert_slices

TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
ROLE_SHAPES = {"gate": "IH", "up": "IH", "down": "HI", "gate_bias": "I", "up_bias": "I", "down_bias": "H"}
# families whose expert roles are float matrices and biases (not MXFP4 blocks/scales: tests/test_quantized.py)
FAMILIES = {n: f for n, f in load_families().items() if set(f.roles) <= set(ROLE_SHAPES)}


@dataclass(frozen=True)
class Case:
    family: str
    experts: int
    layers: int
    hidden: int
    inter: int
    dtype: str
    src_shards: int
    seed: int


cases = st.builds(
    Case,
    family=st.sampled_from(sorted(FAMILIES)),
    experts=st.integers(1, 7),
    layers=st.integers(1, 2),
    hidden=st.integers(1, 6),
    inter=st.integers(1, 6),
    dtype=st.sampled_from(sorted(TORCH)),
    src_shards=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)


def write_source(case: Case, root: Path) -> Path:
    """A per-expert checkpoint of `case` under root/src: random values, odd tensors included, random sharding."""
    g = torch.Generator().manual_seed(case.seed)
    fam = FAMILIES[case.family]
    dims = {"H": case.hidden, "I": case.inter}
    dt = TORCH[case.dtype]
    tensors: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": torch.randn(3, case.hidden, generator=g).to(dt),
        "model.scalar": torch.randn((), generator=g).to(dt),
        "model.empty": torch.empty(0, case.hidden, dtype=dt),
        "model.position_ids": torch.arange(3, dtype=torch.int64),
    }
    for layer in range(case.layers):
        prefix = f"model.layers.{layer}"
        tensors[f"{prefix}.mlp.gate.weight"] = torch.randn(case.experts, case.hidden, generator=g).to(dt)
        for e in range(case.experts):
            for role, tpl in fam.expert_templates.items():
                shape = tuple(dims[c] for c in ROLE_SHAPES[role])
                tensors[tpl.format(prefix=prefix, e=e)] = torch.randn(*shape, generator=g).to(dt)
    # A per-expert checkpoint names every tensor as save_pretrained does (the family's renames undone).
    tensors = {fam.to_disk(k): v for k, v in tensors.items()}
    src = root / "src"
    src.mkdir()
    names = sorted(tensors)
    order = torch.randperm(len(names), generator=g).tolist()
    weight_map = {}
    for k in range(case.src_shards):
        part = [names[i] for i in order[k :: case.src_shards]]
        fname = f"part-{k}.safetensors"
        save_file({n: tensors[n] for n in part}, src / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    if case.src_shards > 1:
        (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = {"model_type": fam.model_types[0], "num_experts": case.experts, "num_local_experts": case.experts}
    (src / "config.json").write_text(json.dumps(cfg))
    return src


def tiles_once(intervals: list[tuple[int, int]], lo: int, hi: int) -> bool:
    """True when the half-open intervals cover [lo, hi) exactly once (no gap, no overlap)."""
    pos = lo
    for a, b in sorted(i for i in intervals if i[1] > i[0]):
        if a != pos:
            return False
        pos = b
    return pos == hi


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases, ep=st.integers(1, 9), world=st.integers(1, 4), shard=st.integers(1, 3000),
       layout=st.sampled_from(["default", "stacked"]), cast=st.sampled_from([None, "F32", "BF16"]),
       split=st.booleans())
def test_plan_covers_every_byte_once_and_ranks_partition_it(case, ep, world, shard, layout, cast, split):
    ep = min(ep, case.experts)  # an --ep above E is refused (tests/test_flags.py)
    root = Path(tempfile.mkdtemp())
    try:
        src = write_source(case, root)
        fam = FAMILIES[case.family]
        target = fam.default_fused if layout == "default" or layout not in fam.fused else layout
        if split:  # plan the way back, from a fused source
            run_simulated(JobOptions(str(src), str(root / "fused"), target), 1, [0])
            src, target = root / "fused", PER_EXPERT
        ckpt = open_checkpoint(Storage(str(src)))
        plan = plan_conversion(ckpt, fam, target, cast)

        # every target byte written exactly once
        writes: dict[str, list[tuple[int, int]]] = {t.name: [] for t in plan.targets}
        for p in plan.pieces:
            for w in p.writes:
                writes[w.tensor].append((w.start, w.end))
        for t in plan.targets:
            assert tiles_once(writes[t.name], 0, t.nbytes), t.name

        # every source byte read exactly once (all source tensors are needed)
        reads: dict[str, list[tuple[int, int]]] = {}
        for p in plan.pieces:
            for r in p.reads:
                reads.setdefault(r.file, []).append((r.start, r.end))
        for fname, header in ckpt.headers.items():
            spans = sorted((t.start, t.end) for t in header.tensors.values() if t.nbytes)
            got = sorted(i for i in reads.get(fname, []) if i[1] > i[0])
            merged_src, merged_got = _merge(spans), _merge(got)
            assert merged_src == merged_got, fname
            assert sum(b - a for a, b in got) == sum(b - a for a, b in spans), f"{fname}: a byte read twice"

        # the ranks' assignments partition the pieces; expert pieces sit with their slice's rank
        setup = plan_job(JobOptions(str(src), str(root / "out"), target, ep=ep, max_shard_bytes=shard,
                                    dtype=cast, dry_run=True), Dist(0, world))
        flat = sorted(i for rank in setup.assignment for i in rank)
        assert flat == list(range(len(setup.pieces)))
        owner = {e: s % world for s, r in enumerate(expert_slices(plan.num_experts, ep)) for e in r}
        for rank, idx in enumerate(setup.assignment):
            for i in idx:
                if setup.pieces[i].expert is not None:
                    assert owner[setup.pieces[i].expert] == rank

        # files: header then slots back to back, every target in one file, shard size respected
        placed = [n for f in setup.files for n in f.slots]
        assert sorted(placed) == sorted(t.name for t in plan.targets)
        for f in setup.files:
            assert tiles_once([(s.start, s.end) for s in f.slots.values()], len(f.header), f.size)
            data = sum(s.end - s.start for s in f.slots.values())
            assert data <= shard or len(f.slots) == 1
        assert layout_files(plan.targets, shard, plan.metadata)[0].header == setup.files[0].header
    finally:
        shutil.rmtree(root)


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def run_simulated(opts: JobOptions, world: int, order: list[int]) -> None:
    """What every rank of a `world`-rank job does, in this process: rank 0 plans, ranks write, rank 0 commits."""
    setup = plan_job(opts, Dist(0, world))
    src, dst = Storage(opts.src), Storage(opts.dst)
    sink = make_sink(src, dst)
    job = SinkJob(setup.files, setup.pieces, setup.assignment, setup.fingerprint, workers=1)
    dst.makedirs()
    job.resume = sink.prepare(job, False)
    results = {r: sink.run(job, r, lambda n: None) for r in order}
    sink.commit(job, [results[r] for r in range(world)])
    for name in setup.copy_files:
        dst.copy_file_from(src, name)
    for name, data in setup.final_files.items():
        dst.write_bytes(name, data)
    dst.remove_tree(STATE_DIR)
    src.close()
    dst.close()


def verify_simulated(src: Path, dst: Path, world: int) -> None:
    """The verifier with `world` simulated ranks: its shares partition the checks, and it finds nothing."""
    opts = VerifyOptions(str(src), str(dst))
    relation = plan_verify(opts)
    experts = sorted(x for r in range(world) for x in share(relation, r, world)[0])
    assert experts == sorted((i, e) for i, c in enumerate(relation.experts) for e in range(c.num_experts))
    passes = sorted(x for r in range(world) for x in share(relation, r, world)[1])
    assert passes == list(range(len(relation.passes)))
    tallies = [check_share(relation, opts, r, world) for r in range(world)]
    text, report = summarize(relation, tallies, opts, world, 0.0)
    assert report["ok"], text


def load_all(d: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """name -> (dtype, shape, raw bytes) of every tensor in the directory's shards."""
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                t = h.get_tensor(k)
                out[k] = (str(t.dtype), tuple(t.shape), t.reshape(-1).clone().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases, ep=st.integers(1, 9), world=st.integers(1, 4), shard=st.integers(1, 3000),
       stacked=st.booleans(), widen=st.booleans(), data=st.data())
def test_split_of_fuse_is_the_identity(case, ep, world, shard, stacked, widen, data):
    ep = min(ep, case.experts)  # an --ep above E is refused (tests/test_flags.py)
    root = Path(tempfile.mkdtemp())
    try:
        src = write_source(case, root)
        fam = FAMILIES[case.family]
        layout = "stacked" if stacked and "stacked" in fam.fused else fam.default_fused
        # widen: fuse to fp32 and narrow back to the source dtype on split, which must also be exact
        up = "F32" if widen and case.dtype != "F32" else None
        down = case.dtype if up else None
        order = data.draw(st.permutations(range(world)))
        fused, back = root / "fused", root / "back"
        run_simulated(JobOptions(str(src), str(fused), layout, ep=ep, max_shard_bytes=shard, dtype=up), world, order)
        verify_simulated(src, fused, world)
        split_world = data.draw(st.integers(1, 4))
        run_simulated(JobOptions(str(fused), str(back), PER_EXPERT, ep=data.draw(st.integers(1, case.experts)),
                                 max_shard_bytes=data.draw(st.integers(1, 3000)), dtype=down),
                      split_world, list(range(split_world)))
        verify_simulated(fused, back, split_world)
        before, after = load_all(src), load_all(back)
        assert set(before) == set(after)
        for k in before:
            assert before[k] == after[k], k
        if up:  # a cast rewrites config.json: only its dtype key may change, and it names the dtype written
            written, source = json.loads((back / "config.json").read_text()), json.loads((src / "config.json").read_text())
            assert written.pop("torch_dtype") == str(TORCH[case.dtype]).removeprefix("torch.") and written == source
        else:
            assert (back / "config.json").read_bytes() == (src / "config.json").read_bytes()
        index = json.loads((back / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(before)
        assert index["metadata"]["total_size"] == sum(len(v[2]) for v in before.values())
        fused_dtypes = {v[0] for k, v in load_all(fused).items() if k != "model.position_ids"}
        assert fused_dtypes == {str(TORCH[up or case.dtype])}, fused_dtypes
    finally:
        shutil.rmtree(root)
