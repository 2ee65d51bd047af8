"""Independent emulations of how vLLM and SGLang load a LoRA adapter directory, step by step as
their source does it, to test adapters against (no server is installed; nothing is downloaded).

Read from the released wheels (pip download --no-deps): vllm 0.33.0 and sglang 0.5.23. Each step
names the file and function it follows; the error messages and exception types are the
servers' own. The emulation returns what the server would apply: per module the delta B @ A
with the scaling the server uses, and per MoE layer and expert the gate (w1), up (w3) and down
(w2) deltas it assembles, plus the LoRA modules it accepted but never applies (silently dropped).
This module does not use convert.targets: it is the reference check.py is tested against.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import safe_open

Delta = torch.Tensor


@dataclass
class Loaded:
    """What a server applies: `linear` {server module (or packed sub-module): delta}, `experts`
    {(layer, expert): {"gate"|"up"|"down": delta}}, `dropped`: LoRA modules loaded but never applied."""

    linear: dict[str, Delta] = field(default_factory=dict)
    experts: dict[tuple[int, int], dict[str, Delta]] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# vLLM 0.33.0
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VllmModel:
    """What a vLLM model class contributes to LoRA loading (vllm/model_executor/models/<file>.py).

    `moe`: the MoE block's attribute in a decoder layer; `ckpt_names`: the FusedMoE checkpoint names
    (gate, down, up) that get_expert_mapping expands to experts.{e}.<name> (routed_experts.py
    build_expert_params_mapping, order w1, w2, w3); `is_3d`: SupportsLoRA.is_3d_moe_weight;
    `attn`: the attention module's attribute; `linear`: vLLM leaf -> the checkpoint names packed
    into it (packed_modules_mapping; a leaf packing nothing maps to [itself]); `router`: the
    router's leaf under `moe`; `rename`: hf_to_vllm_mapper.get_rename_mapper() substring renames;
    `interleaved_w13`: gate/up rows of w13 interleaved (gpt-oss swigluoai)."""

    arch: str
    layers: int
    num_experts: int
    moe: str = "mlp"
    ckpt_names: tuple[str, str, str] = ("gate_proj", "down_proj", "up_proj")
    is_3d: bool = False
    attn: str = "self_attn"
    linear: tuple[tuple[str, tuple[str, ...]], ...] = (("qkv_proj", ("q_proj", "k_proj", "v_proj")), ("o_proj", ("o_proj",)))
    router: str = "gate"
    rename: tuple[tuple[str, str], ...] = ()
    interleaved_w13: bool = False
    extra_mlp: tuple[tuple[str, tuple[str, ...]], ...] = ()  # e.g. deepseek shared_experts.gate_up_proj


def vllm_models(layers: int, experts: int) -> dict[str, VllmModel]:
    """The vLLM 0.33.0 models of the tests' families, from their model files."""
    return {
        # qwen3_moe.py: Qwen3MoeSparseMoeBlock at .mlp (gate = GateLinear, experts = FusedMoEFactory with the
        # default ckpt names); Qwen3MoeForCausalLM.packed_modules_mapping = {"qkv_proj": [q, k, v]}.
        "qwen3_moe": VllmModel("Qwen3MoeForCausalLM", layers, experts),
        # mixtral.py: MixtralMoE at .block_sparse_moe, ckpt_names=("w1", "w2", "w3"); hf_to_vllm_mapper
        # orig_to_new_substr maps .gate_proj./.up_proj./.down_proj. to .w1./.w3./.w2.
        "mixtral": VllmModel("MixtralForCausalLM", layers, experts, moe="block_sparse_moe", ckpt_names=("w1", "w2", "w3"),
                             rename=((".gate_proj.", ".w1."), (".up_proj.", ".w3."), (".down_proj.", ".w2."))),
        # gpt_oss.py: GptOssForCausalLM.is_3d_moe_weight = True; attention at .attn (mapper .self_attn. -> .attn.),
        # router at .mlp.router (GateLinear), get_expert_mapping with ckpt names w1/w2/w3.
        "gpt_oss": VllmModel("GptOssForCausalLM", layers, experts, ckpt_names=("w1", "w2", "w3"), is_3d=True, attn="attn",
                             router="router", rename=((".self_attn.", ".attn."),), interleaved_w13=True),
        # deepseek_v2.py (DeepseekV3ForCausalLM): MLA attention (fused_qkv_a_proj packs q_a_proj and
        # kv_a_proj_with_mqa when q_lora_rank is set), shared_experts.gate_up_proj packs gate/up.
        "deepseek_v3": VllmModel(
            "DeepseekV3ForCausalLM", layers, experts,
            linear=(("fused_qkv_a_proj", ("q_a_proj", "kv_a_proj_with_mqa")), ("q_b_proj", ("q_b_proj",)),
                    ("kv_b_proj", ("kv_b_proj",)), ("o_proj", ("o_proj",))),
            extra_mlp=(("shared_experts.gate_up_proj", ("gate_proj", "up_proj")), ("shared_experts.down_proj", ("down_proj",)))),
    }


