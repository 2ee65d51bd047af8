"""convert.inspect: one fixture per survey pattern and per adapter-directory case, base checkpoints, text and --json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import inspect_fixtures as fx
from convert.inspect.report import PathError, inspect_path, render_text
from helpers import run_tool

L = range(3)  # three decoder layers


def inspected(path: Path, **kw) -> dict:
    """inspect_path's JSON form, checked to survive a JSON round trip and to render as text."""
    report = inspect_path(str(path), **kw)
    assert render_text(report)
    return json.loads(json.dumps(report.as_json()))


def reason(out: dict, *words: str) -> str:
    """The one reason containing every word (fails when none does)."""
    hits = [r for r in out["reasons"] if all(w in r for w in words)]
    assert hits, f"no reason with {words}: {out['reasons']}"
    return hits[0]


# ------------------------------------------------------------------ survey patterns
def test_shared_w123_pattern_a(tmp_path):
    """Qwen survey pattern A: 3-D partially shared w1/w2/w3 + attention, fp32, rank R."""
    path = fx.write_adapter(tmp_path / "a", {**fx.shared_w123(L), **fx.attention(L)},
                            fx.lora_config(target_modules="all-linear"))
    out = inspected(path)
    assert (out["kind"], out["pattern"], out["outcome"]) == ("adapter", "shared_w123", "converted")
    assert out["num_experts"] == fx.E
    assert out["ranks"]["experts.gate"] == [fx.R] and out["ranks"]["q_proj"] == [fx.R]
    assert out["conversions"] == ["split_adapter -> per-expert"]
    assert out["cases"] == ["expert_lora", "attention_lora"]
    assert out["categories"] == {"expert_lora": 18, "attention_lora": 24}
    assert out["layers"]["experts"] == [0, 1, 2]
    assert out["dtypes"] == {"F32": 42}
    reason(out, "shared_w123", f"E={fx.E}", "split_adapter")


def test_shared_w123_gpt_oss_attn_prefix(tmp_path):
    """gpt-oss survey pattern D: the same 3-D pattern with `attn.` instead of `self_attn.`."""
    path = fx.write_adapter(tmp_path / "a", {**fx.shared_w123(L), **fx.attention(L, attn="attn")},
                            fx.lora_config(base_model_name_or_path="openai/gpt-oss-20b"))
    out = inspected(path)
    assert (out["pattern"], out["outcome"], out["family"]) == ("shared_w123", "converted", "gpt_oss")
    assert out["categories"]["attention_lora"] == 24
    reason(out, "attention LoRA", "passed through")


def test_per_expert_pattern_b(tmp_path):
    """Qwen survey pattern B: per-expert + router + attention LoRA + modules_to_save, bf16: passed through."""
    bf = torch.bfloat16
    tensors = {**fx.per_expert(L, dtype=bf), **fx.router(L, dtype=bf), **fx.attention(L, dtype=bf),
               **fx.saved_modules(L, dtype=bf)}
    path = fx.write_adapter(tmp_path / "b", tensors, fx.lora_config(
        target_modules=["gate", "q_proj", "v_proj", "down_proj", "up_proj", "o_proj", "k_proj", "gate_proj"],
        modules_to_save=["embed_tokens", "input_layernorm", "post_attention_layernorm", "norm", "lm_head"]))
    out = inspected(path)
    assert (out["pattern"], out["outcome"], out["family"]) == ("per_expert", "passed_through", None)
    assert "pass --base-config" in out["family_source"]  # qwen3_moe and gpt_oss share these per-expert names
    assert set(out["cases"]) == {"per_expert", "attention_lora", "router_lora", "modules_to_save"}
    assert out["conversions"] == ["fuse_adapter --layout peft", "fuse_adapter --layout grouped"]
    assert out["categories"] == {"expert_lora": 3 * fx.E * 6, "attention_lora": 24, "router_lora": 6,
                                 "modules_to_save": 9}
    assert out["ranks"]["gate"] == [fx.R]
    reason(out, "already per-expert", "passes it through")
    reason(out, "router LoRA (gate", "passed through")
    reason(out, "modules_to_save", "embed_tokens", "input_layernorm", "passed through")


