"""A real multi-node Ray cluster on loopback for the tests (ray.cluster_utils.Cluster: a head node and
a worker node, each its own raylet and object store), and the Ray Data callables the tests run on it.
Worker processes import this module (the tests directory is on their PYTHONPATH)."""

import contextlib
import os
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

import pyxf
from pyxf.ray import Embedder

NODE_CPUS = 1  # per node: a 1-CPU actor or replica per node puts two of them on two nodes
OBJECT_STORE_BYTES = 100 * 1024**2


@contextlib.contextmanager
def local_cluster(nodes=2):
    """A Ray cluster of `nodes` nodes on 127.0.0.1, with this process connected to it as the driver."""
    package_root = str(Path(pyxf.__file__).absolute().parents[1])
    tests_dir = str(Path(__file__).resolve().parent)
    env = {
        # Workers import the same pyxf as the tests (the source tree when built in place) and this module.
        "PYTHONPATH": os.pathsep.join(filter(None, [package_root, tests_dir, os.environ.get("PYTHONPATH")])),
        # Nodes and the driver address each other on the loopback interface rather than the host's IP
        # (Ray's switch for that, named after the platforms where it is the default).
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        # Ray's own usage reporting and its memory monitor's kills would only add noise here.
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    # Ray puts the driver's current directory on its workers' sys.path: from a source checkout with
    # pyxf installed, workers would import the source tree, which has no compiled extension.
    saved_cwd = os.getcwd()
    os.chdir(package_root)
    cluster = None
    try:
        node = dict(num_cpus=NODE_CPUS, object_store_memory=OBJECT_STORE_BYTES)
        cluster = Cluster(initialize_head=True, head_node_args=dict(node, include_dashboard=False))
        for _ in range(nodes - 1):
            cluster.add_node(**node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        os.chdir(saved_cwd)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class NodeTaggingEmbedder(Embedder):
    """pyxf.ray.Embedder that also writes the id of the node that embedded each row."""

    def __call__(self, batch):
        out = super().__call__(batch)
        out["node"] = [ray.get_runtime_context().get_node_id()] * len(batch["text"])
        return out


class DyingEmbedder(NodeTaggingEmbedder):
    """Kills its own process in its second batch, once in the whole job (the first actor to create
    `marker` dies; the restarted actor and the others go on)."""

    def __init__(self, *, marker, **kwargs):
        super().__init__(**kwargs)
        self.marker = marker
        self.batches = 0

    def __call__(self, batch):
        self.batches += 1
        if self.batches == 2:
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                pass
            else:
                os._exit(1)  # as a crash would: no cleanup, the batch in hand is lost
        return super().__call__(batch)
