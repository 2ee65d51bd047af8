"""Trainer tensor names and layouts as data (configs/namings/*.json): torchtitan, NeMo AutoModel, Megatron.

Each trainer's checkpoint is made from a tiny random transformers model by THE FRAMEWORK'S OWN mapping logic,
transcribed below from the released wheels (the frameworks cannot be imported here: torchtitan 0.3.0 needs
triton and spmd_types, NeMo AutoModel and Megatron-Bridge need Megatron-Core and Transformer Engine). Each
transcription names its file and release. The tool converts both ways; the output must equal what the
framework's to_hf / from_hf gives byte for byte, and an HF output must load in transformers with the
original model's logits.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from convert.errors import ConversionError
from convert.families import family_by_name
from convert.families.namings import NAMINGS_DIR, NamingSpec, Span, _load, naming_names, source_view
from convert.families.schema import parse
from helpers import load_dir, raw_bytes, run_tool
from model_fixtures import logits

H, I, E, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 24, 20, 5, 2, 4, 2, 6


def _qwen3(seed: int = 0) -> torch.nn.Module:
    """A tiny Qwen3-MoE with 2 query groups (Megatron's q/k/v interleave is visible)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, num_experts_per_tok=2, intermediate_size=36,
                         moe_intermediate_size=I, num_experts=E)
    return Qwen3MoeForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path, dict[str, torch.Tensor]]:
    """(model, its save_pretrained directory (per-expert HF names), that checkpoint's tensors)."""
    model = _qwen3()
    path = tmp_path_factory.mktemp("qwen3") / "hf"
    model.save_pretrained(path, max_shard_size="30KB")
    return model, path, load_dir(path)


def _save(tensors: dict[str, torch.Tensor], like: Path, path: Path) -> Path:
    """`tensors` as one safetensors file beside the config of checkpoint `like`."""
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path / "model.safetensors")
    shutil.copy(like / "config.json", path / "config.json")
    return path