def test_per_expert_mixtral_names(tmp_path):
    """Mixtral's per-expert names (block_sparse_moe.experts.{e}.w1/w3/w2) belong to one family only."""
    tensors = fx.per_expert(L, mlp="block_sparse_moe", projs=("w1", "w3", "w2"))
    out = inspected(fx.write_adapter(tmp_path / "mx", tensors, fx.lora_config()))
    assert (out["pattern"], out["family"], out["family_source"]) == ("per_expert", "mixtral", "per-expert LoRA key names")
    assert (out["outcome"], out["num_experts"], out["ranks"]["experts.up"]) == ("passed_through", fx.E, [fx.R])


def test_router_and_attention_pattern_c(tmp_path):
    """Qwen survey pattern C: attention + router LoRA, no expert LoRA."""
    path = fx.write_adapter(tmp_path / "c", {**fx.attention(L, r=8), **fx.router(L, r=8)},
                            fx.lora_config(r=8, target_modules=["v_proj", "q_proj", "o_proj", "mlp.gate", "k_proj"]))
    out = inspected(path)
    assert (out["pattern"], out["outcome"], out["conversions"]) == (None, "passed_through", [])
    assert out["cases"] == ["attention_lora", "router_lora"]
    reason(out, "no expert LoRA")
    assert out["ranks"] == {"gate": [8], "k_proj": [8], "o_proj": [8], "q_proj": [8], "v_proj": [8]}


def test_attention_only_pattern_d(tmp_path):
    """Qwen pattern D / gpt-oss pattern A2: attention-only LoRA (q/v only here)."""
    path = fx.write_adapter(tmp_path / "d", fx.attention(L, projs="qv"), fx.lora_config(target_modules=["q_proj", "v_proj"]))
    out = inspected(path)
    assert (out["outcome"], out["cases"], out["conversions"]) == ("passed_through", ["attention_lora"], [])
    reason(out, "attention LoRA (q_proj, v_proj; 12 tensors) on layers 0-2")


def test_gpt_oss_router_modules_to_save_pattern_b(tmp_path):
    """gpt-oss survey pattern B: attention LoRA + full `mlp.router.weight/bias` saved as modules_to_save."""
    path = fx.write_adapter(tmp_path / "b", {**fx.attention(L), **fx.saved_modules(L, gpt_oss_router=True)},
                            fx.lora_config(modules_to_save=["router"]))
    out = inspected(path)
    assert (out["outcome"], out["cases"]) == ("passed_through", ["attention_lora", "modules_to_save"])
    assert out["categories"]["modules_to_save"] == 6
    reason(out, "modules_to_save", "router", "passed through")


