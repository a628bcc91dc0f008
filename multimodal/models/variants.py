"""The "NAME/PATCH" variant syntax of the ViT and DiT ("B/16", "XL/2",
"B/16x8", "S"), parsed once. JAX-free, so config checks can use it before
the flags are parsed and JAX is imported."""
from __future__ import annotations

import re

_VARIANT = re.compile(r"([A-Za-z0-9]+)(?:/(\d+)(?:x(\d+))?)?")


def parse(variant) -> tuple[str, tuple[int, int] | None] | None:
  """"B/16" -> ("B", (16, 16)); "B/16x8" -> ("B", (16, 8)); "S" -> ("S",
  None); None for anything that is not of this form."""
  m = _VARIANT.fullmatch(variant) if isinstance(variant, str) else None
  if not m:
    return None
  patch = (int(m.group(2)), int(m.group(3) or m.group(2))) if m.group(2) else None
  return m.group(1), patch
