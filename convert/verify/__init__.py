"""The checker behind `python -m convert.verify`: it derives the expected relation from the family tables and
the layouts itself, not from the planner (no plan, pieces or transforms of convert.plan); what it shares with
the converter (family tables, trainer-container and adapter-layout readers, adapter key naming, target rules,
output record, destination lock) is listed in convert.verify.run's docstring."""
