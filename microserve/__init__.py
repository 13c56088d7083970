"""microserve: programmable LLM serving with fine-grained sub-request calls."""

from microserve.demo import demo_model
from microserve.engine.config import EngineConfig
from microserve.engine.engine import InvalidRequestError, LLMEngine
from microserve.llm import LLM, RequestOutput
from microserve.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "EngineConfig", "InvalidRequestError", "LLMEngine", "RequestOutput", "SamplingParams", "demo_model"]
