import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(min(2, os.cpu_count() or 1))

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


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