def test_peft_target_parameters_on_some_layers(tmp_path):
    """gpt-oss survey pattern C: peft target_parameters (E*r folded), expert LoRA only on layers 0, 2 of 0-3."""
    path = fx.write_adapter(tmp_path / "c", {**fx.peft_target_parameters([0, 2], r=2), **fx.attention(range(4), r=8)},
                            fx.lora_config(r=2, target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    out = inspected(path)
    assert (out["pattern"], out["outcome"], out["num_experts"]) == ("peft_target_parameters", "converted", fx.E)
    assert out["ranks"]["experts.down"] == [2] and out["ranks"]["q_proj"] == [8]
    assert out["layers"]["experts"] == [0, 2] and out["layers"]["attention_lora"] == [0, 1, 2, 3]
    assert "partial_layers" in out["cases"]
    assert any("expert LoRA on layers 0, 2 only (of 0-3)" in n and "still convertible" in n for n in out["notes"])
    assert out["conversions"] == ["split_adapter -> per-expert"]


def test_partial_layers_against_base_config(tmp_path):
    """Expert LoRA on layers 0, 7, 10, 15, 23 with attention nowhere: the base config's layer count decides."""
    layers = [0, 7, 10, 15, 23]
    path = fx.write_adapter(tmp_path / "p", fx.shared_w123(layers), fx.lora_config())
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(fx.base_config("gpt_oss", layers=24)))
    out = inspected(path, base_config=str(cfg))
    assert (out["outcome"], out["family"], out["layers"]["experts"]) == ("converted", "gpt_oss", layers)
    assert any("layers 0, 7, 10, 15, 23 only (of 0-23)" in n for n in out["notes"])
    assert out["family_source"].startswith("model_type 'gpt_oss'")


def test_store_settings_reach_every_store_opened(tmp_path, monkeypatch):
    """The store settings given to inspect_path (what `python -m convert.inspect` reads from the environment)
    reach every store it opens: the adapter's, --base-config's (adapter_dir.find_base_config) and the
    conversion's look at the adapter (adapter_source.open_adapter). Real stores, only recorded as they open."""
    from convert.io.storage.local_storage import LocalStorage
    from convert.settings import StorageSettings

    path = fx.write_adapter(tmp_path / "a", fx.shared_w123(L), fx.lora_config())
    cfg = tmp_path / "base" / "config.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps(fx.base_config("gpt_oss", layers=3)))
    opened: list[LocalStorage] = []
    real_init = LocalStorage.__init__

    def recorded(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        opened.append(self)

    monkeypatch.setattr(LocalStorage, "__init__", recorded)
    settings = StorageSettings(retries=3, s3_conditional_reads=False)
    assert settings != StorageSettings()
    out = inspected(path, base_config=str(cfg), settings=settings)
    assert (out["outcome"], out["family"]) == ("converted", "gpt_oss")
    assert {s.url for s in opened} >= {str(path), str(cfg), str(cfg.parent)}
    assert [s.url for s in opened if s.settings is not settings] == []

def test_grouped_nemo_native(tmp_path):
    """NeMo AutoModel grouped native expert LoRA."""
    path = fx.write_adapter(tmp_path / "g", {**fx.grouped(L), **fx.attention(L)}, fx.lora_config())
    out = inspected(path)
    assert (out["pattern"], out["outcome"], out["num_experts"]) == ("grouped", "converted", fx.E)
    assert out["ranks"]["experts.up"] == [fx.R]
    reason(out, "pattern grouped", "split_adapter")


def test_mixed_fp32_bf16(tmp_path):
    """fp32 expert LoRA with bf16 attention LoRA: reported, still converted."""
    path = fx.write_adapter(tmp_path / "m", {**fx.shared_w123(L), **fx.attention(L, dtype=torch.bfloat16)},
                            fx.lora_config())
    out = inspected(path)
    assert out["outcome"] == "converted" and "mixed_dtypes" in out["cases"]
    assert out["dtypes"] == {"BF16": 24, "F32": 18}
    note = next(n for n in out["notes"] if n.startswith("mixed dtypes"))
    assert "F32 (18 tensors: expert LoRA)" in note and "BF16 (24 tensors: other LoRA)" in note


# ------------------------------------------------------------------ refusals and directory cases
def test_prefix_tuning(tmp_path):
    """Qwen survey pattern E: one tensor, prompt learning."""
    path = fx.write_adapter(tmp_path / "e", {"prompt_embeddings": torch.zeros(20, 2 * 3 * fx.H)},
                            {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 20})
    out = inspected(path)
    assert (out["outcome"], out["cases"], out["tensors"]) == ("refused", ["prefix_tuning"], 1)
    reason(out, "PREFIX_TUNING", "prompt_embeddings", "not LoRA")


def test_prefix_tuning_without_peft_type(tmp_path):
    path = fx.write_adapter(tmp_path / "e", {"prefix_task_cols": torch.zeros(1, 20, fx.H)}, {"r": 8})
    out = inspected(path)
    assert (out["outcome"], out["cases"]) == ("refused", ["prefix_tuning"])


def test_other_peft_type(tmp_path):
    path = fx.write_adapter(tmp_path / "ia3", {f"{fx.layer(0)}.self_attn.k_proj.ia3_l": torch.ones(fx.KV, 1)},
                            {"peft_type": "IA3"})
    out = inspected(path)
    assert (out["outcome"], out["cases"]) == ("refused", ["not_lora"])
    reason(out, "peft_type IA3 is not LORA")


def test_full_weights_under_adapter_name(tmp_path):
    """gpt-oss survey pattern E: model weights (19 of 24 layers) in an adapter directory."""
    path = fx.write_adapter(tmp_path / "w", fx.full_weights(range(19)), fx.lora_config(), filename="model.safetensors")
    out = inspected(path)
    assert (out["kind"], out["outcome"], out["cases"]) == ("adapter", "refused", ["full_weights"])
    reason(out, "model.safetensors holds 114 tensors and none is LoRA", "not an adapter")


def test_several_adapters_in_several_files(tmp_path):
    """gpt-oss survey pattern F: several attention-only adapters in several files, no index."""
    path = tmp_path / "multi"
    for name in ("adapter_a.safetensors", "adapter_b.safetensors", "adapter_c.safetensors"):
        fx.write_adapter(path, fx.attention(L), fx.lora_config(), filename=name)
    out = inspected(path)
    assert (out["outcome"], out["cases"]) == ("refused", ["multiple_adapters"])
    reason(out, "3 weight files", "adapter_a.safetensors (24 tensors)", "adapter_c.safetensors", "one at a time")
    assert out["files"] == {f"adapter_{c}.safetensors": 24 for c in "abc"}
    one = inspected(path / "adapter_b.safetensors")  # the suggested way to look at one of them
    assert (one["outcome"], one["cases"], one["tensors"]) == ("passed_through", ["attention_lora"], 24)


def test_adapters_in_subfolders(tmp_path):
    """peft's multi-adapter save: extra adapters in subfolders of their own."""
    path = tmp_path / "nested"
    for name in ("math", "code"):
        fx.write_adapter(path / name, fx.shared_w123(L), fx.lora_config())
    out = inspected(path)
    assert (out["kind"], out["outcome"], out["cases"]) == ("adapter", "refused", ["multiple_adapters"])
    reason(out, "code/, math/", "inspect them one at a time")


def test_zero_tensor_file(tmp_path):
    """gpt-oss survey "empty/incomplete": a safetensors file with 0 tensors."""
    path = fx.write_adapter(tmp_path / "z", {}, fx.lora_config())
    out = inspected(path)
    assert (out["outcome"], out["cases"], out["tensors"]) == ("refused", ["zero_tensors"], 0)
    reason(out, "adapter_model.safetensors holds 0 tensors")


def test_zero_tensor_file_next_to_real_one(tmp_path):
    path = fx.write_adapter(tmp_path / "z", fx.attention(L), fx.lora_config())
    fx.write_adapter(path, {}, None, filename="empty.safetensors")
    out = inspected(path)
    assert out["outcome"] == "passed_through" and "zero_tensors" in out["cases"]
    assert any("empty.safetensors: 0 tensors (ignored)" in n for n in out["notes"])


def test_config_only(tmp_path):
    path = fx.write_adapter(tmp_path / "cfg", None, fx.lora_config())
    (path / "README.md").write_text("card")
    out = inspected(path)
    assert (out["kind"], out["outcome"], out["cases"]) == ("adapter", "refused", ["config_only"])
    reason(out, "holds only adapter_config.json")


def test_checkpoint_folders_only(tmp_path):
    """Only `checkpoint-N/` subfolders: named in step order, with the inspect command of the last one."""
    path = tmp_path / "run"
    for step in (200, 1000, 50):
        fx.write_adapter(path / f"checkpoint-{step}", fx.peft_target_parameters(L), fx.lora_config())
    (path / "adapter_config.json").write_text(json.dumps(fx.lora_config()))
    out = inspected(path)
    assert (out["kind"], out["outcome"], out["cases"]) == ("adapter", "refused", ["checkpoints_only"])
    text = reason(out, "checkpoint-50/, checkpoint-200/, checkpoint-1000/")
    assert f"python -m convert.inspect {path / 'checkpoint-1000'}" in text
    inner = inspected(path / "checkpoint-1000")
    assert (inner["outcome"], inner["pattern"]) == ("converted", "peft_target_parameters")


def test_checkpoint_folders_without_top_config(tmp_path):
    path = tmp_path / "run"
    fx.write_adapter(path / "checkpoint-7", fx.attention(L), fx.lora_config())
    out = inspected(path)
    assert (out["kind"], out["cases"]) == ("adapter", ["checkpoints_only"])


def test_bin_only(tmp_path):
    path = fx.write_adapter(tmp_path / "bin", None, fx.lora_config())
    torch.save(fx.attention(L), path / "adapter_model.bin")
    out = inspected(path)
    assert (out["outcome"], out["cases"]) == ("refused", ["bin_only"])
    reason(out, "no safetensors file, only adapter_model.bin")


def test_corrupt_header_is_refused_not_an_error(tmp_path):
    path = fx.write_adapter(tmp_path / "bad", None, fx.lora_config())
    (path / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    out = inspected(path)
    assert (out["outcome"], out["cases"]) == ("refused", ["invalid"])
    reason(out, "adapter_model.safetensors", "not valid JSON")


def test_inconsistent_expert_lora_is_refused(tmp_path):
    """A shared_w123 factor whose rank disagrees: detect_expert_lora's message becomes the reason."""
    tensors = fx.shared_w123(L)
    tensors[f"{fx.layer(1)}.mlp.experts.w2.lora_B.weight"] = torch.zeros(1, fx.H, fx.R + 1)
    out = inspected(fx.write_adapter(tmp_path / "x", tensors, fx.lora_config()))
    assert (out["outcome"], out["cases"]) == ("refused", ["invalid_expert_lora"])
    reason(out, "w2.lora_B.weight")


def test_missing_path_is_the_only_error(tmp_path):
    with pytest.raises(PathError, match="does not exist"):
        inspect_path(str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    out = inspected(empty)
    assert (out["kind"], out["outcome"], out["cases"]) == ("unknown", "refused", ["no_weights"])


# ------------------------------------------------------------------ base checkpoints
@pytest.mark.parametrize("family,layout,conversions", [
    ("qwen3_moe", "per_expert", ["fuse_experts --layout transformers", "fuse_experts --layout stacked"]),
    ("qwen3_moe", "transformers", ["split_experts -> per-expert", "fuse_experts --layout stacked"]),
    ("qwen3_moe", "stacked", ["split_experts -> per-expert", "fuse_experts --layout transformers"]),  # seed 003
    ("mixtral", "per_expert", ["fuse_experts --layout transformers", "fuse_experts --layout stacked"]),
    ("gpt_oss", "native", ["split_experts --allow-unread-layout -> per-expert (no consumer reads it)"]),
])
def test_base_layouts(tmp_path, family, layout, conversions):
    path = fx.write_base(tmp_path / "m", family, layout)
    out = inspected(path)
    assert (out["kind"], out["family"], out["layout"], out["outcome"]) == ("base", family, layout, "converted")
    assert out["num_experts"] == fx.E and out["layers"]["experts"] == [0, 1]
    assert out["conversions"] == conversions
    assert len(out["files"]) > 1 and out["tensors"] == sum(out["files"].values())
    # gpt-oss: its family file says no consumer reads its per-expert layout (issue 22): a note, with the reason
    unread = family == "gpt_oss"
    assert out["cases"] == [f"base_{layout}"] + (["unread_per_expert"] if unread else [])
    if unread:
        assert any("no consumer reads the gpt_oss per-expert layout" in n and "gpt_oss.json" in n and "only fused" in n
                   for n in out["notes"]), out["notes"]


def test_base_mxfp4_refused(tmp_path):
    path = fx.write_base(tmp_path / "m", "gpt_oss", "native",
                         extra={"model.layers.0.mlp.experts.gate_up_proj_blocks": torch.zeros(fx.E, 4, 8, dtype=torch.uint8)})
    out = inspected(path)
    assert (out["kind"], out["outcome"], out["cases"]) == ("base", "refused", ["unsupported"])
    reason(out, "gate_up_proj_blocks", "MXFP4")


def test_base_dense_and_no_config(tmp_path):
    dense = fx.write_base(tmp_path / "dense", config=fx.base_config(model_type="llama"))
    out = inspected(dense)
    assert (out["kind"], out["outcome"], out["cases"], out["family"]) == ("base", "refused", ["unsupported"], None)
    reason(out, "model_type 'llama' is not a known MoE family")
    (dense / "config.json").unlink()
    out = inspected(dense)
    assert (out["outcome"], out["cases"]) == ("refused", ["no_config"])
    assert out["tensors"] > 0


# ------------------------------------------------------------------ real peft + real transformers, and the CLI
@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A tiny transformers-5 Qwen3-MoE saved with save_pretrained, and a real peft target_parameters adapter on it."""
    from peft import LoraConfig, get_peft_model

    from model_fixtures import build_model

    root = tmp_path_factory.mktemp("real")
    model = build_model("qwen3_moe")
    model.save_pretrained(root / "base", max_shard_size="30KB")
    cfg = LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                     target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    get_peft_model(model, cfg).save_pretrained(root / "peft_target_parameters")
    return root


def test_real_peft_target_parameters(real):
    from model_fixtures import LAYERS, E

    out = inspected(real / "peft_target_parameters")
    assert (out["kind"], out["family"], out["pattern"], out["outcome"]) == \
        ("adapter", "qwen3_moe", "peft_target_parameters", "converted")
    assert out["num_experts"] == E and out["layers"]["experts"] == list(range(LAYERS))
    assert out["ranks"] == {"experts.gate": [3], "experts.up": [3], "experts.down": [3], "q_proj": [3], "v_proj": [3]}
    assert sorted(out["config"]["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert out["conversions"] == ["split_adapter -> per-expert"]
    with_base = inspected(real / "peft_target_parameters", base_config=str(real / "base" / "config.json"))
    assert with_base["family_source"].startswith("model_type 'qwen3_moe'") and with_base["num_experts"] == E


def test_cli_text_and_json(real):
    """`python -m convert.inspect` as a process: text by default, one JSON object with --json, exit codes."""
    from model_fixtures import E

    base = run_tool("convert.inspect", str(real / "base"))
    assert "base" in base.stdout and "layout: per_expert" in base.stdout and "fuse_experts --layout transformers" in base.stdout
    proc = run_tool("convert.inspect", str(real / "peft_target_parameters"), "--json")
    out = json.loads(proc.stdout)
    for key in ("kind", "family", "layout", "pattern", "num_experts", "ranks", "dtypes", "tensors", "layers",
                "conversions", "outcome", "reasons"):
        assert key in out
    assert (out["kind"], out["pattern"], out["num_experts"], out["layout"]) == ("adapter", "peft_target_parameters", E, None)
    text = render_text(inspect_path(str(real / "peft_target_parameters")))  # same renderer as the CLI's default
    assert "pattern: peft_target_parameters" in text and "outcome: converted" in text
    assert "split_adapter -> per-expert" in text
    missing = run_tool("convert.inspect", str(real / "nope"), "--json", check=False)
    assert missing.returncode == 2 and json.loads(missing.stdout)["outcome"] == "error"
    bad_base = run_tool("convert.inspect", str(real / "base"), "--base-config", str(real / "nope.json"), check=False)
    assert bad_base.returncode == 2 and "--base-config" in bad_base.stderr
    cfg_only = real / "cfg_only"
    cfg_only.mkdir()
    shutil.copy(real / "peft_target_parameters" / "adapter_config.json", cfg_only)
    refused = run_tool("convert.inspect", str(cfg_only))
    assert refused.returncode == 0 and "outcome: refused  [config_only]" in refused.stdout


def test_sharded_adapter_with_index(tmp_path):
    """An adapter sharded with an index (as split_adapter may write for very large adapters) is one adapter."""
    tensors = {**fx.grouped(L), **fx.attention(L)}
    names = sorted(tensors)
    path = tmp_path / "sharded"
    halves = {"adapter_model-00001-of-00002.safetensors": names[:20], "adapter_model-00002-of-00002.safetensors": names[20:]}
    for fname, keys in halves.items():
        fx.write_adapter(path, {k: tensors[k] for k in keys}, fx.lora_config(), filename=fname)
    index = {"metadata": {}, "weight_map": {k: f for f, keys in halves.items() for k in keys}}
    (path / "adapter_model.safetensors.index.json").write_text(json.dumps(index))
    out = inspected(path)
    assert (out["pattern"], out["outcome"], out["tensors"]) == ("grouped", "converted", len(tensors))
    assert out["files"] == {f: len(k) for f, k in halves.items()}


def test_adapter_on_s3(tmp_path, monkeypatch):
    """An fsspec URL: the same classification through moto's S3 server, and a missing prefix is the error case."""
    from s3_server import CREDENTIALS, MotoServer

    server = MotoServer()
    try:
        for k, v in CREDENTIALS.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.url)
        import s3fs

        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": server.url})
        fs.mkdir("inspect")
        local = fx.write_adapter(tmp_path / "a", {**fx.shared_w123([0, 2]), **fx.attention(L)}, fx.lora_config())
        fs.put(str(local), "inspect/a", recursive=True)
        fx.write_adapter(tmp_path / "run" / "checkpoint-3", fx.attention(L), fx.lora_config())
        fs.put(str(tmp_path / "run"), "inspect/run", recursive=True)
        out = inspected("s3://inspect/a")
        assert (out["pattern"], out["outcome"], out["layers"]["experts"]) == ("shared_w123", "converted", [0, 2])
        assert "partial_layers" in out["cases"]
        run = inspected("s3://inspect/run")
        assert run["cases"] == ["checkpoints_only"] and "s3://inspect/run/checkpoint-3" in run["reasons"][0]
        with pytest.raises(PathError):
            inspect_path("s3://inspect/nothing-here")
    finally:
        server.stop()


def test_base_bin_only_and_lora_without_config(tmp_path):
    """A base checkpoint in pickled files only; an adapter file with no adapter_config.json is still an adapter."""
    base = tmp_path / "bin"
    base.mkdir()
    torch.save({"model.norm.weight": torch.ones(fx.H)}, base / "pytorch_model.bin")
    out = inspected(base)
    assert (out["kind"], out["outcome"], out["cases"]) == ("base", "refused", ["bin_only"])
    bare = fx.write_adapter(tmp_path / "bare", fx.grouped(L), None, filename="weights.safetensors")
    out = inspected(bare)
    assert (out["kind"], out["pattern"], out["outcome"], out["config"]) == ("adapter", "grouped", "converted", {})


def test_raw_peft_mixtral_adapter_loads_in_vllm_and_drops_expert_and_router_deltas(tmp_path):
    """peft's fused Mixtral adapter (experts and router under `mlp.`, vLLM's Mixtral has `block_sparse_moe`): vLLM
    loads it and applies none of its expert or router LoRA (bench/results/CONSUMERS.md (c)); inspect says so for the
    vllm target (configs/targets/vllm.json `misnamed_dropped`), not a refusal, with the split_adapter fix."""
    import json as _json

    from adapter_fixtures import base_config, make_peft_adapter, random_lora, read_adapter, write_adapter
    from helpers import run_tool

    _, path = make_peft_adapter("mixtral", tmp_path / "a")
    base = base_config("mixtral")
    tensors, config = read_adapter(path)
    for layer in (0, 1):  # peft's router LoRA (target_parameters mlp.gate.weight), as in CONSUMERS.md (c)
        gate = f"base_model.model.model.layers.{layer}.mlp.gate"
        tensors[f"{gate}.lora_A.weight"] = random_lora((3, base["hidden_size"]), 5 + layer)
        tensors[f"{gate}.lora_B.weight"] = random_lora((base["num_local_experts"], 3), 7 + layer)
    write_adapter(path, tensors, config)
    cfg = tmp_path / "config.json"
    cfg.write_text(_json.dumps(base))
    out = _json.loads(run_tool("convert.inspect", str(path), "--json", "--base-config", str(cfg)).stdout)
    vllm = out["servers"]["vllm"]
    assert vllm["loads"] and vllm["refusals"] == []
    assert vllm["verdict"] == "loads, and drops every expert and router delta"
    assert vllm["drops"] and all("block_sparse_moe" in m for m in vllm["drops"])
    assert vllm["fix"].startswith("python -m convert.split_adapter --target vllm --src ")
    assert "verdict" not in out["servers"]["peft"] and out["servers"]["peft"]["loads"]
    text = run_tool("convert.inspect", str(path), "--base-config", str(cfg)).stdout
    assert "    vllm: loads, and drops every expert and router delta" in text
    assert "fix: python -m convert.split_adapter --target vllm" in text