def _same_bytes(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert raw_bytes(got[k]) == raw_bytes(want[k]), k


def _hf_logits_match(model: torch.nn.Module, path: Path) -> None:
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(path, attn_implementation=model.config._attn_implementation).eval()
    for p in loaded.parameters():  # as test_base_convert: fresh copies (mmap views at unaligned offsets sum otherwise)
        p.data = p.data.clone()
    assert torch.equal(logits(loaded), logits(model))


# ---- torchtitan 0.3.0 --------------------------------------------------------------------------------------
# torchtitan/models/qwen3/state_dict_adapter.py (torchtitan 0.3.0, PyPI wheel): Qwen3StateDictAdapter.from_hf_map
TITAN_QWEN3_FROM_HF = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.qkv_linear.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.qkv_linear.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.qkv_linear.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.self_attn.q_norm.weight": "layers.{}.attention.q_norm.weight",
    "model.layers.{}.self_attn.k_norm.weight": "layers.{}.attention.k_norm.weight",
    "model.layers.{}.self_attn.rotary_emb.inv_freq": None,
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    "model.layers.{}.mlp.experts.{}.gate_proj.weight": "layers.{}.moe.routed_experts.inner_experts.w1_EFD",
    "model.layers.{}.mlp.experts.{}.up_proj.weight": "layers.{}.moe.routed_experts.inner_experts.w3_EFD",
    "model.layers.{}.mlp.experts.{}.down_proj.weight": "layers.{}.moe.routed_experts.inner_experts.w2_EDF",
    "model.layers.{}.mlp.gate.weight": "layers.{}.moe.router.gate.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def titan_from_hf(hf: dict[str, torch.Tensor], from_hf_map: dict[str, str | None], n_experts: int) -> dict[str, torch.Tensor]:
    """Qwen3StateDictAdapter.from_hf (torchtitan 0.3.0), offline path: MoEStateDictAdapter._concatenate_expert_weights
    (models/utils.py: torch.stack of the experts sorted by id once all n_experts are there)."""
    state_dict: dict[str, torch.Tensor] = {}
    expert_weights_by_layer: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for key, value in hf.items():
        if "mlp.experts" in key:
            abstract_key = re.sub(r"(\d+)", "{}", key, count=2)
            layer_num, expert_num = re.findall(r"\d+", key)
            titan_abstract_key = from_hf_map[abstract_key]
            assert titan_abstract_key is not None
            new_key = titan_abstract_key.format(layer_num)
            expert_weights_by_layer.setdefault(layer_num, {}).setdefault(titan_abstract_key, {})[int(expert_num)] = value
            experts = expert_weights_by_layer[layer_num][titan_abstract_key]
            if len(experts) < n_experts:
                continue
            stacked = torch.stack([experts[i] for i in sorted(experts)], dim=0)
            del expert_weights_by_layer[layer_num][titan_abstract_key]
            state_dict[new_key] = stacked
        elif "layers" in key:
            abstract_key = re.sub(r"(\d+)", "{}", key, count=1)
            layer_num = re.search(r"\d+", key).group(0)  # type: ignore[union-attr]
            new_key = from_hf_map[abstract_key]
            if new_key is None:
                continue
            state_dict[new_key.format(layer_num)] = value
        else:
            new_key = from_hf_map[key]
            if new_key is None:
                continue
            state_dict[new_key] = value
    return state_dict


def titan_to_hf(sd: dict[str, torch.Tensor], from_hf_map: dict[str, str | None], n_experts: int) -> dict[str, torch.Tensor]:
    """Qwen3StateDictAdapter.to_hf (torchtitan 0.3.0), offline path (plain tensors): _split_experts_weights
    (torch.split on dim 0) and `.squeeze()` per expert; keys not in the map (expert_bias_E) are dropped."""
    to_hf_map = {v: k for k, v in from_hf_map.items() if v is not None}
    hf: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if "moe.routed_experts.inner_experts" in key:
            abstract_key = re.sub(r"(\d+)", "{}", key, count=1)
            if abstract_key not in to_hf_map:
                continue
            layer_num = re.search(r"\d+", key).group(0)  # type: ignore[union-attr]
            new_abstract_key = to_hf_map[abstract_key]
            split_values = torch.split(value, value.shape[0] // n_experts, dim=0)
            for expert_num in range(n_experts):
                hf[new_abstract_key.format(layer_num, expert_num)] = split_values[expert_num].squeeze()
        elif "layers" in key:
            abstract_key = re.sub(r"(\d+)", "{}", key, count=1)
            layer_num = re.search(r"\d+", key).group(0)  # type: ignore[union-attr]
            if abstract_key not in to_hf_map:
                continue
            hf[to_hf_map[abstract_key].format(layer_num)] = value
        else:
            if key not in to_hf_map:
                continue
            hf[to_hf_map[key]] = value
    return hf


def test_torchtitan_to_hf_and_back(qwen3, tmp_path):
    model, hf_dir, hf = qwen3
    titan = titan_from_hf(dict(hf), TITAN_QWEN3_FROM_HF, E)
    assert titan["layers.0.moe.routed_experts.inner_experts.w1_EFD"].shape == (E, I, H)
    # the load-balancing buffer torchtitan's MoE registers (persistent) when load_balance_coeff is set
    saved = {**titan, **{f"layers.{i}.moe.expert_bias_E": torch.rand(E) for i in range(LAYERS)}}
    src = _save(saved, hf_dir, tmp_path / "titan")

    # trainer -> HF per-expert (what vLLM serves): torchtitan's own to_hf, byte for byte
    proc = run_tool("convert.split_experts", "--src", str(src), "--dst", str(tmp_path / "pe"))
    assert "2 tensor(s) left out" in proc.stdout and "expert_bias_E" in proc.stdout
    _same_bytes(load_dir(tmp_path / "pe"), titan_to_hf(saved, TITAN_QWEN3_FROM_HF, E))
    _hf_logits_match(model, tmp_path / "pe")
    # trainer -> transformers-fused
    run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(tmp_path / "fused"))
    _hf_logits_match(model, tmp_path / "fused")

    # HF (either layout) -> torchtitan for continued training: torchtitan's own from_hf, byte for byte
    for name, source in (("from_pe", hf_dir), ("from_fused", tmp_path / "fused")):
        run_tool("convert.fuse_experts", "--src", str(source), "--dst", str(tmp_path / name), "--names", "torchtitan")
        _same_bytes(load_dir(tmp_path / name), titan)
    # convert.verify reads either side in a trainer's names
    for a, b in ((src, tmp_path / "pe"), (src, tmp_path / "fused"), (hf_dir, tmp_path / "from_pe")):
        proc = run_tool("convert.verify", "--src", str(a), "--dst", str(b))
        assert "torchtitan" in proc.stdout, proc.stdout
    # the bytes already agreed: --layout stacked is torchtitan's layout, names aside
    run_tool("convert.fuse_experts", "--src", str(hf_dir), "--dst", str(tmp_path / "stacked"), "--layout", "stacked")
    stacked = load_dir(tmp_path / "stacked")
    for key in ("w1_EFD", "w3_EFD", "w2_EDF"):
        hf_key = {"w1_EFD": "gate_proj", "w3_EFD": "up_proj", "w2_EDF": "down_proj"}[key]
        assert raw_bytes(stacked[f"model.layers.1.mlp.experts.{hf_key}"]) == raw_bytes(
            titan[f"layers.1.moe.routed_experts.inner_experts.{key}"])
    # fused in one layout, renamed: a pure rename is a job too
    run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(tmp_path / "renamed"), "--layout", "stacked")
    _same_bytes(load_dir(tmp_path / "renamed"), stacked)


