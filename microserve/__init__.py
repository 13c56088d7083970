"""microserve: programmable LLM serving with fine-grained sub-request calls.

Names load on first use (PEP 562), so `import microserve` in a router, gateway or
client process does not import torch; only the engine side does.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "LLM": "microserve.llm",
    "RequestOutput": "microserve.llm",
    "EngineConfig": "microserve.engine.config",
    "InvalidRequestError": "microserve.engine.engine",
    "LLMEngine": "microserve.engine.engine",
    "SamplingParams": "microserve.sampling_params",
    "demo_model": "microserve.demo",
    "Request": "microserve.protocol",
    "Strategy": "microserve.router.strategy",
    "Planner": "microserve.control.planner",
    "Window": "microserve.control.planner",
    "Cluster": "microserve.router.cluster",
    "EngineHandle": "microserve.router.handle",
    "AsyncClient": "microserve.client",
    "connect": "microserve.client",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'microserve' has no attribute {name!r}")


def __dir__() -> list[str]:
    return [*globals(), *_LAZY]
