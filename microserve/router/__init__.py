"""Router side: handles on engines and their transports, the cluster, strategies, the request loop."""

from microserve.router.handle import EngineCallError, EngineHandle, EngineTimeout

__all__ = ["EngineCallError", "EngineHandle", "EngineTimeout"]
