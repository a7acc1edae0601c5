"""Capping command output: keep the head and the tail, mark what was cut."""

from __future__ import annotations

__all__ = ["DEFAULT_OUTPUT_LIMIT", "cap_output"]

DEFAULT_OUTPUT_LIMIT = 64 * 1024
"""Characters of output kept per run by default (head and tail halves)."""

_CUT = "\n[... {n} characters cut by GhostRunner ...]\n"


def cap_output(text: str, limit: int = DEFAULT_OUTPUT_LIMIT) -> tuple[str, bool]:
    """Return ``(kept, truncated)``: ``text`` itself if it fits in ``limit`` characters,
    else its first and last ``limit // 2`` characters joined by a note saying how much
    was cut. The note is not counted in ``limit``.
    """
    if limit < 2:
        raise ValueError("limit must be at least 2")
    if len(text) <= limit:
        return text, False
    head = limit // 2
    tail = limit - head
    cut = len(text) - head - tail
    return text[:head] + _CUT.format(n=cut) + text[-tail:], True
