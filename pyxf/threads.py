"""Thread count for the core: `PYXF_NUM_THREADS`, else one thread per physical core we may run on."""

import importlib
import os
from pathlib import Path

_SYSFS_CPU = Path("/sys/devices/system/cpu")


def physical_core_count():
    """Unique (package, core) pairs among the CPUs this process may use; os.cpu_count() if unknown."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        topology = _SYSFS_CPU / f"cpu{cpu}" / "topology"
        try:
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
        except OSError:
            return len(cpus) or os.cpu_count() or 1
        cores.add((package, core))
    return len(cores) or os.cpu_count() or 1


def default_num_threads():
    value = os.environ.get("PYXF_NUM_THREADS", "").strip()
    if value:
        try:
            n = int(value)
        except ValueError:
            raise ValueError(f"PYXF_NUM_THREADS must be a positive integer, got {value!r}") from None
        if n < 1:
            raise ValueError(f"PYXF_NUM_THREADS must be a positive integer, got {value!r}")
        return n
    return physical_core_count()


def check_num_threads(n):
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"number of threads must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"number of threads must be >= 1, got {n}")
    return n


_core_module = None


def core():
    """The compiled extension, imported on first use so that `import pyxf` works without it
    (e.g. for the converter); its thread count is initialized here, once."""
    global _core_module
    if _core_module is None:
        try:
            _core = importlib.import_module("pyxf._core")
        except ImportError as e:
            raise ImportError(
                "pyxf's compiled extension pyxf._core is not available "
                f"({e}); install the package with `pip install .` or build it in place with "
                "`bash tools/dev_build.sh`"
            ) from e
        _core.set_num_threads(default_num_threads())
        _core_module = _core
    return _core_module
