"""split_adapter / fuse_adapter --target (issue 14): the layout, names, zero pairs, adapter_config.json and file
count each target (configs/targets/*.json) asks for, for every family of configs/families, checked against real
peft adapters on tiny Qwen3-MoE, Mixtral, gpt-oss and DeepSeek-V3 models and synthetic ones.

What the tests expect is read from the target rules (expert_layout, naming, all_roles, ...), never from a copy of
their values here, so they hold whatever the rules say for a server; the rules themselves are checked against the
servers' loading code elsewhere (docs/SERVERS.md).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from adapter_fixtures import read_adapter, write_adapter
from convert.families import load_families, template_regex
from convert.formats.adapter_layouts import lora_roles, lora_tensors, output_role
from convert.targets.rules import load_target
from helpers import raw_bytes, run_tool
from model_fixtures import build_model

PEFT = "base_model.model."
R = 2


def _families() -> list[str]:
    return sorted(f.name for f in load_families().values() if lora_roles(f))


def _rules(target: str, family: str):
    return load_target(target).for_family(family)


def _named(family, name: str, naming: str) -> str:
    """A key in model naming (`base_model.model.` + module [+ .lora_X.weight]) under `naming`."""
    body = name[len(PEFT):]
    lora = body.find(".lora_")
    module, rest = (body[:lora], body[lora:]) if lora >= 0 else (body, "")
    if naming == "checkpoint":
        disk = family.to_disk(module + ".weight")
        module = disk[: -len(".weight")] if disk.endswith(".weight") else module  # `gate_weight`: not a module rename
    return PEFT + module + rest


def _run(kind: str, src: Path, dst: Path, *args: str, base: Path | None = None, nproc: int | None = None):
    extra = ["--base-config", str(base)] if base else []
    return run_tool(f"convert.{kind}", "--src", str(src), "--dst", str(dst), *extra, *args, nproc=nproc)


def _in_process(kind: str, src: Path, dst: Path, target: str, base: Path, layout: str | None = None) -> None:
    """The job in this process (fast: no interpreter start), as the entry point runs it."""
    from convert.engine.adapter_job import SPLIT, AdapterJobOptions, run_adapter_job
    from launch.dist import Dist

    opts = AdapterJobOptions(src=str(src), dst=str(dst), layout=SPLIT if kind == "split" else layout,
                             max_shard_bytes=None, show_progress=False, base_config=str(base), target=target)
    assert run_adapter_job(opts, Dist(0, 1)) == 0


# ----------------------------------------------------------------------------- synthetic adapters of every family


def _synthetic_peft(family, path: Path, experts: int = 3, hidden: int = 12, inter: int = 8, layers: int = 2,
                    alpha: int = 6, seed: int = 0) -> tuple[dict[str, torch.Tensor], Path]:
    """A peft target_parameters adapter on every fused expert parameter of `family` (its own fused-tensor shapes),
    with attention q_proj and router LoRA; returns {model-naming per-expert module: delta} and the base config."""
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    deltas: dict[str, torch.Tensor] = {}
    wrappers = lora_tensors(family)
    first = lora_roles(family)[0]
    template = family.per_expert[first]
    disk_container = template[len("{prefix}"): template.index(".experts.")]  # "" or ".block_sparse_moe"
    for layer in range(layers):
        disk = family.per_expert[first].format(prefix=f"model.layers.{layer}", e=0)
        m = template_regex(family.expert_templates[first]).match(family.to_model(disk))
        assert m, (family.name, disk)
        prefix = m["prefix"]
        experts_path = family.experts_path.format(prefix=prefix)
        for i, (parts, _, op) in enumerate(wrappers):
            nest = "base_layer." * (len(wrappers) - 1 - i)
            out, inn = (hidden, inter) if parts == (output_role(family),) else (inter, hidden)
            k = len(parts)
            a = torch.randn((experts * R, inn), generator=g) * 0.1
            b = torch.randn((out * k, R * experts), generator=g) * 0.1
            tensors[f"{PEFT}{experts_path}.{nest}lora_A.weight"] = a
            tensors[f"{PEFT}{experts_path}.{nest}lora_B.weight"] = b
            for e in range(experts):
                d = b.view(out * k, R, experts)[:, :, e] @ a.view(experts, R, inn)[e] * (alpha / R)
                for j, role in enumerate(parts):
                    part = d[j::k] if op == "interleave" else d[j * out:(j + 1) * out]
                    module = family.expert_templates[role][: -len(".weight")].format(prefix=prefix, e=e)
                    deltas[PEFT + module] = part
        # the model's name of the checkpoint's q_proj (minicpm5_moe holds it as q_gate_proj): what peft targets
        attn = PEFT + family.to_model(f"model.layers.{layer}.self_attn.q_proj.weight")[: -len(".weight")]
        router = PEFT + family.to_model(f"model.layers.{layer}{disk_container}.gate.weight")[: -len(".weight")]
        for module, (out, inn) in ((attn, (hidden, hidden)), (router, (experts, hidden))):
            a, b = torch.randn((R, inn), generator=g), torch.randn((out, R), generator=g)
            tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"] = a, b
            deltas[module] = b @ a * (alpha / R)
    config = {"peft_type": "LORA", "r": R, "lora_alpha": alpha, "use_rslora": False, "rank_pattern": {},
              "alpha_pattern": {}, "target_modules": [attn.rsplit(".", 1)[1]], "bias": "none", "task_type": "CAUSAL_LM",
              "target_parameters": sorted({t.template.replace("{prefix}.", "") for t in family.fused[family.default_fused]
                                           if set(t.parts) <= set(lora_roles(family))})}
    write_adapter(path, tensors, config)
    base = {"model_type": family.model_types[0], "hidden_size": hidden, "intermediate_size": inter,
            "moe_intermediate_size": inter, **{k: experts for k in family.num_experts_keys},
            # q_proj's output (hidden) as 2 heads: the size of the zero v_proj pair SGLang's needs_with adds
            "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": hidden // 2}
    (path.parent / f"{path.name}-config.json").write_text(json.dumps(base))
    return deltas, path.parent / f"{path.name}-config.json"


def _per_expert_deltas(tensors: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """module -> B @ A * scale of every LoRA pair of a per-expert output."""
    out = {}
    for name, a in tensors.items():
        if name.endswith(".lora_A.weight"):
            module = name[: -len(".lora_A.weight")]
            out[module] = tensors[module + ".lora_B.weight"].float() @ a.float() * scale
    return out


@pytest.mark.parametrize("family_name", _families())
def test_every_family_splits_and_fuses_back_for_each_target(tmp_path, family_name):
    """For each family: a synthetic peft adapter on its own fused tensors, split --target per-expert and vllm (keys
    under the target's naming, routers and attention included; each expert's delta equal to the fused adapter's),
    and fused back to the original bytes."""
    family = load_families()[family_name]
    src = tmp_path / "src"
    deltas, base = _synthetic_peft(family, src)
    source, _ = read_adapter(src)
    for target in ("per-expert", "vllm"):
        rules = _rules(target, family.name)
        dst = tmp_path / target
        _in_process("split", src, dst, target, base)
        out, config = read_adapter(dst)
        if rules.expert_layout == "peft":
            want = {_named(family, k, rules.naming): v for k, v in source.items()}
            assert set(out) == set(want)
            assert all(raw_bytes(out[k]) == raw_bytes(v) for k, v in want.items())
            continue
        got = _per_expert_deltas(out, config["lora_alpha"] / config["r"])
        want = {_named(family, k, rules.naming): v for k, v in deltas.items()}
        assert set(got) == set(want), sorted(set(got) ^ set(want))[:4]
        for k, v in want.items():
            torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")
        assert "target_parameters" not in config
        back = tmp_path / f"{target}-back"
        _in_process("fuse", dst, back, "peft", base, layout="peft")
        fused, back_config = read_adapter(back)
        assert set(fused) == set(source), sorted(set(fused) ^ set(source))[:4]
        assert all(raw_bytes(fused[k]) == raw_bytes(v) for k, v in source.items())
        experts_params = [t for t in back_config["target_parameters"] if ".experts." in f".{t}"]
        assert sorted(experts_params) == sorted(t for t in json.loads((src / "adapter_config.json").read_text())
                                                ["target_parameters"])


# ----------------------------------------------------------------------------- real peft adapters

REAL = ["qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3"]


def _build(model_type: str, seed: int) -> torch.nn.Module:
    if model_type == "deepseek_v3":
        import tiny_models

        return tiny_models.build("deepseek_v3", seed=seed)
    return build_model(model_type, seed=seed)


def _router_param(model: torch.nn.Module) -> str:
    """`mlp.gate.weight` or `mlp.router.weight`: the router's weight (a 2-D parameter, not a Linear)."""
    for name, p in model.named_parameters():
        m = re.search(r"\.layers\.\d+\.(mlp\.(gate|router)\.weight)$", name)
        if m and p.dim() == 2:
            return m[1]
    raise AssertionError("no router")


def _peft_adapter(model_type: str, path: Path, seed: int, params: tuple[str, ...] = ("gate_up_proj", "down_proj"),
                  router: bool = True, **lora: Any) -> Any:
    """A real peft adapter: target_parameters on the fused experts (`params`) and the router, o_proj LoRA."""
    from peft import LoraConfig, get_peft_model

    model = _build(model_type, seed)
    targets = [f"mlp.experts.{p}" for p in params] + ([_router_param(model)] if router else [])
    torch.manual_seed(seed + 100)
    peft_model = get_peft_model(model, LoraConfig(r=3, lora_alpha=7, target_modules=["o_proj"], target_parameters=targets,
                                                  init_lora_weights=False, **lora)).eval()
    peft_model.save_pretrained(str(path))
    config = dict(peft_model.base_model.model.config.to_dict())
    (path.parent / f"{path.name}-config.json").write_text(json.dumps(config))
    return peft_model


def _served_scaling(config: dict[str, Any], rules, module: str, expert: bool) -> float:
    """The scaling a target applies to `module`: rank/alpha patterns only where it honours them, rsLoRA on experts
    only where it applies it."""
    from peft.utils.other import get_pattern_key

    r, alpha = config["r"], config["lora_alpha"]
    if rules.rank_pattern and config.get("rank_pattern"):
        r = config["rank_pattern"].get(get_pattern_key(config["rank_pattern"].keys(), module), r)
    if rules.alpha_pattern and config.get("alpha_pattern"):
        alpha = config["alpha_pattern"].get(get_pattern_key(config["alpha_pattern"].keys(), module), alpha)
    rslora = config.get("use_rslora") and (not expert or rules.rslora_experts)
    return alpha / math.sqrt(r) if rslora else alpha / r


def _load_in_peft(model_type: str, seed: int, path: Path, tmp: Path) -> Any:
    """PeftModel.from_pretrained of a peft-layout output; a copy without `experts` in target_modules (a target may
    want the MoE module named there; peft cannot wrap it as a module, it wraps its parameters)."""
    import shutil

    from peft import PeftModel

    copy = tmp / f"{path.name}-for-peft"
    shutil.copytree(path, copy)
    cfg = json.loads((copy / "adapter_config.json").read_text())
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = [t for t in cfg["target_modules"] if t != "experts"] or None
    (copy / "adapter_config.json").write_text(json.dumps(cfg))
    return PeftModel.from_pretrained(_build(model_type, seed), str(copy)).eval()


def _peft_deltas(peft_model: Any, family, naming: str) -> dict[str, torch.Tensor]:
    """Output module (under `naming`) -> delta, from peft's own get_delta_weight: every expert of every role (cut
    as the family's fused tensor holds them), the router, and o_proj."""
    layout = {t.leaf: t for t in family.fused[family.default_fused]}
    out: dict[str, torch.Tensor] = {}
    for name, module in peft_model.named_modules():
        param = getattr(module, "parameter_name", None)
        path = name.replace(".base_layer", "")
        if param is None:
            if hasattr(module, "lora_A") and name.endswith("o_proj"):
                with torch.no_grad():
                    out[_named(family, path, naming)] = module.get_delta_weight("default").float()
            continue
        with torch.no_grad():
            delta = module.get_delta_weight("default").float()
        if param == "weight":  # the router
            out[_named(family, path, naming)] = delta
            continue
        t = layout[param]
        if t.transpose:
            delta = delta.transpose(1, 2)
        k = len(t.parts)
        pieces = [delta[:, j::k] for j in range(k)] if t.op == "interleave" else list(delta.chunk(k, dim=1))
        prefix = path[len(PEFT): path.rindex(".experts")].rsplit("." + family.container, 1)[0]
        for role, piece in zip(t.parts, pieces):
            for e in range(piece.shape[0]):
                module_name = family.expert_templates[role][: -len(".weight")].format(prefix=prefix, e=e)
                out[_named(family, PEFT + module_name, naming)] = piece[e]
    return out


def _family(model_type: str):
    return next(f for f in load_families().values() if model_type in f.model_types)


@pytest.mark.parametrize("model_type", REAL)
def test_real_peft_adapter_for_vllm_has_peft_deltas_under_the_servers_names(tmp_path, model_type):
    """Real peft adapters (experts, router, o_proj) split --target vllm: every expert's delta as the server would
    scale it equals peft's get_delta_weight, router and attention LoRA under the server's names (Mixtral's router
    next to its experts under block_sparse_moe); where vLLM loads the peft layout, peft loads the output exactly."""
    family = _family(model_type)
    rules = _rules("vllm", family.name)
    src, dst = tmp_path / "src", tmp_path / "vllm"
    peft_model = _peft_adapter(model_type, src, seed=3)
    _run("split_adapter", src, dst, "--target", "vllm", nproc=2)
    out, config = read_adapter(dst)
    record = json.loads((dst / ".moe-convert" / "output.json").read_text())
    assert record["target"] == "vllm"
    if rules.expert_layout == "peft":
        loaded = _load_in_peft(model_type, 3, dst, tmp_path)
        got, want = _peft_deltas(loaded, family, "model"), _peft_deltas(peft_model, family, "model")
        assert set(got) == set(want)
        for k in want:
            assert torch.equal(got[k], want[k]), k
        return
    want = _peft_deltas(peft_model, family, rules.naming)
    modules = {k[: -len(".lora_A.weight")] for k in out if k.endswith(".lora_A.weight")}
    zero = {m for m in modules - set(want)}
    assert not zero, sorted(zero)[:3]  # every role targeted: no zero pair
    assert modules == set(want), sorted(set(want) ^ modules)[:4]
    for m, delta in want.items():
        expert = ".experts." in m
        got = out[m + ".lora_B.weight"].float() @ out[m + ".lora_A.weight"].float()
        got = got * _served_scaling(config, rules, m[len(PEFT):], expert)
        torch.testing.assert_close(got, delta, rtol=1e-5, atol=1e-6, msg=lambda s, m=m: f"{m}: {s}")
    if model_type == "mixtral":
        assert any(".block_sparse_moe.gate.lora_A" in k for k in out) and not any(".mlp." in k for k in out)
    if rules.target_modules_experts == "experts":
        assert "experts" in config["target_modules"]
    router_leaf = _named(family, PEFT + "model.layers.1." + _router_param(_build(model_type, 3))[: -len(".weight")],
                         rules.naming).rsplit(".", 1)[-1]
    assert router_leaf in config["target_modules"] and "o_proj" in config["target_modules"]


@pytest.mark.parametrize("only", ["gate_up_proj", "down_proj"])
@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_missing_projections_become_exact_zero_pairs(tmp_path, model_type, only):
    """A gate_up-only and a down-only peft adapter, split for every server target: where the target needs every
    projection of every expert (all_roles), the missing ones are zero pairs of the layer's rank (delta exactly 0),
    in the adapter's dtype; the present ones keep peft's deltas. In the peft layout (gpt-oss on vLLM) the missing
    parameter gets a zero wrapper and peft itself loads the output with the same deltas."""
    family = _family(model_type)
    src = tmp_path / "src"
    peft_model = _peft_adapter(model_type, src, seed=5, params=(only,), router=False)
    want_model = _peft_deltas(peft_model, family, "model")
    exercised = False
    for target in ("vllm", "sglang"):
        rules = _rules(target, family.name)
        dst = tmp_path / target
        _run("split_adapter", src, dst, "--target", target, base=src.parent / "src-config.json")
        out, config = read_adapter(dst)
        if rules.expert_layout == "peft":
            loaded = _load_in_peft(model_type, 5, dst, tmp_path)
            wrappers = {getattr(m, "parameter_name", None) for _, m in loaded.named_modules()}
            got = _peft_deltas(loaded, family, "model")
            for k, v in want_model.items():
                assert torch.equal(got[k], v), k
            extra = set(got) - set(want_model)
            if rules.all_roles:
                exercised = True
                assert {"gate_up_proj", "down_proj"} <= wrappers
                assert extra and all(not got[k].any() for k in extra)
            else:
                assert not extra
            continue
        want = _peft_deltas(peft_model, family, rules.naming)
        modules = {k[: -len(".lora_A.weight")] for k in out if k.endswith(".lora_A.weight") and ".experts." in k}
        zero = modules - set(want)
        if not rules.all_roles:
            assert not zero
            continue
        exercised = True
        roles = {m.rsplit(".", 1)[-1] for m in zero}
        present = {m.rsplit(".", 1)[-1] for m in want if ".experts." in m}
        assert roles and not roles & present
        layers = {m.split(".experts.")[0] for m in want if ".experts." in m}
        for layer in layers:  # every expert of the layer has every projection
            for e in range(peft_model.base_model.model.config.num_local_experts if model_type == "gpt_oss"
                           else peft_model.base_model.model.config.num_experts):
                have = {m.rsplit(".", 1)[-1] for m in modules if m.startswith(f"{layer}.experts.{e}.")}
                assert have == roles | present, (layer, e, have)
        rank = 3 if rules.zero_rank == "layer" else int(rules.zero_rank)
        for m in zero:
            a, b = out[m + ".lora_A.weight"], out[m + ".lora_B.weight"]
            assert a.shape[0] == rank and b.shape[1] == rank and a.dtype == b.dtype == torch.float32
            assert not a.any() and not b.any()
        for m, delta in want.items():
            got = out[m + ".lora_B.weight"] @ out[m + ".lora_A.weight"]
            got = got * _served_scaling(config, rules, m[len(PEFT):], ".experts." in m)
            torch.testing.assert_close(got, delta, rtol=1e-5, atol=1e-6)
    assert exercised or not any(_rules(t, family.name).all_roles for t in ("vllm", "sglang"))


@pytest.mark.parametrize("layout", ["shared_w123", "grouped"])
def test_synthetic_shared_and_grouped_adapters_for_each_server_target(tmp_path, layout):
    """Synthetic shared-w1/w2/w3 and NeMo grouped adapters (Qwen3-MoE base) split for vllm and sglang: every
    expert's delta, attention LoRA unchanged, adapter_config.json as the target needs it."""
    from adapter_fixtures import base_config, make_grouped_adapter, make_shared_w123_adapter

    src = tmp_path / "src"
    if layout == "shared_w123":
        _, deltas = make_shared_w123_adapter(src, experts=6, rank=4)
    else:
        _, deltas = make_grouped_adapter(src, experts=6, rank=4)
    base = tmp_path / "config.json"
    base.write_text(json.dumps(base_config("qwen3_moe", experts=6)))
    source, src_config = read_adapter(src)
    for target in ("vllm", "sglang"):
        rules = _rules(target, "qwen3_moe")
        _in_process("split", src, tmp_path / target, target, base)
        out, config = read_adapter(tmp_path / target)
        assert rules.expert_layout == "per_expert"  # Qwen3-MoE is served per expert
        scale = _served_scaling(config, rules, "x", True)
        for (layer, role, e), delta in deltas.items():
            m = f"{PEFT}model.layers.{layer}.mlp.experts.{e}.{role}_proj"
            got = out[m + ".lora_B.weight"] @ out[m + ".lora_A.weight"] * scale
            torch.testing.assert_close(got, delta, rtol=1e-5, atol=1e-6)
        attention = {k for k in source if "self_attn" in k}
        assert attention and all(torch.equal(out[k], source[k]) for k in attention)
        if isinstance(src_config.get("target_modules"), list):
            assert ("experts" in config["target_modules"]) == (rules.target_modules_experts == "experts")
        assert "target_parameters" not in config


# ----------------------------------------------------------------------------- scaling the target cannot express


def _patched_rules(monkeypatch, **changes: Any) -> None:
    """Make target `vllm` say `changes` (in this process only)."""
    import dataclasses

    from convert.targets import rules as target_files

    real = target_files.load_target

    def patched(name, *a):
        t = real(name, *a)
        if name != "vllm":
            return t
        spec = dataclasses.replace(t.spec, rules=dataclasses.replace(t.spec.rules, **changes), families={})
        return target_files.Target(spec)

    monkeypatch.setattr(target_files, "load_target", patched)


def test_scaling_the_target_ignores_is_kept_by_rescaling_lora_b(tmp_path, monkeypatch):
    """rank_pattern/alpha_pattern and rsLoRA on experts that a target ignores: adapter_config.json has no patterns,
    and every module's lora_B is multiplied by s/s' so that the target's scaling gives peft's delta."""
    _patched_rules(monkeypatch, rank_pattern=False, alpha_pattern=False, rslora_experts=False, all_roles=False)
    from convert.targets import rules as target_files

    family = _family("qwen3_moe")
    rules = target_files.load_target("vllm").for_family("qwen3_moe")  # the patched rules
    assert not (rules.rank_pattern or rules.alpha_pattern or rules.rslora_experts)
    src, dst = tmp_path / "src", tmp_path / "dst"
    peft_model = _peft_adapter("qwen3_moe", src, seed=6, use_rslora=True, rank_pattern={"down_proj": 2},
                               alpha_pattern={"gate_up_proj": 5, "o_proj": 4})
    _in_process("split", src, dst, "vllm", src.parent / "src-config.json")
    out, config = read_adapter(dst)
    assert not config["rank_pattern"] and not config["alpha_pattern"] and config["use_rslora"]
    want = _peft_deltas(peft_model, family, rules.naming)
    for m, delta in want.items():
        got = out[m + ".lora_B.weight"] @ out[m + ".lora_A.weight"]
        got = got * _served_scaling(config, rules, m[len(PEFT):], ".experts." in m)
        torch.testing.assert_close(got, delta, rtol=1e-5, atol=1e-6, msg=lambda s, m=m: f"{m}: {s}")
    # the same adapter kept to the letter by a target that honours everything: no factor touched
    dst2 = tmp_path / "per-expert"
    _in_process("split", src, dst2, "per-expert", src.parent / "src-config.json")
    plain, _ = read_adapter(dst2)
    rescaled = [k for k in plain if k.endswith("lora_B.weight") and not torch.equal(plain[k], out[k])]
    assert rescaled and all(torch.equal(plain[k], out[k]) for k in plain if k.endswith("lora_A.weight"))


# ----------------------------------------------------------------------------- files, flags, record


def test_one_file_by_default_sharded_only_when_asked_with_a_warning(tmp_path):
    src = tmp_path / "src"
    _peft_adapter("qwen3_moe", src, seed=8)
    one = _run("split_adapter", src, tmp_path / "one")
    assert [p.name for p in (tmp_path / "one").glob("adapter_model*")] == ["adapter_model.safetensors"]
    assert "warning" not in one.stderr
    sharded = _run("split_adapter", src, tmp_path / "sharded", "--max-shard-size", "8KB")
    files = sorted(p.name for p in (tmp_path / "sharded").glob("adapter_model*"))
    assert "adapter_model.safetensors.index.json" in files and len(files) > 2
    if not _rules("vllm", "qwen3_moe").sharded:
        assert sharded.stderr.count("warning:") == 1 and "cannot read a sharded adapter" in sharded.stderr
    quiet = _run("split_adapter", src, tmp_path / "pe", "--max-shard-size", "8KB", "--target", "per-expert")
    assert ("warning" in quiet.stderr) == (not _rules("per-expert", "qwen3_moe").sharded)
    one_t, _ = read_adapter(tmp_path / "one")
    with safe_open(str(tmp_path / "sharded" / files[0]), "pt") as f:
        assert all(torch.equal(f.get_tensor(k), one_t[k]) for k in f.keys())


def test_fuse_adapter_target_is_a_layout_the_target_loads(tmp_path):
    """fuse_adapter --target vllm writes the peft layout only where vLLM loads it (refused otherwise, pointing to
    split_adapter); the default target is peft."""
    src = tmp_path / "src"
    _peft_adapter("qwen3_moe", src, seed=9, router=False)
    _run("split_adapter", src, tmp_path / "pe", "--target", "per-expert")
    proc = run_tool("convert.fuse_adapter", "--src", str(tmp_path / "pe"), "--dst", str(tmp_path / "x"), "--layout",
                    "peft", "--target", "vllm", check=False)
    if _rules("vllm", "qwen3_moe").expert_layout == "peft":
        assert proc.returncode == 0
    else:
        assert proc.returncode == 2 and "split_adapter --target vllm" in proc.stderr
        assert not (tmp_path / "x" / "adapter_config.json").exists()
    _run("fuse_adapter", tmp_path / "pe", tmp_path / "peft", "--layout", "peft")
    assert json.loads((tmp_path / "peft" / ".moe-convert" / "output.json").read_text())["target"] == "peft"
    before, _ = read_adapter(src)
    after, _ = read_adapter(tmp_path / "peft")
    assert set(after) == set(before) and all(raw_bytes(after[k]) == raw_bytes(before[k]) for k in before)


# ----------------------------------------------------------------------------- a 7 GB adapter


@pytest.mark.slow
def test_seven_gb_adapter_is_written_as_one_file(tmp_path):
    """A Qwen3-30B-A3B-shaped per-expert adapter (48 layers x 128 experts x gate/up/down, H 2048, I 768, rank 68,
    bf16: 7.06 GB; a sparse source, no disk cost to create) split --target vllm with two ranks: one
    adapter_model.safetensors with every tensor in its header, no index; peak RSS per rank bounded."""
    from convert.formats.safetensors import build_header

    layers, experts, hidden, inter, rank = 48, 128, 2048, 768, 68
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    entries = []
    for layer in range(layers):
        for e in range(experts):
            base = f"{PEFT}model.layers.{layer}.mlp.experts.{e}"
            for proj, (out, inn) in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)),
                                     ("down_proj", (hidden, inter))):
                entries += [(f"{base}.{proj}.lora_A.weight", "BF16", (rank, inn)),
                            (f"{base}.{proj}.lora_B.weight", "BF16", (out, rank))]
    header, _, total = build_header(entries, {"format": "pt"})
    with open(src / "adapter_model.safetensors", "wb") as f:  # the header, then zeros as a hole: a streaming writer
        f.write(header)
        f.truncate(total)
    (src / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["gate_proj", "up_proj", "down_proj"],
         "bias": "none", "task_type": "CAUSAL_LM"}))
    base = tmp_path / "config.json"
    base.write_text(json.dumps({"model_type": "qwen3_moe", "hidden_size": hidden, "moe_intermediate_size": inter,
                                "num_experts": experts, "num_hidden_layers": layers}))
    stats = tmp_path / "stats.json"
    _run("split_adapter", src, dst, "--target", "vllm", "--stats", str(stats), base=base, nproc=2)
    weights = sorted(p.name for p in dst.iterdir() if p.name.startswith("adapter_model"))
    assert weights == ["adapter_model.safetensors"]
    path = dst / "adapter_model.safetensors"
    data_bytes = total - len(header)
    assert data_bytes > 7_000_000_000 and path.stat().st_size >= data_bytes
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        doc = json.loads(f.read(n))
    doc.pop("__metadata__", None)
    assert len(doc) == len(entries) == layers * experts * 6
    spans = sorted(tuple(v["data_offsets"]) for v in doc.values())
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:])) and spans[-1][1] == data_bytes
    assert path.stat().st_size == 8 + n + data_bytes
    for name, dtype, shape in entries[:6] + entries[-6:]:
        assert doc[name]["dtype"] == dtype and tuple(doc[name]["shape"]) == shape, name
    ranks = json.loads(stats.read_text())["ranks"]
    peak = [r["peak_rss_bytes"] for r in ranks]
    print(f"\n7 GB adapter: {data_bytes / 1e9:.2f} GB in one file; peak RSS per rank {[p >> 20 for p in peak]} MiB; "
          f"{json.loads(stats.read_text()).get('seconds', [r.get('seconds') for r in ranks])} s")
    assert max(peak) < 1 << 30, "peak RSS per rank above 1 GiB"
    path.unlink()
