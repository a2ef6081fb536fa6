"""What the bench scripts share: the side-by-side table they print, and a stage timer that also keeps
CPU seconds. Imported as `bench_common` (the scripts' own folder is first on sys.path, and the repository
root is put there before this import, for `pipeline`)."""

from __future__ import annotations

import contextlib
import time
from typing import Optional

from pipeline.onpolicy import Throughput


class CPUThroughput(Throughput):
    """The stages' per-iteration timer, also keeping each part's process CPU seconds (all threads).
    Install with `stage_module.Throughput = CPUThroughput`; every timer made is kept in `made`."""

    made: list["CPUThroughput"] = []

    def __init__(self):
        super().__init__()
        self.cpu: dict[str, float] = {}
        CPUThroughput.made.append(self)

    @contextlib.contextmanager
    def time(self, name: str):
        c = time.process_time()
        with super().time(name):
            yield
        self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c


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