def _peft_helper(cfg: dict[str, Any], max_lora_rank: int) -> dict[str, Any]:
    """vllm/lora/peft_helper.py: PEFTHelper.from_dict, __post_init__ and validate_legal (0.33.0)."""
    missing = {"r", "lora_alpha", "target_modules"} - set(cfg)
    if missing:
        raise ValueError(f"Missing required configuration fields: {missing}")
    r = cfg["r"]
    if r <= 0:
        raise ValueError(f"LoRA rank `r` must be a positive integer, got {r}.")
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    for key, rank in rank_pattern.items():
        if not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"LoRA rank for `{key}` in `rank_pattern` must be a positive integer, got {rank}.")
    errors = []
    mts = cfg.get("modules_to_save")
    if mts:
        bad = [m for m in mts if m not in ["classifier", "score"]]
        if bad:
            errors.append('vLLM only supports modules_to_save being either None or ["classifier", "score"] for '
                          f"classification models. Unsupported modules_to_save: {bad}")
    if cfg.get("use_dora"):
        errors.append("vLLM does not yet support DoRA.")
    if cfg.get("lora_bias"):
        errors.append("vLLM does not support LoRA bias (lora_bias).")
    max_rank = max([r, *rank_pattern.values()])
    if max_rank > max_lora_rank:
        errors.append(f"LoRA rank {max_rank} is greater than max_lora_rank {max_lora_rank}.")
    if cfg.get("bias", "none") != "none":
        errors.append("Adapter bias is not supported.")
    if errors:
        raise ValueError(" ".join(errors))
    return {"r": r, "alpha": cfg["lora_alpha"], "rslora": bool(cfg.get("use_rslora")), "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern, "modules_to_save": mts or []}


def _vllm_rank_and_scaling(h: dict[str, Any], module: str) -> tuple[int, float]:
    """PEFTHelper.get_rank_and_scaling: patterns as peft's get_pattern_key; experts.base_layer -> gate_up_proj."""
    def scale(rank: int, alpha: float) -> float:
        return alpha / math.sqrt(rank) if h["rslora"] else alpha / rank

    if not h["rank_pattern"] and not h["alpha_pattern"]:
        return h["r"], scale(h["r"], h["alpha"])
    if module.endswith(".experts.base_layer"):
        module = module.removesuffix(".base_layer") + ".gate_up_proj"
    elif module.endswith(".experts"):
        module += ".down_proj"

    def match(pattern: dict[str, Any]) -> Any:
        for key, value in pattern.items():
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        return None

    rank = match(h["rank_pattern"]) or h["r"]
    alpha = match(h["alpha_pattern"])
    return rank, scale(rank, h["alpha"] if alpha is None else alpha)


def _vllm_parse(name: str, rename: tuple[tuple[str, str], ...]) -> tuple[str, bool]:
    """vllm/lora/utils.py parse_fine_tuned_lora_name (0.33.0), with the model's rename mapper."""
    prefixed = name.startswith("base_model.model.")
    if prefixed:
        name = name.replace("base_model.model.", "")
    for old, new in rename:  # WeightsMapper._map_name_with_shard: orig_to_new_substr, first occurrence
        if old in name:
            name = name.replace(old, new, 1)
    if prefixed:
        name = "base_model.model." + name
    start = 2 if name.startswith("base_model.model.") else 0
    parts = name.split(".")
    if (parts[-1] == "weight" or parts[-1] == "bias") and len(parts) >= 2:
        if parts[-2] in ["lora_A", "lora_B"] and parts[-1] == "weight":
            return ".".join(parts[start:-2]), parts[-2] == "lora_A"
        if parts[-2] in ["score", "classifier"]:
            return parts[-2], False
    if parts[-1] in ("lora_embedding_A", "lora_embedding_B"):
        return ".".join(parts[start:-1]), parts[-1] == "lora_embedding_A"
    raise ValueError(f"{name} is unsupported LoRA weight")


def _read_dir_tensors(path: str) -> dict[str, torch.Tensor]:
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k).float() for k in f.keys()}


