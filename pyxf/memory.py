"""What a Linux process holds in memory, from /proc: a leaf module (it imports no other pyxf
module), for Ray's actors and the memory tests alike."""

import os
import re
from pathlib import Path


def process_memory(pid="self", files_under=None):
    """Resident memory of a Linux process in bytes, from /proc/PID/smaps:

    rss, pss: the whole process (PSS divides each page by the number of processes mapping it);
    anonymous: its own memory, backed by no file (heap, and weights copied at load);
    files_rss, files_pss: the mappings of files under the directory `files_under` (a model's
    memory-mapped weights: processes that map the same file share these pages, so with k of them
    on one machine files_pss is about files_rss / k)."""
    root = str(Path(files_under).resolve()) + os.sep if files_under is not None else None
    totals = dict(rss=0, pss=0, anonymous=0, files_rss=0, files_pss=0)
    in_files = False
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            header = _MAPPING.match(line)
            if header:  # a new mapping: "start-end perms offset dev inode [path]"
                in_files = root is not None and header.group(1).startswith(root)
                continue
            key, _, value = line.partition(":")
            if key == "Anonymous":
                totals["anonymous"] += int(value.split()[0]) * 1024
            elif key in ("Rss", "Pss"):
                size = int(value.split()[0]) * 1024  # kB
                totals[key.lower()] += size
                if in_files:
                    totals["files_" + key.lower()] += size
    return totals


_MAPPING = re.compile(r"^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+\s*(.*?)\s*$")
