"""What a Ray worker process was given: the CPUs Ray assigned it (the thread count pyxf should run
with). What it uses: pyxf.memory.process_memory."""

import math

import ray


def assigned_cpus():
    """The CPUs Ray reserved for the current actor or task (num_cpus, rounded up, at least 1); None
    outside Ray or when it reserved none (num_cpus=0): then pyxf's default applies."""
    if not ray.is_initialized():
        return None
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
    return max(1, math.ceil(cpus)) if cpus else None
