"""`verify --target T`: would target T's server load the output? Its rules (configs/targets) applied to
the output's metadata by convert.targets.check; each refusal is a verification problem (exit 1),
each warning a note. Without --target, the target named in the output record (`.moe-convert/output.json`,
key "target", written by split_adapter/fuse_adapter --target) is checked; with neither, nothing.
"""

from __future__ import annotations

from typing import Any

from convert.engine.output_record import read_record
from convert.errors import ConversionError
from convert.families.registry import family_by_name
from convert.formats.adapter_dir import REFUSED, Verdict, adapter_family, find_base_config, open_adapter_dir
from convert.io.storage import Store
from convert.targets.check import REFUSE, WARN, check_adapter
from convert.targets.rules import TARGETS, load_target
from convert.verify.relation import CannotVerify


def recorded_target(dst: Store) -> str | None:
    """The target the output record of `dst` names (a key the conversion writes), or None."""
    record = read_record(dst)
    target = record.get("target") if record else None
    return target if isinstance(target, str) and target in TARGETS else None


def target_findings(dst: Store, target: str, family_name: str | None, base_config: str | None,
                    storage_options: dict[str, Any]) -> tuple[list[str], list[str], str]:
    """(refusals, warnings, a headline) of `target`'s rules on the adapter in `dst`. Raises CannotVerify
    when the directory cannot be read as an adapter."""
    verdict = Verdict()
    adir = open_adapter_dir(dst, verdict)
    if verdict.outcome == REFUSED:
        raise CannotVerify(f"{dst.display()}: not a readable adapter: {'; '.join(verdict.reasons)}")
    try:
        config, source = find_base_config(adir, base_config, storage_options)
        family, how = (family_by_name(family_name), "--family") if family_name else \
            adapter_family(config, source, adir.tensors, adir.config)
        experts = family.num_experts(config, source) if family and config else None
    except (ConversionError, OSError, ValueError) as exc:
        raise CannotVerify(str(exc)) from exc
    model_type = config.get("model_type") if isinstance(config, dict) else None
    rules = load_target(target).for_family(family.name if family else None, model_type)
    shapes = {n: (t.shape, t.dtype) for n, t in adir.tensors.items()}
    found = check_adapter(rules, adir.config, shapes, adir.files, experts)
    headline = (f"target {target} ({rules.source.split(':')[0]}), family {family.name if family else 'unknown'}"
                f" ({how}){f', E={experts}' if experts else ''}")
    return ([f"target {target}: {f.message}" for f in found if f.severity == REFUSE],
            [f"target {target}: {f.message}" for f in found if f.severity == WARN], headline)
