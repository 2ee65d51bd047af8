"""Model families as data (configs/families/*.json): schema, op classes, names and the one family detection.

Modules: `schema` (the strict file format), `ops` (fused-tensor op classes with inverses and
shape rules), `names` (key templates and rename rules), `family` (a built Family),
`registry` (loading, and `detect_family`), `generate` (writes the family files from the
installed transformers' table; a maintenance command, never imported by a conversion).
"""

from convert.families.family import PER_EXPERT, Family, FusedTensor, Merge
from convert.families.names import Rename, template_regex
from convert.families.registry import (
    dequantized_family,
    detect_family,
    family_by_name,
    family_dirs,
    find_family,
    load_families,
    representative,
)

__all__ = [
    "PER_EXPERT", "Family", "FusedTensor", "Merge", "Rename", "dequantized_family", "detect_family", "family_by_name", "family_dirs",
    "find_family", "load_families", "representative", "template_regex",
]
