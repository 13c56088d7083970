"""The engine's books and step loop, model aside (torch-free: the simulator reuses it)."""

from microserve.engine.core.engine_core import EngineCore, EngineStats, InvalidRequestError, StepOutput

__all__ = ["EngineCore", "EngineStats", "InvalidRequestError", "StepOutput"]
