"""The independent checker behind `python -m convert.verify`: it derives the expected relation from the family tables and the layouts itself, not from the planner."""
