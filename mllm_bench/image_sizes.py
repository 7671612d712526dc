"""Image sizes as text: ``WxH`` (width x height, px), as the CLI takes them and the rows' ``image_sizes`` write
them, and as (height, width) pairs, as ``Workload.image_sizes`` (and llava-next's pinpoints) hold them."""

from __future__ import annotations

from collections.abc import Sequence


def parse_sizes(text: str, sep: str) -> tuple[tuple[int, int], ...]:
    """``"WxH<sep>WxH..."`` as ((H, W), ...); ValueError naming the first item that is not two positive integers
    joined by ``x`` (the caller says which option it was)."""
    pairs = []
    for item in text.split(sep):
        width, x, height = item.strip().lower().partition("x")
        width, height = width.strip(), height.strip()
        if not x or not width.isdigit() or not height.isdigit() or not int(width) or not int(height):
            raise ValueError(item)
        pairs.append((int(height), int(width)))
    return tuple(pairs)


def sizes_label(pairs: Sequence[tuple[int, int]]) -> str:
    """(height, width) pairs as ``WxH;WxH``: how the rows' ``image_sizes`` and ``--vary image=`` write them."""
    return ";".join(f"{w}x{h}" for h, w in pairs)
