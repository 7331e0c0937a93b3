"""Model families, one file each (`gpt2`, `llama`, `qwen2`, `t5`, ...): importing this package
imports every module in it, so a new family is one new file here."""

from eexit.models.families.base import FAMILIES, Family, family_of, register_family
from eexit.registry import import_submodules

import_submodules(__name__)

__all__ = ["FAMILIES", "Family", "family_of", "register_family"]
