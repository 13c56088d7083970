"""Router side: handles on engines (and, with the router issue, the cluster and strategies)."""

from microserve.router.handle import EngineCallError, EngineHandle, EngineTimeout

__all__ = ["EngineCallError", "EngineHandle", "EngineTimeout"]
