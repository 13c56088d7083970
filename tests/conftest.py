import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
# NOTE: with files in parallel (pytest-xdist, pyproject's addopts) each worker gets its share of the cores:
# more threads than cores make OpenMP's waiting threads spin against the other workers
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))))

from checkpoints import make_checkpoint  # noqa: E402
from engines import ensure_cluster_key  # noqa: E402

from microserve.engine.model import native  # noqa: E402

# NOTE: every engine, router and handle the tests start shares one cluster key (CURVE on every
# ZeroMQ socket, signed KV addresses), as a deployment does; tests of the refusals make their own
ensure_cluster_key()

# NOTE: build the native kernels once, up front, so engine processes started by tests find
# them in torch's extension cache instead of each waiting on the build lock at start-up
native.load()


@pytest.fixture(scope="session")
def llama_ckpt(tmp_path_factory):
    """A tiny random Llama checkpoint and its transformers model."""
    return make_checkpoint(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def demo_path(tmp_path_factory):
    from microserve import demo_model

    return demo_model(tmp_path_factory.mktemp("demo"))


# The files that take longest (each a minute or more of real processes), first: run in parallel, one file per
# worker at a time, the suite ends with short files instead of waiting on one long one
LONG_FIRST = ("test_chaos", "test_vllm_backend", "test_microserving", "test_security", "test_launch", "test_lora",
              "test_sim_planning", "test_kv_store", "test_nixl", "test_ray", "test_vllm_bench", "test_admin",
              "test_dist_attention_engines", "test_migration", "test_native")


@pytest.fixture(autouse=True)
def _quiet_turn(request, tmp_path_factory):
    """A test marked `quiet` (it compares timings measured on this machine) runs alone: with the files in
    parallel (pytest-xdist), every test holds a shared lock while it runs and a quiet one the exclusive lock,
    taken through a turnstile so that tests starting meanwhile wait behind it. One process: no-op."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        yield
        return
    import fcntl

    root = tmp_path_factory.getbasetemp().parent  # NOTE: shared by the workers of one run
    quiet = request.node.get_closest_marker("quiet") is not None
    with open(root / "turnstile.lock", "a") as gate, open(root / "quiet.lock", "a") as lock:
        fcntl.flock(gate, fcntl.LOCK_EX)  # NOTE: a quiet test waiting for the running ones holds new ones here
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if quiet else fcntl.LOCK_SH)
        finally:
            fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    # NOTE: stable: a file's order is kept. A `quiet` test's file goes last: handed out among the long files, it
    # held every worker at the turnstile until the long tests running elsewhere ended (50-78 s of setup each)
    items.sort(key=lambda item: (item.get_closest_marker("quiet") is not None, rank.get(item.path.stem, len(rank))))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