def test_torchtitan_writes_only_its_layout(qwen3, tmp_path):
    _, hf_dir, _ = qwen3
    proc = run_tool("convert.split_experts", "--src", str(hf_dir), "--dst", str(tmp_path / "x"), "--names", "torchtitan",
                    check=False)
    assert proc.returncode != 0 and "'stacked' layout" in proc.stderr and "fuse_experts" in proc.stderr
    proc = run_tool("convert.fuse_experts", "--src", str(hf_dir), "--dst", str(tmp_path / "y"), "--names", "torchtitan",
                    "--layout", "transformers", check=False)
    assert proc.returncode != 0 and "'stacked' layout" in proc.stderr


def test_an_unknown_trainer_tensor_is_refused_naming_it(qwen3, tmp_path):
    _, hf_dir, hf = qwen3
    titan = titan_from_hf(dict(hf), TITAN_QWEN3_FROM_HF, E)
    titan["layers.0.moe.mystery_E"] = torch.zeros(E)
    src = _save(titan, hf_dir, tmp_path / "titan")
    proc = run_tool("convert.split_experts", "--src", str(src), "--dst", str(tmp_path / "pe"), check=False)
    assert proc.returncode != 0
    assert "layers.0.moe.mystery_E" in proc.stderr and "torchtitan" in proc.stderr and "namings" in proc.stderr
    assert not (tmp_path / "pe" / "model.safetensors.index.json").exists()


