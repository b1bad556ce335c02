"""What a Ray worker process was given and what it uses: the CPUs Ray assigned it (the thread count
pyxf should run with) and its memory (RSS and PSS, with the model's memory-mapped weights apart)."""

import math
import os
import re
from pathlib import Path

import ray


def assigned_cpus():
    """The CPUs Ray reserved for the current actor or task (num_cpus, rounded up, at least 1); None
    outside Ray or when it reserved none (num_cpus=0): then pyxf's default applies."""
    if not ray.is_initialized():
        return None
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
    return max(1, math.ceil(cpus)) if cpus else None


def process_memory(pid="self", files_under=None):
    """Resident memory of a Linux process in bytes, from /proc/PID/smaps:

    rss, pss: the whole process (PSS divides each page by the number of processes mapping it);
    files_rss, files_pss: the mappings of files under the directory `files_under` (a model's
    memory-mapped weights: processes that map the same file share these pages, so with k of them
    on one machine files_pss is about files_rss / k)."""
    root = str(Path(files_under).resolve()) + os.sep if files_under is not None else None
    totals = dict(rss=0, pss=0, files_rss=0, files_pss=0)
    in_files = False
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            header = _MAPPING.match(line)
            if header:  # a new mapping: "start-end perms offset dev inode [path]"
                in_files = root is not None and header.group(1).startswith(root)
                continue
            key, _, value = line.partition(":")
            if key in ("Rss", "Pss"):
                size = int(value.split()[0]) * 1024  # kB
                totals[key.lower()] += size
                if in_files:
                    totals["files_" + key.lower()] += size
    return totals


_MAPPING = re.compile(r"^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+\s*(.*?)\s*$")
