"""Default sampling from a checkpoint's `generation_config.json` (vLLM's `--generation-config`):
the fields a request leaves out take the model author's values instead of OpenAI's defaults.

    auto     the served checkpoint's generation_config.json (when it has one): vLLM's default
    vllm     none: OpenAI's defaults (temperature 1, top_p 1, no top_k / min_p / repetition penalty)
    FOLDER   that folder's generation_config.json

Fields used: temperature, top_p, top_k, min_p, repetition_penalty (vLLM's set; `max_new_tokens`
is not used as a default length).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from microserve.router.runtime import RouterError
from microserve.sampling_params import SamplingParams
from microserve.serving.api import ErrorCode

FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def load_defaults(spec: str, model_path: str | Path | None) -> dict[str, Any]:
    """The default sampling fields `spec` gives (raises ValueError for a folder without the file)."""
    if spec == "vllm" or (spec == "auto" and model_path is None):
        return {}
    file = Path(model_path if spec == "auto" else spec) / "generation_config.json"
    if not file.is_file():
        if spec == "auto":
            return {}
        raise ValueError(f"--generation-config {spec}: no generation_config.json there")
    cfg = json.loads(file.read_text())
    return {k: cfg[k] for k in FIELDS if isinstance(cfg.get(k), int | float) and not isinstance(cfg.get(k), bool)}


def apply_defaults(body: Any, sampling: SamplingParams, defaults: dict[str, Any]) -> None:
    """Fill the fields `body` left out (None) from `defaults`."""
    given = False
    for name, value in defaults.items():
        if getattr(body, name, None) is None:
            setattr(sampling, name, value)
            given = True
    if given:
        try:
            sampling.validate()
        except ValueError as exc:
            raise RouterError(ErrorCode.BAD_REQUEST, f"the model's generation config: {exc}") from None
