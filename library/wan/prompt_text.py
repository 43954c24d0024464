"""The official WAN prompt cleaning, without the text encoder's heavy imports (transformers)."""

from __future__ import annotations

import html
import re


def clean_prompt(text: str) -> str:
    """Official WAN prompt cleaning: fix mojibake, unescape HTML twice, collapse whitespace."""
    import ftfy  # lazy: only needed when prompts are cleaned

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()
