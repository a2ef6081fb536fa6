"""The side-by-side table every bench script prints: one row per figure, ours, theirs, ours/theirs."""

from __future__ import annotations

from typing import Optional


def print_ratio_table(rows: list[tuple[str, str, str]], ours: Optional[dict], theirs: Optional[dict],
                      theirs_name: str, width: int) -> None:
    """`rows`: (label, key, format); a side that is missing or lacks a key prints `-`."""
    print(f"\n{'':<{width}}{'ours':>10}{theirs_name:>10}{'ours/' + theirs_name.split()[0]:>10}")
    for label, key, fmt in rows:
        a = ours.get(key) if ours else None
        b = theirs.get(key) if theirs else None
        a_s = fmt.format(a) if a is not None else "-"
        b_s = fmt.format(b) if b is not None else "-"
        ratio = f"{a / b:.2f}" if a is not None and b else "-"
        print(f"{label:<{width}}{a_s:>10}{b_s:>10}{ratio:>10}")