# ---- NeMo AutoModel 0.7.0 ----------------------------------------------------------------------------------
def nemo_from_hf(hf: dict[str, torch.Tensor], n_experts: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """nemo_automodel 0.7.0 components/moe/state_dict_mixin.py MoESplitExpertsStateDictMixin._from_hf_w_merged_experts
    (gated, no device mesh): gate_and_up_projs[e] = torch.cat([gate.T, up.T], dim=-1) (_direct_fill_grouped_expert_tensor
    into a tensor of the adapter's dtype), down_projs = torch.stack([down.T]); every other key unchanged."""
    expert_pattern = re.compile(r"(?P<prefix>(?:model\.)?(?:language_model\.)?)layers\.(\d+)\.mlp\.experts\.(\d+)\."
                                r"(gate_proj|up_proj|down_proj)\.weight")
    state_dict: dict[str, torch.Tensor] = {}
    by_layer: dict[str, dict[str, dict[int, object]]] = {}
    for key in list(hf):
        value = hf[key]
        m = expert_pattern.match(key) if ".mlp.experts." in key and key.endswith(".weight") else None
        if m is None:
            if not key.endswith("_scale_inv"):
                state_dict[key] = value
            continue
        prefix, layer_num, expert_num, which = m.group("prefix"), m.group(2), int(m.group(3)), m.group(4)
        native = f"{prefix}layers.{layer_num}.mlp.experts." + ("down_projs" if which == "down_proj" else "gate_and_up_projs")
        got = by_layer.setdefault(layer_num, {}).setdefault(native, {})
        if which == "down_proj":
            got[expert_num] = value
        else:
            got.setdefault(expert_num, {})[which] = value  # type: ignore[index, union-attr]
        complete = len(got) == n_experts and (which == "down_proj" or all(
            isinstance(d, dict) and "gate_proj" in d and "up_proj" in d for d in got.values()))
        if not complete:
            continue
        parts = [((got[e]["gate_proj"].transpose(0, 1), got[e]["up_proj"].transpose(0, 1))  # type: ignore[index]
                  if which != "down_proj" else (got[e].transpose(0, 1),)) for e in sorted(got)]  # type: ignore[union-attr]
        first = parts[0]
        grouped = torch.empty((len(parts), *first[0].shape[:-1], sum(p.shape[-1] for p in first)), dtype=dtype)
        if len(first) == 1:
            torch.stack([p[0] for p in parts], dim=0, out=grouped)
        else:
            for i, p in enumerate(parts):
                torch.cat(p, dim=-1, out=grouped[i])
        state_dict[native] = grouped
        del by_layer[layer_num][native]
    return state_dict


def nemo_to_hf(sd: dict[str, torch.Tensor], n_experts: int, inter_dim: int) -> dict[str, torch.Tensor]:
    """nemo_automodel 0.7.0 state_dict_mixin.py _convert_single_merged_expert_to_hf_split_experts (save path:
    contiguous): gate = w[:, :inter_dim].T, up = w[:, inter_dim:].T, down = w.T per expert."""
    out: dict[str, torch.Tensor] = {}
    for fqn, tensor in sd.items():
        m = re.search(r"layers\.(\d+)", fqn)
        if fqn.endswith(".mlp.experts.gate_and_up_projs"):
            prefix = fqn[: fqn.index("layers.")]
            for i, w in enumerate(torch.split(tensor, tensor.shape[0] // n_experts, dim=0)):
                w = w.squeeze(0)
                base = f"{prefix}layers.{m.group(1)}.mlp.experts.{i}"  # type: ignore[union-attr]
                out[f"{base}.gate_proj.weight"] = w[:, :inter_dim].transpose(0, 1).contiguous()
                out[f"{base}.up_proj.weight"] = w[:, inter_dim:].transpose(0, 1).contiguous()
        elif fqn.endswith(".mlp.experts.down_projs") and tensor.ndim == 3 and tensor.shape[1] == inter_dim:
            prefix = fqn[: fqn.index("layers.")]
            for i, w in enumerate(torch.split(tensor, tensor.shape[0] // n_experts, dim=0)):
                out[f"{prefix}layers.{m.group(1)}.mlp.experts.{i}.down_proj.weight"] = w.squeeze(0).transpose(0, 1).contiguous()  # type: ignore[union-attr]
        else:
            out[fqn] = tensor
    return out


def test_nemo_automodel_to_hf_and_back(qwen3, tmp_path):
    model, hf_dir, hf = qwen3
    nemo = nemo_from_hf(dict(hf), E, torch.float32)
    assert nemo["model.layers.0.mlp.experts.gate_and_up_projs"].shape == (E, H, 2 * I)
    assert nemo["model.layers.0.mlp.experts.down_projs"].shape == (E, I, H)
    src = _save(nemo, hf_dir, tmp_path / "nemo")
    run_tool("convert.split_experts", "--src", str(src), "--dst", str(tmp_path / "pe"))
    _same_bytes(load_dir(tmp_path / "pe"), nemo_to_hf(nemo, E, I))
    _hf_logits_match(model, tmp_path / "pe")
    run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(tmp_path / "fused"))
    _hf_logits_match(model, tmp_path / "fused")
    for name, source in (("from_pe", hf_dir), ("from_fused", tmp_path / "fused")):
        run_tool("convert.fuse_experts", "--src", str(source), "--dst", str(tmp_path / name), "--names", "nemo_automodel")
        _same_bytes(load_dir(tmp_path / name), nemo)


# ---- Megatron-Bridge 0.3.1 ---------------------------------------------------------------------------------
# megatron/bridge/models/qwen/qwen3_moe_bridge.py (megatron-bridge 0.3.1): Qwen3MoEBridge.mapping_registry's
# AutoMapping dict, Megatron name -> HF name (`*` a layer index)
MEGATRON_QWEN3_AUTO = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "output_layer.weight": "lm_head.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "decoder.layers.*.self_attention.linear_qkv.layer_norm_weight": "model.layers.*.input_layernorm.weight",
    "decoder.layers.*.mlp.router.weight": "model.layers.*.mlp.gate.weight",
    "decoder.layers.*.pre_mlp_layernorm.weight": "model.layers.*.post_attention_layernorm.weight",
    "decoder.layers.*.self_attention.q_layernorm.weight": "model.layers.*.self_attn.q_norm.weight",
    "decoder.layers.*.self_attention.k_layernorm.weight": "model.layers.*.self_attn.k_norm.weight",
    "decoder.layers.*.self_attention.linear_proj.weight": "model.layers.*.self_attn.o_proj.weight",
}


def merge_qkv_weights(heads: int, groups: int, head_size: int, hidden: int, q, k, v):  # noqa: ANN001, ANN201
    """megatron-bridge 0.3.1 models/conversion/param_mapping.py merge_qkv_weights (no attention_output_gate)."""
    heads_per_group = heads // groups
    q_r, k_r, v_r = q.view(heads, head_size, hidden), k.view(groups, head_size, hidden), v.view(groups, head_size, hidden)
    qkv = []
    for i in range(groups):
        qkv.extend([q_r[i * heads_per_group:(i + 1) * heads_per_group], k_r[i:i + 1], v_r[i:i + 1]])
    return torch.cat(qkv, dim=0).reshape([-1, hidden])


def split_qkv_weights(heads: int, groups: int, head_size: int, qkv):  # noqa: ANN001, ANN201
    """megatron-bridge 0.3.1 param_mapping.py split_qkv_weights (weights, no attention_output_gate)."""
    heads_per_group = heads // groups
    total, per_group = heads + 2 * groups, heads_per_group + 2
    hidden = qkv.shape[-1]
    r = qkv.view(total, head_size, hidden)
    q_slice = torch.cat([torch.arange(per_group * i, per_group * i + heads_per_group) for i in range(groups)])
    k_slice = torch.arange(per_group - 2, total, per_group)
    v_slice = torch.arange(per_group - 1, total, per_group)
    return tuple(r[s].reshape(-1, hidden) for s in (q_slice, k_slice, v_slice))


def megatron_from_hf(hf: dict[str, torch.Tensor], sequential: bool = False) -> dict[str, torch.Tensor]:
    """The Qwen3MoEBridge mappings' hf_to_megatron at tensor parallel 1: AutoMapping (a rename), QKVMapping
    (merge_qkv_weights), GatedMLPMapping (torch.cat([gate, up], dim=0)) for `linear_fc1.weight{e}` (TEGroupedMLP)
    or `local_experts.{e}.linear_fc1.weight` (SequentialMLP), AutoMapping for fc2."""
    out: dict[str, torch.Tensor] = {}
    for mg, hn in MEGATRON_QWEN3_AUTO.items():
        for i in range(LAYERS) if "*" in mg else [None]:
            out[mg.replace("*", str(i))] = hf[hn.replace("*", str(i))]
    for i in range(LAYERS):
        a = f"model.layers.{i}.self_attn."
        out[f"decoder.layers.{i}.self_attention.linear_qkv.weight"] = merge_qkv_weights(
            HEADS, KV_HEADS, HEAD_DIM, H, hf[a + "q_proj.weight"], hf[a + "k_proj.weight"], hf[a + "v_proj.weight"])
        for e in range(E):
            x = f"model.layers.{i}.mlp.experts.{e}."
            fc1 = torch.cat([hf[x + "gate_proj.weight"], hf[x + "up_proj.weight"]], dim=0)
            fc2 = hf[x + "down_proj.weight"]
            if sequential:
                out[f"decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc1.weight"] = fc1
                out[f"decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc2.weight"] = fc2
            else:
                out[f"decoder.layers.{i}.mlp.experts.linear_fc1.weight{e}"] = fc1
                out[f"decoder.layers.{i}.mlp.experts.linear_fc2.weight{e}"] = fc2
    return out


def megatron_to_hf(mg: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """megatron_to_hf of the same mappings at tensor parallel 1: split_qkv_weights, torch.chunk(fc1, 2, dim=0)."""
    hf: dict[str, torch.Tensor] = {}
    for m, hn in MEGATRON_QWEN3_AUTO.items():
        for i in range(LAYERS) if "*" in m else [None]:
            hf[hn.replace("*", str(i))] = mg[m.replace("*", str(i))]
    for i in range(LAYERS):
        q, k, v = split_qkv_weights(HEADS, KV_HEADS, HEAD_DIM, mg[f"decoder.layers.{i}.self_attention.linear_qkv.weight"])
        for n, t in zip(("q", "k", "v"), (q, k, v)):
            hf[f"model.layers.{i}.self_attn.{n}_proj.weight"] = t.contiguous()
        for e in range(E):
            gate, up = torch.chunk(mg[f"decoder.layers.{i}.mlp.experts.linear_fc1.weight{e}"], 2, dim=0)
            x = f"model.layers.{i}.mlp.experts.{e}."
            hf[x + "gate_proj.weight"], hf[x + "up_proj.weight"] = gate.contiguous(), up.contiguous()
            hf[x + "down_proj.weight"] = mg[f"decoder.layers.{i}.mlp.experts.linear_fc2.weight{e}"]
    return hf


def test_megatron_to_hf_and_back(qwen3, tmp_path):
    model, hf_dir, hf = qwen3
    mg = megatron_from_hf(hf)
    assert not torch.equal(mg["decoder.layers.0.self_attention.linear_qkv.weight"],
                           torch.cat([hf[f"model.layers.0.self_attn.{n}_proj.weight"] for n in "qkv"]))  # interleaved
    src = _save({**mg, "decoder.layers.0.self_attention.linear_qkv._extra_state": torch.zeros(3, dtype=torch.uint8)},
                hf_dir, tmp_path / "mg")
    proc = run_tool("convert.split_experts", "--src", str(src), "--dst", str(tmp_path / "pe"))
    assert "1 tensor(s) left out" in proc.stdout
    _same_bytes(load_dir(tmp_path / "pe"), megatron_to_hf(mg))
    _hf_logits_match(model, tmp_path / "pe")
    run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(tmp_path / "fused"))
    _hf_logits_match(model, tmp_path / "fused")
    # SequentialMLP names are read too
    seq = _save(megatron_from_hf(hf, sequential=True), hf_dir, tmp_path / "seq")
    run_tool("convert.fuse_experts", "--src", str(seq), "--dst", str(tmp_path / "seq_fused"))
    _hf_logits_match(model, tmp_path / "seq_fused")
    # HF (either layout) -> Megatron (grouped GEMM names): the bridge's hf_to_megatron, byte for byte
    run_tool("convert.split_experts", "--src", str(hf_dir), "--dst", str(tmp_path / "from_pe"), "--names", "megatron")
    _same_bytes(load_dir(tmp_path / "from_pe"), mg)
    run_tool("convert.split_experts", "--src", str(tmp_path / "fused"), "--dst", str(tmp_path / "from_fused"),
             "--names", "megatron")
    _same_bytes(load_dir(tmp_path / "from_fused"), mg)
    # --verify (convert.verify after writing) with Megatron's q/k/v blocks on either side
    run_tool("convert.split_experts", "--src", str(src), "--dst", str(tmp_path / "pe2"), "--verify")
    run_tool("convert.split_experts", "--src", str(hf_dir), "--dst", str(tmp_path / "mg2"), "--names", "megatron",
             "--verify")


def test_verify_catches_a_wrong_trainer_output(qwen3, tmp_path):
    _, hf_dir, hf = qwen3
    run_tool("convert.split_experts", "--src", str(hf_dir), "--dst", str(tmp_path / "mg"), "--names", "megatron")
    out = load_dir(tmp_path / "mg")
    bad = dict(out)
    qkv = bad["decoder.layers.1.self_attention.linear_qkv.weight"].clone()
    qkv[HEAD_DIM * HEADS // KV_HEADS] += 1  # a k row of group 0
    bad["decoder.layers.1.self_attention.linear_qkv.weight"] = qkv
    fc1 = bad["decoder.layers.0.mlp.experts.linear_fc1.weight3"].clone()
    fc1[I] += 1  # the first up row of expert 3
    bad["decoder.layers.0.mlp.experts.linear_fc1.weight3"] = fc1
    dst = tmp_path / "bad"
    dst.mkdir()
    for f in (tmp_path / "mg").iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)
    save_file(bad, dst / "model.safetensors")
    (dst / "model.safetensors.index.json").write_text(json.dumps({
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in bad.values())},
        "weight_map": {k: "model.safetensors" for k in sorted(bad)}}))
    proc = run_tool("convert.verify", "--src", str(hf_dir), "--dst", str(dst), check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    text = proc.stdout + proc.stderr
    assert "k_proj" in text and "up" in text, text


# ---- the naming files ----------------------------------------------------------------------------------------
def test_every_naming_file_loads_and_its_layouts_fit_its_families():
    from convert.families.namings import with_naming_layouts

    loaded = _load(str(NAMINGS_DIR))
    assert naming_names() == ["hf", "megatron", "nemo_automodel", "torchtitan"]
    for by_type in loaded.values():
        for model_type, naming in by_type.items():
            assert naming.reference, naming.source
            family = family_by_name(model_type)
            extended = with_naming_layouts(family, {"model_type": model_type})
            assert naming.layout in ("per_expert", *extended.fused)


@pytest.mark.parametrize("edit, expect", [
    ({"tensors": [{"trainer": "a.{L}", "hf": "b.{L}", "grups": 2}]}, "unknown key 'grups'"),
    ({"tensors": [{"trainer": "a.{L}", "hf": "b"}]}, "same placeholders"),
    ({"tensors": [{"trainer": "a", "hf": ["b", "c"], "sizes": [1]}]}, "gives 1 shares for 2"),
    ({"skip": {"x": " "}}, "say why"),
    ({"layuot": "stacked"}, "did you mean 'layout'"),
])
def test_a_bad_naming_file_is_refused_naming_the_file(tmp_path, edit, expect):
    from convert.families.namings import _build

    path = tmp_path / "t.json"
    obj = {"naming": "t", "models": {"qwen3_moe": edit}}
    with pytest.raises(ConversionError, match=re.escape(expect)) as err:
        _build(parse(NamingSpec, obj, str(path)), str(path))
    assert str(path) in str(err.value)


def test_source_view_cuts_by_byte_range_only():
    """A pure function of names, shapes and byte ranges: fc1 [gate; up] is two narrower ranges of one file."""
    config = {"model_type": "qwen3_moe", "num_attention_heads": 4, "num_key_value_heads": 2}
    spans = {"decoder.layers.3.mlp.experts.linear_fc1.weight7": Span("a.safetensors", "BF16", (8, 3), 100, 148),
             "decoder.layers.3.self_attention.linear_qkv.weight": Span("b.safetensors", "F32", (16, 2), 0, 128)}
    view = source_view(spans, config, "ckpt")
    assert view.naming is not None and view.naming.name == "megatron"
    assert view.tensors["model.layers.3.mlp.experts.7.gate_proj.weight"] == Span("a.safetensors", "BF16", (4, 3), 100, 124)
    assert view.tensors["model.layers.3.mlp.experts.7.up_proj.weight"] == Span("a.safetensors", "BF16", (4, 3), 124, 148)
    # 2 groups of [q 4 rows, k 2, v 2]: q is held in two blocks
    q = view.parts["model.layers.3.self_attn.q_proj.weight"]
    assert [view.tensors[n].start for n in q] == [0, 64]
    assert view.tensors["model.layers.3.self_attn.k_proj.weight#1"] == Span("b.safetensors", "F32", (2, 2), 96, 112)
    assert source_view({"model.norm.weight": Span("c", "F32", (3,), 0, 12)}, config, "x").naming is None


# ---- torchtitan 0.3.0: deepseek_v3 and gpt-oss ----------------------------------------------------------------
# torchtitan/models/deepseek_v3/state_dict_adapter.py (torchtitan 0.3.0): DeepSeekV3StateDictAdapter.from_hf_map with
# the q_lora_rank != 0 entries (the tiny model has q_lora_rank 24); MTP layers are not in the tiny model
TITAN_DSV3_FROM_HF = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{}.self_attn.kv_a_proj_with_mqa.weight": "layers.{}.attention.wkv_a.weight",
    "model.layers.{}.self_attn.kv_a_layernorm.weight": "layers.{}.attention.kv_norm.weight",
    "model.layers.{}.self_attn.kv_b_proj.weight": "layers.{}.attention.wkv_b.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    "model.layers.{}.mlp.experts.{}.gate_proj.weight": "layers.{}.moe.routed_experts.inner_experts.w1_EFD",
    "model.layers.{}.mlp.experts.{}.up_proj.weight": "layers.{}.moe.routed_experts.inner_experts.w3_EFD",
    "model.layers.{}.mlp.experts.{}.down_proj.weight": "layers.{}.moe.routed_experts.inner_experts.w2_EDF",
    "model.layers.{}.mlp.gate.weight": "layers.{}.moe.router.gate.weight",
    "model.layers.{}.mlp.shared_experts.gate_proj.weight": "layers.{}.moe.shared_experts.w1.weight",
    "model.layers.{}.mlp.shared_experts.up_proj.weight": "layers.{}.moe.shared_experts.w3.weight",
    "model.layers.{}.mlp.shared_experts.down_proj.weight": "layers.{}.moe.shared_experts.w2.weight",
    "model.layers.{}.mlp.gate.e_score_correction_bias": "layers.{}.moe.expert_bias_E",
    "model.layers.{}.enorm.weight": "layers.{}.enorm.weight",
    "model.layers.{}.hnorm.weight": "layers.{}.hnorm.weight",
    "model.layers.{}.eh_proj.weight": "layers.{}.eh_proj.weight",
    "model.layers.{}.shared_head.norm.weight": "layers.{}.mtp_norm.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
    "model.layers.{}.self_attn.q_a_proj.weight": "layers.{}.attention.wq_a.weight",
    "model.layers.{}.self_attn.q_a_layernorm.weight": "layers.{}.attention.q_norm.weight",
    "model.layers.{}.self_attn.q_b_proj.weight": "layers.{}.attention.wq_b.weight",
}


def test_torchtitan_deepseek_v3_to_hf_and_back(tmp_path):
    from tiny_models import build

    model = build("deepseek_v3")
    model.save_pretrained(tmp_path / "hf", max_shard_size="30KB")
    hf = load_dir(tmp_path / "hf")
    n = model.config.n_routed_experts
    # the offline from_hf/to_hf expert paths are Qwen3's (same MoEStateDictAdapter helpers, same regexes)
    titan = titan_from_hf(dict(hf), TITAN_DSV3_FROM_HF, n)
    assert "layers.1.moe.expert_bias_E" in titan and "layers.1.moe.shared_experts.w1.weight" in titan
    src = _save(titan, tmp_path / "hf", tmp_path / "titan")
    run_tool("convert.split_experts", "--src", str(src), "--dst", str(tmp_path / "pe"))
    _same_bytes(load_dir(tmp_path / "pe"), titan_to_hf(titan, TITAN_DSV3_FROM_HF, n))
    _hf_logits_match(model, tmp_path / "pe")
    run_tool("convert.fuse_experts", "--src", str(tmp_path / "hf"), "--dst", str(tmp_path / "back"), "--names", "torchtitan")
    _same_bytes(load_dir(tmp_path / "back"), titan)


# torchtitan/models/gpt_oss/state_dict_adapter.py (torchtitan 0.3.0): GptOssStateDictAdapter.from_hf_map, every
# entry but the experts'. Its expert entries name `mlp1_weight`/`mlp2_weight`, which GptOssGroupedExperts
# (models/gpt_oss/moe.py) no longer has (its parameters are mlp1_weight_EGD [E, 2I, H], mlp1_bias_EG [E, 2I],
# mlp2_weight_EDF [E, H, I], mlp2_bias_ED [E, H], "(num_experts, out_dim, in_dim)"), and map them to MXFP4
# `*_blocks` names: the experts below follow the module (h = x @ mlp1_weight_EGD.transpose(-2, -1) + mlp1_bias,
# gate = h[..., ::2], up = h[..., 1::2]), i.e. the transpose of transformers' gate_up_proj [E, H, 2I].
TITAN_GPT_OSS_FROM_HF = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.qkv_linear.wq.weight",
    "model.layers.{}.self_attn.q_proj.bias": "layers.{}.attention.qkv_linear.wq.bias",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.qkv_linear.wk.weight",
    "model.layers.{}.self_attn.k_proj.bias": "layers.{}.attention.qkv_linear.wk.bias",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.qkv_linear.wv.weight",
    "model.layers.{}.self_attn.v_proj.bias": "layers.{}.attention.qkv_linear.wv.bias",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.self_attn.o_proj.bias": "layers.{}.attention.wo.bias",
    "model.layers.{}.self_attn.sinks": "layers.{}.attention.sinks",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    "model.layers.{}.mlp.router.weight": "layers.{}.moe.router.gate.weight",
    "model.layers.{}.mlp.router.bias": "layers.{}.moe.router.gate.bias",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}
