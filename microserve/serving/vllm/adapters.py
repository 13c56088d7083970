"""LoRA adapters on the vLLM backend: vLLM's `LoRARequest`s by name (`--lora-modules`, and those the
gateway's `/v1/load_lora_adapter` adds), passed with every request that names one. vLLM reads an
adapter's weights when a request first needs it (`--lora-modules`) or when it is loaded."""

from __future__ import annotations

from microserve.serving.api import EngineError, ErrorCode


class VLLMLoras:
    def __init__(self, enabled: bool, modules: tuple = ()) -> None:
        self.enabled, self._by_name, self._next_id = enabled, {}, 0
        for name, path in modules:
            self._register(name, path)

    def _register(self, name: str, path: str):
        from vllm.lora.request import LoRARequest

        self._next_id += 1
        self._by_name[name] = LoRARequest(name, self._next_id, path)
        return self._by_name[name]

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def request(self, name: str | None):
        """vLLM's LoRARequest of adapter `name` (None: the base model); EngineError BAD_REQUEST if unknown."""
        if name is None:
            return None
        if not self.enabled:
            raise EngineError(ErrorCode.BAD_REQUEST, f"LoRA adapter {name!r} asked for, but adapters are off (start "
                              "the engine with --enable-lora)")
        if name not in self._by_name:
            raise EngineError(ErrorCode.BAD_REQUEST, f"unknown LoRA adapter {name!r}; loaded: "
                              f"{', '.join(self.names()) or 'none'}")
        return self._by_name[name]

    async def load(self, call, llm, name: str, path: str) -> list[str]:
        """Register and load an adapter on `llm` (through `call`, the backend's vLLM thread)."""
        if not self.enabled:
            raise EngineError(ErrorCode.BAD_REQUEST, "LoRA adapters are off: start the engine with --enable-lora")
        if name in self._by_name:
            raise EngineError(ErrorCode.BAD_REQUEST, f"LoRA adapter {name!r} is already loaded")
        request = self._register(name, path)
        try:
            await call(llm.add_lora, request)
        except Exception as exc:  # NOTE: vLLM's own errors (a bad folder, rank, too many adapters)
            del self._by_name[name]
            raise EngineError(ErrorCode.BAD_REQUEST, f"LoRA adapter {name!r}: {exc}") from None
        return self.names()

    async def unload(self, call, llm, scheduler, name: str) -> list[str]:
        request = self.request(name)
        waiting = [*scheduler.running, *scheduler.waiting]
        if any(r.lora_request is not None and r.lora_request.lora_name == name for r in waiting):
            raise EngineError(ErrorCode.BAD_REQUEST, f"LoRA adapter {name!r} still has requests; unload it when "
                              "they end")
        await call(llm.remove_lora, request.lora_int_id)
        del self._by_name[name]
        return self.names()
