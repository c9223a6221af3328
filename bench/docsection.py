"""Replace one marked section of docs/benchmarks.md, leaving the rest as it is."""

from __future__ import annotations

import re
from pathlib import Path


def write_section(doc: Path, start: str, end: str, section: str) -> None:
    """Put ``section`` (which begins with ``start`` and ends with ``end``) into ``doc``.

    An existing section between the markers is replaced; otherwise it is appended.
    """
    text = doc.read_text() if doc.is_file() else "# Benchmarks\n"
    if start in text:
        pattern = re.escape(start) + ".*?" + re.escape(end)
        text = re.sub(pattern, lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    doc.write_text(text)