def _vllm_expected(model: VllmModel) -> set[str]:
    """utils.get_supported_lora_modules + process_packed_modules_mapping; worker_manager expected modules."""
    packed: dict[str, list[str]] = {leaf: list(subs) for leaf, subs in model.linear if subs != (leaf,)}
    supported = {leaf for leaf, _ in model.linear} | {model.router, "experts", "embed_tokens", "lm_head"}
    supported |= {leaf.rsplit(".", 1)[-1] for leaf, _ in model.extra_mlp}
    for leaf, subs in model.extra_mlp:
        if len(subs) > 1:
            packed[leaf.rsplit(".", 1)[-1]] = list(subs)
    gate_name, down_name, up_name = model.ckpt_names
    if not model.is_3d:
        packed["experts"] = [f"experts.{e}.{n}" for e in range(model.num_experts) for n in (gate_name, down_name, up_name)]
    expected: set[str] = set()
    for module in supported:
        expected.update(packed.get(module, [module]))
        if module == "experts":
            expected.add(module)
    return expected


def _vllm_check_unexpected(adapter_dir: str, tensors: dict[str, torch.Tensor], model: VllmModel, expected: set[str],
                           modules_to_save: Any) -> None:
    """lora_model.check_unexpected_modules: every LoRA module of the adapter is an expected one."""
    unexpected = []
    for key in tensors:
        if key.endswith((".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight")) or "base_layer" in key:
            continue
        module, _ = _vllm_parse(key, model.rename)
        base_name = module.rsplit(".", 1)[-1]
        if ".experts" in module:
            if module[module.find(".experts") + 1:] not in expected:
                unexpected.append(module)
        elif base_name not in expected and base_name not in modules_to_save:
            unexpected.append(module)
    if unexpected:
        raise ValueError(f"While loading {adapter_dir}, expected target modules in {expected} but received "
                         f"{unexpected}. Please verify that the loaded LoRA module is correct")


