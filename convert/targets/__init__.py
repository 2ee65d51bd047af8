"""What each consumer of an adapter (a server or a trainer) loads: the target rules in configs/targets/."""

from convert.targets.rules import TARGETS, Target, TargetRules, load_target

__all__ = ["TARGETS", "Target", "TargetRules", "load_target"]