GPT_OSS_EXPERTS = {  # HF fused tensor -> (torchtitan parameter, HF -> torchtitan)
    "gate_up_proj": ("mlp1_weight_EGD", lambda t: t.transpose(1, 2)),
    "gate_up_proj_bias": ("mlp1_bias_EG", lambda t: t),
    "down_proj": ("mlp2_weight_EDF", lambda t: t.transpose(1, 2)),
    "down_proj_bias": ("mlp2_bias_ED", lambda t: t),
}


def gpt_oss_titan_from_hf(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GptOssStateDictAdapter.from_hf (torchtitan 0.3.0; re.sub count=1, from_hf_map.get) for non-expert keys; the
    experts as GptOssGroupedExperts holds them (see above)."""
    out = {}
    for key, value in hf.items():
        m = re.match(r"model\.layers\.(\d+)\.mlp\.experts\.(\w+)$", key)
        if m:
            name, how = GPT_OSS_EXPERTS[m.group(2)]
            out[f"layers.{m.group(1)}.moe.routed_experts.inner_experts.{name}"] = how(value).contiguous()
            continue
        if "layers" in key:
            layer_num = re.search(r"\d+", key).group(0)  # type: ignore[union-attr]
            tt_key = TITAN_GPT_OSS_FROM_HF.get(re.sub(r"(\d+)", "{}", key, count=1))
            if tt_key is not None:
                out[tt_key.format(layer_num)] = value
        elif TITAN_GPT_OSS_FROM_HF[key] is not None:
            out[TITAN_GPT_OSS_FROM_HF[key]] = value
    return out


def test_torchtitan_gpt_oss_to_hf_and_back(tmp_path):
    from model_fixtures import build_model

    model = build_model("gpt_oss")
    model.save_pretrained(tmp_path / "hf", max_shard_size="30KB")
    hf = load_dir(tmp_path / "hf")
    titan = gpt_oss_titan_from_hf(hf)
    assert len(titan) == len(hf)
    src = _save(titan, tmp_path / "hf", tmp_path / "titan")
    run_tool("convert.fuse_experts", "--src", str(src), "--dst", str(tmp_path / "native"))
    _same_bytes(load_dir(tmp_path / "native"), hf)
    _hf_logits_match(model, tmp_path / "native")
    run_tool("convert.fuse_experts", "--src", str(tmp_path / "hf"), "--dst", str(tmp_path / "back"), "--names",
             "torchtitan", "--verify")
    _same_bytes(load_dir(tmp_path / "back"), titan)