def _vllm_loras(tensors: dict[str, torch.Tensor], model: VllmModel, h: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """lora_model.from_lora_tensors: per module, its rank, scaling and "a"/"b" tensors."""
    loras: dict[str, dict[str, Any]] = {}
    for key, t in tensors.items():
        if key.endswith((".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight")):
            continue
        module, is_a = _vllm_parse(key, model.rename)
        if module in h["modules_to_save"]:
            continue
        if module not in loras:
            peft_module, _ = _vllm_parse(key, ())
            rank, s = _vllm_rank_and_scaling(h, peft_module)
            loras[module] = {"rank": rank, "scaling": s}
        loras[module]["a" if is_a else "b"] = t
    return loras


def vllm_load(adapter_dir: str, model: VllmModel, max_lora_rank: int = 16) -> Loaded:
    """Load `adapter_dir` as vLLM 0.33.0 would into `model` (default engine flags but --max-lora-rank).

    worker_manager.WorkerLoRAManager._load_adapter -> PEFTHelper.from_local_dir/validate_legal ->
    LoRAModel.from_local_checkpoint (check_unexpected_modules, from_lora_tensors) ->
    model_manager._validate_moe_lora_format -> LoRAModelManager._create_merged_loras_inplace
    (pack / pack_moe, optimize, _stack_moe_lora_weights) -> activate_adapter (set_lora per module).
    Raises what the server raises (ValueError, AssertionError)."""
    cfg = json.loads(open(os.path.join(adapter_dir, "adapter_config.json")).read())
    h = _peft_helper(cfg, max_lora_rank)
    expected = _vllm_expected(model)
    # lora_model.from_local_checkpoint: adapter_model.safetensors, else .bin/.pt, else refused
    st = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.isfile(st):
        raise ValueError(f"{adapter_dir} doesn't contain tensors")
    tensors = _read_dir_tensors(st)
    _vllm_check_unexpected(adapter_dir, tensors, model, expected, h["modules_to_save"])
    loras = _vllm_loras(tensors, model, h)
    # model_manager._validate_moe_lora_format: 3-D weights on a 2-D MoE wrapper
    moe_modules = [f"model.layers.{i}.{model.moe}.experts" for i in range(model.layers)]
    if not model.is_3d:
        for name in moe_modules:
            if name in loras and torch.is_tensor(loras[name].get("a")):
                raise ValueError(f"LoRA adapter 1 contains fused 3D MoE weights for {name!r}, but the model uses a 2D "
                                 "MoE LoRA wrapper. Start the engine with enable_mixed_moe_lora_format=True "
                                 "(--enable-mixed-moe-lora-format) and set is_3d_lora_weight=True on the LoRA request.")
    out = Loaded()
    used: set[str] = set()
    # _create_merged_loras_inplace: packed linear modules (pack: scaling folded per slice)
    for i in range(model.layers):
        for leaf, subs in model.linear:
            server = f"model.layers.{i}.{model.attn}.{leaf}"
            for sub in subs:
                name = f"model.layers.{i}.{model.attn}.{sub}"
                if name in loras:
                    lo = loras[name]
                    out.linear[name if len(subs) > 1 or sub != leaf else server] = lo["b"] @ lo["a"] * lo["scaling"]
                    used.add(name)
        for leaf, subs in model.extra_mlp:
            prefix = f"model.layers.{i}.{model.moe}.{leaf.rsplit('.', 1)[0]}" if "." in leaf else f"model.layers.{i}.{model.moe}"
            for sub in subs:
                name = f"{prefix}.{sub}"
                if name in loras:
                    out.linear[name] = loras[name]["b"] @ loras[name]["a"] * loras[name]["scaling"]
                    used.add(name)
        router = f"model.layers.{i}.{model.moe}.{model.router}"
        if router in loras:
            out.linear[router] = loras[router]["b"] @ loras[router]["a"] * loras[router]["scaling"]
            used.add(router)
        moe = moe_modules[i]
        if model.is_3d:
            _vllm_stack_3d(loras, moe, model, i, out, used)
        else:
            _vllm_pack_moe(loras, moe, model, i, out, used)
    for name in ("model.embed_tokens", "lm_head"):
        if name in loras:
            used.add(name)
    out.dropped = sorted(set(loras) - used)
    return out


def _vllm_pack_moe(loras: dict[str, dict[str, Any]], moe: str, model: VllmModel, layer: int, out: Loaded,
                   used: set[str]) -> None:
    """lora_weights.PackedLoRALayerWeights.pack_moe (0.33.0): w1, w2, w3 of every expert, asserted present."""
    gate_name, down_name, up_name = model.ckpt_names
    names = [f"{moe}.{e}.{n}" for e in range(model.num_experts) for n in (gate_name, down_name, up_name)]  # _register_packed_modules
    subs = [loras.get(n) for n in names]
    if not any(subs):
        return
    used.update(n for n in names if n in loras)
    for proj in (subs[0::3], subs[1::3], subs[2::3]):
        experts = [lo for lo in proj if lo is not None]
        if len({lo["a"].shape[0] for lo in experts}) > 1:
            raise ValueError(f"The experts of {moe} have different LoRA ranks for the same projection, which is not supported.")
        if len({lo["scaling"] for lo in experts}) > 1:
            for lo in experts:  # LoRALayerWeights.optimize
                lo["b"], lo["scaling"] = lo["b"] * lo["scaling"], 1
    for e in range(model.num_experts):
        w1, w2, w3 = subs[3 * e: 3 * e + 3]
        assert w1 is not None
        assert w2 is not None
        assert w3 is not None
    scales = [subs[0]["scaling"], subs[1]["scaling"], subs[2]["scaling"]]  # loras[0], loras[1], loras[2]
    for e in range(model.num_experts):
        w1, w2, w3 = subs[3 * e: 3 * e + 3]
        out.experts[(layer, e)] = {"gate": w1["b"] @ w1["a"] * scales[0], "down": w2["b"] @ w2["a"] * scales[1],
                                   "up": w3["b"] @ w3["a"] * scales[2]}


def _vllm_stack_3d(loras: dict[str, dict[str, Any]], moe: str, model: VllmModel, layer: int, out: Loaded,
                   used: set[str]) -> None:
    """model_manager._stack_moe_lora_weights for a 3-D model (0.33.0): experts.base_layer = gate_up,
    experts = down; A reshaped (E, r, in), B reshaped (out, r, E) and permuted to (E, out, r)."""
    down = loras.get(moe)
    if not (down and torch.is_tensor(down.get("a"))):
        if f"{moe}.base_layer" in loras:
            used.add(f"{moe}.base_layer")  # loaded, then never set: activate_adapter finds no LoRA for the module
            out.dropped.append(f"{moe}.base_layer")
        return
    gate_up = loras.get(f"{moe}.base_layer")
    assert gate_up is not None
    assert down is not None
    used.update((moe, f"{moe}.base_layer"))
    n = model.num_experts
    parts = {}
    for key, lo in (("gate_up", gate_up), ("down", down)):
        b = lo["b"] * lo["scaling"]  # optimize() before stacking
        a = lo["a"].reshape(n, -1, lo["a"].shape[-1])
        b = b.reshape(b.shape[0], -1, n).permute(2, 0, 1)
        parts[key] = [b[e] @ a[e] for e in range(n)]
    for e in range(n):
        w13 = parts["gate_up"][e]
        half = w13.shape[0] // 2
        gate, up = (w13[0::2], w13[1::2]) if model.interleaved_w13 else (w13[:half], w13[half:])
        out.experts[(layer, e)] = {"gate": gate, "up": up, "down": parts["down"][e]}


# ---------------------------------------------------------------------------------------------
# SGLang 0.5.23
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SglangModel:
    """What an SGLang model contributes: `leaves` (LoRA-wrappable leaf names of a decoder layer: the
    router's only where it is a ReplicatedLinear), `refused` (leaves whose module no LoRA layer wraps:
    layers.get_lora_layer raises), `apply` (GptOssForCausalLM.should_apply_lora: a regex on module names)."""

    layers: int
    num_experts: int
    leaves: frozenset[str] = frozenset({"qkv_proj", "o_proj", "gate"})
    refused: frozenset[str] = frozenset()
    apply: str | None = None


def sglang_models(layers: int, experts: int) -> dict[str, SglangModel]:
    """The SGLang 0.5.23 models of the tests' families (sglang/srt/models/<file>.py)."""
    return {
        "qwen3_moe": SglangModel(layers, experts),  # qwen3_moe.py: gate = ReplicatedLinear, experts = FusedMoE
        "mixtral": SglangModel(layers, experts),  # mixtral.py: block_sparse_moe.gate = ReplicatedLinear
        # gpt_oss.py: should_apply_lora = self_attn.(qkv_proj|o_proj) | mlp.experts | lm_head | embed_tokens
        "gpt_oss": SglangModel(layers, experts, apply=r"^(?:model\.layers\.\d+\.(?:self_attn\.(?:qkv_proj|o_proj)|mlp\.experts)|lm_head|model\.embed_tokens)$"),
        # deepseek_v2.py: gate = MoEGate (no LoRA layer), MLA projections
        "deepseek_v3": SglangModel(layers, experts, leaves=frozenset({"fused_qkv_a_proj_with_mqa", "q_b_proj", "kv_b_proj", "o_proj"}),
                                   refused=frozenset({"gate"})),
    }


_PARAMS = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
           "up_proj": "gate_up_proj", "embed_tokens": "embed_tokens", "lm_head": "lm_head",
           "q_a_proj": "fused_qkv_a_proj_with_mqa", "kv_a_proj_with_mqa": "fused_qkv_a_proj_with_mqa"}


def _sglang_targets(tm: Any) -> set[str]:
    """utils.get_normalized_target_modules (0.5.23)."""
    if isinstance(tm, str):
        if tm not in ["all", "all-linear"]:
            raise ValueError("Only 'all' or 'all-linear' can be used as the string for target module")
        return {"all"}
    return {_PARAMS.get(n.split(".")[-1], n.split(".")[-1]) for n in tm}


def _target_name(name: str, targets: set[str]) -> str:
    """utils.get_target_module_name: the longest target that is a substring of the name."""
    best = None
    for t in targets:
        if t in name and (best is None or len(t) > len(best)):
            best = t
    if best is None:
        raise ValueError(f"Cannot find target module name for {name} in {targets}")
    return best


def sglang_load(adapter_dir: str, model: SglangModel, max_lora_rank: int | None = None) -> Loaded:
    """Load `adapter_dir` as SGLang 0.5.23 would (no --lora-target-modules: the adapter's target_modules
    size the pool). lora_config.LoRAConfig -> lora_manager.validate_new_adapter -> init_lora_shapes ->
    lora.LoRAAdapter.initialize_weights (every *.safetensors, _process_weight, _normalize_weights) ->
    lora_manager.init_lora_modules / update_lora_info -> mem_pool.load_lora_weight_to_buffer."""
    cfg = json.loads(open(os.path.join(adapter_dir, "adapter_config.json")).read())
    assert cfg["peft_type"].lower() == "lora"
    r, alpha, tm = cfg["r"], cfg["lora_alpha"], cfg["target_modules"]
    if cfg.get("use_dora", False):
        raise ValueError("Failed to load adapter because LoRA serving currently doesn't support DoRA adapters")
    if isinstance(tm, str) and tm not in ("all-linear", "all"):
        raise ValueError(f"SGLang does not recognize target_modules='{tm}'. Please use a list of module name suffixes "
                         "in the adapter's PEFT config, or explicitly specify --lora-target-modules during server startup.")
    targets = _sglang_targets(tm)
    if "all" in targets:  # auto_detect_lora_target_modules: every LoRA-able module of the model
        targets = set(model.leaves) | {"gate_up_proj", "down_proj"}
    if max_lora_rank is not None and r > max_lora_rank:  # mem_pool.can_support
        raise ValueError(f"LoRA adapter with rank {r} is incompatible with the current LoRA memory pool configuration.")
    scaling = alpha / r  # lora.LoRAAdapter.__init__
    layers: list[dict[str, torch.Tensor]] = [{} for _ in range(model.layers)]
    for path in sorted(glob.glob(os.path.join(adapter_dir, "*.safetensors"))):  # loader._prepare_weights
        for name, t in _read_dir_tensors(path).items():
            m = re.search(r"layers\.(\d+)\.", name)  # layers.utils.get_layer_id
            if m:
                layers[int(m.group(1))][name] = t
    for leaf in model.refused & targets:
        raise Exception(f"No corresponding LoRA layer supported for {leaf}.")
    out = Loaded()
    moe_wired = {"gate_up_proj", "down_proj"} <= targets  # lora_manager.update_lora_info
    for i, weights in enumerate(layers):
        slices = _sglang_normalize(weights)
        expert: dict[str, dict[int, dict[str, torch.Tensor]]] = {"gate_up_proj": {}, "down_proj": {}}
        std: dict[str, dict[str, torch.Tensor]] = {}
        for name, t in weights.items():
            target = _target_name(name, targets)  # load_lora_weight_to_buffer (raises on no match)
            em = re.search(r"experts\.(\d+)\.", name)
            ab = "A" if "lora_A" in name else "B"
            if em:
                expert.setdefault(target, {}).setdefault(int(em.group(1)), {})[ab] = t
            else:
                std.setdefault(name.split(".lora_")[0], {})[ab] = t
        for module, ab in std.items():
            leaf = _target_name(module, targets)
            server = module.removeprefix("base_model.model.")
            applied = leaf in model.leaves and (model.apply is None or re.match(model.apply, server))
            parts = slices.get(module, [(server, ab["B"].shape[0])])
            a, b = ab["A"], ab["B"]
            c = len(parts)
            assert a.shape[0] == r * c, f"LoRA buffer shape {(r * c, a.shape[1])} does not match weight shape {tuple(a.shape)}."
            assert b.shape[1] == r, f"LoRA buffer shape {(b.shape[0], r)} does not match weight shape {tuple(b.shape)}."
            if not applied:
                out.dropped.append(module)
                continue
            row = 0
            for k, (sub, rows) in enumerate(parts):  # the kernel's slot k: B's k-th row block against A's k-th r rows
                out.linear[sub] = b[row:row + rows] @ a[k * r:(k + 1) * r] * scaling
                row += rows
        if not expert["gate_up_proj"] and not expert["down_proj"]:
            continue
        if not moe_wired or (model.apply and not re.match(model.apply, f"model.layers.{i}.mlp.experts")):
            out.dropped.append(f"layer {i} experts")
            continue
        for e in range(model.num_experts):
            out.experts[(i, e)] = _sglang_expert_deltas(expert["gate_up_proj"].get(e), expert["down_proj"].get(e), r,
                                                        scaling)
        beyond = [e for part in expert.values() for e in part if e >= model.num_experts]
        if beyond:
            raise IndexError(f"index {beyond[0]} is out of bounds for dimension 1 with size {model.num_experts}")
    return out


def _sglang_expert_deltas(gu: dict[str, torch.Tensor] | None, dn: dict[str, torch.Tensor] | None, r: int,
                          scaling: float) -> dict[str, torch.Tensor]:
    """One expert's deltas from its gate_up_proj and down_proj A/B (mem_pool.load_lora_weight_to_buffer)."""
    deltas: dict[str, torch.Tensor] = {}
    if gu is not None:
        a, b = gu["A"], gu["B"]
        assert a.shape[0] == 2 * r, f"LoRA buffer shape {(r, a.shape[1])} does not match weight shape {(a.shape[0] // 2, a.shape[1])}."
        assert b.shape[1] == r, f"LoRA buffer shape {(b.shape[0], r)} does not match weight shape {tuple(b.shape)}."
        half = b.shape[0] // 2
        deltas["gate"] = b[:half] @ a[:r] * scaling
        deltas["up"] = b[half:] @ a[r:] * scaling
    if dn is not None:
        assert dn["A"].shape[0] == r and dn["B"].shape[1] == r, "LoRA buffer shape does not match weight shape."
        deltas["down"] = dn["B"] @ dn["A"] * scaling
    return deltas


def _sglang_normalize(weights: dict[str, torch.Tensor]) -> dict[str, list[tuple[str, int]]]:
    """lora.LoRAAdapter._normalize_weights (0.5.23): q/k/v -> qkv_proj (k missing: zeros), w1/w3/w2 ->
    gate/up/down, gate + up -> gate_up_proj (up missing: zeros), q_a + kv_a -> fused_qkv_a_proj_with_mqa.
    Returns, per stacked module, its slices (sub-module, rows of B) in order (for the per-slice deltas)."""
    slices: dict[str, list[tuple[str, int]]] = {}

    def stacked(new: str, parts: list[tuple[str, torch.Tensor]]) -> None:
        module = new.split(".lora_")[0]
        if ".lora_B" in new:
            slices[module] = [(p.split(".lora_")[0].removeprefix("base_model.model."), t.shape[-2]) for p, t in parts]

    names = list(weights)
    if any(x in n for n in names for x in ("q_proj", "k_proj", "v_proj")):
        has_k = any("k_proj" in n for n in names)
        for n in names:
            if "q_proj" in n and "qkv_proj" not in n and "q_b_proj" not in n and "q_a_proj" not in n:
                k, v = n.replace("q_proj", "k_proj"), n.replace("q_proj", "v_proj")
                kw = weights[k] if has_k else torch.zeros_like(weights[v])  # KeyError where v_proj has no LoRA
                stacked(n.replace("q_proj", "qkv_proj"), [(n, weights[n]), (k, kw), (v, weights[v])])
                weights[n.replace("q_proj", "qkv_proj")] = torch.cat((weights[n], kw, weights[v]), 0)
                weights.pop(n)
                if has_k:
                    weights.pop(k)
                weights.pop(v)
    for n in list(weights):
        new = n
        for old, rep in ((".w1.", ".gate_proj."), (".w3.", ".up_proj."), (".w2.", ".down_proj.")):
            if old in n:
                new = n.replace(old, rep)
                break
        if new != n:
            weights[new] = weights.pop(n)
    for n in list(weights):
        if "gate_proj" in n and n in weights:
            up = n.replace("gate_proj", "up_proj")
            if up not in weights or weights[up].numel() == 0:
                weights[up] = torch.zeros_like(weights[n])
            stacked(n.replace("gate_proj", "gate_up_proj"), [(n, weights[n]), (up, weights[up])])
            weights[n.replace("gate_proj", "gate_up_proj")] = torch.cat((weights[n], weights[up]), weights[n].dim() - 2)
            weights.pop(n)
            weights.pop(up)
    for n in list(weights):
        if "q_a_proj" in n and "fused_qkv_a_proj_with_mqa" not in n:
            kv = n.replace("q_a_proj", "kv_a_proj_with_mqa")
            kvw = weights[kv] if kv in weights else torch.zeros_like(weights[n])
            stacked(n.replace("q_a_proj", "fused_qkv_a_proj_with_mqa"), [(n, weights[n]), (kv, kvw)])
            weights[n.replace("q_a_proj", "fused_qkv_a_proj_with_mqa")] = torch.cat((weights[n], kvw), 0)
            weights.pop(n)
            weights.pop(kv, None)
    return slices
