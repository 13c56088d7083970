"""`VLLMBackend`: a vLLM (V1) engine under the call layer, KV through `kvapi.transfer`.

    microserve engine --backend vllm --model PATH      (in an environment with vLLM: pip install 'microserve[vllm]')

vLLM's `LLMEngine` runs in this process (in-process engine core and worker); every call into
it (add, abort, step) goes through one thread, as the built-in engine's step does. The
`MicroserveConnector` (`connector.py`) hands this class the blocks vLLM allocates for a
receive and the blocks of a finished prefill-only send; `kvapi.transfer` moves the pages.

    D.prep_recv(req, end)         ─> vLLM request waiting for remote KV; its blocks ─> KVAddr
    P.remote_send(req, kv, b, e)  ─> vLLM request prompt[:e], max_tokens=1; when it finishes its
                                     pages [b, e) go to D's blocks (TCP), then vLLM frees them
    D.start_generate(req, begin)  ─> the output stream of the request prep_recv started (vLLM
                                     schedules it as soon as the pages are in), or a new request

Differences from the built-in engine: a request that received KV starts generating when the
pages arrive (with the request's own sampling parameters; a different `sampling` at
`start_generate` is refused) and its tokens wait for `start_generate`; only TCP is offered
(vLLM owns its KV memory, so no shared pool); the prefix cache publishes no KV events.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor

from kvapi.spec import KVSpec, dtype_name
from kvapi.transfer import host_id
from microserve import protocol
from microserve.engine.core.engine_core import EngineStats, StepOutput
from microserve.sampling_params import SamplingParams
from microserve.serving.api import EngineError, ErrorCode
from microserve.serving.backend import Backend
from microserve.serving.kv_plane import KVPlane, PlaneTransfers
from microserve.serving.tickets import Ticket, TicketState
from microserve.serving.vllm.adapters import VLLMLoras
from microserve.serving.vllm.kv import VLLMTransfers
from microserve.serving.vllm.params import logprobs_of, prompt_logprobs_of, to_vllm
from microserve.text import check_prompt

log = logging.getLogger(__name__)

LAYOUT = "vllm-cpu-block"  # a page is a whole block of one layer: [heads, block_size, K|V]
VLLM_TRANSPORTS = ("nixl", "tcp")  # vLLM owns its KV memory: no shared pool; nixl registers vLLM's own tensors


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # NOTE: a broken install (e.g. CUDA-only torchvision) fails with other errors too
        return False
    return True


class VLLMBackend(VLLMTransfers, PlaneTransfers, Backend):
    """One vLLM engine (the same calls as `BuiltinBackend` through the service).

    Tickets hold vLLM requests: `ticket.hold` is the bridge key of the `Recv` that vLLM's
    scheduler fills in through the connector; sends are vLLM requests of `prompt[:end]` with
    `max_tokens=1` whose blocks the connector hands to a sending thread when they finish.
    """

    idle_poll_s = 0.002  # requests waiting for KV pages or pushes: poll vLLM's step

    def __init__(self, model: str, engine_id: str, dtype: str | None = None, block_size: int = 32,
                 num_kv_blocks: int | None = None, max_model_len: int | None = None,
                 enable_prefix_caching: bool = True, kv_host: str = "127.0.0.1", kv_port: int = 0,
                 transfer_timeout: float = 30.0, seed: int = 0, transports: list[str] | None = None,
                 best_effort: bool = False, enable_lora: bool = False, lora_modules: tuple = (),
                 max_loras: int | None = None, max_lora_rank: int = 16, engine_args: dict | None = None) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # scheduler + worker in this process
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's default takes most of the RAM
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout carries only our READY line
        from vllm import EngineArgs, LLMEngine
        from vllm.config import KVTransferConfig

        from microserve.serving.vllm.connector import BlockPages, bridge_for

        self.engine_id, self.transports, self.model_name = engine_id, list(transports or ["tcp"]), model
        self.transfer_timeout = transfer_timeout
        self.bridge = bridge_for(engine_id)
        self.loras = VLLMLoras(enable_lora, lora_modules)  # vLLM's LoRARequests by name (adapters.py)
        lora = dict(enable_lora=True, max_loras=max_loras or max(1, len(lora_modules)),
                    max_lora_rank=max_lora_rank) if enable_lora else {}
        args = EngineArgs(**lora, **(engine_args or {}),
            model=model, dtype=dtype or "auto", block_size=block_size, max_model_len=max_model_len,
            enable_prefix_caching=enable_prefix_caching, enforce_eager=True, seed=seed,
            num_gpu_blocks_override=num_kv_blocks,
            kv_transfer_config=KVTransferConfig(
                kv_connector="MicroserveConnector", kv_role="kv_both",
                kv_connector_module_path="microserve.serving.vllm.connector",
                kv_connector_extra_config={"engine_id": engine_id}))
        self.llm = LLMEngine.from_engine_args(args)
        core = self.llm.engine_core
        if not hasattr(core, "engine_core"):
            raise RuntimeError("the vLLM backend needs the in-process engine core (VLLM_ENABLE_V1_MULTIPROCESSING=0)")
        self.scheduler = core.engine_core.scheduler
        mc = self.llm.model_config
        self.max_model_len, self.vocab_size = mc.max_model_len, mc.get_vocab_size()
        names = sorted(self.bridge.layers, key=_layer_index)
        if not names:
            raise RuntimeError("vLLM registered no KV caches with the microserve connector")
        first = self.bridge.layers[names[0]]
        self.kv_spec = KVSpec(len(names), mc.get_num_kv_heads(self.llm.vllm_config.parallel_config),
                              mc.get_head_size(), dtype_name(first.dtype), block_size, LAYOUT)
        page = 2 * self.kv_spec.page_bytes
        contiguous = all(t.is_contiguous() for t in self.bridge.layers.values())
        if first[0].numel() * first.element_size() != page or not contiguous:
            raise RuntimeError(f"unexpected vLLM KV layout {tuple(first.shape)}: a block of a layer is not {page} "
                               "contiguous bytes")
        self.num_blocks = first.shape[0]
        pages = BlockPages([self.bridge.layers[n] for n in names])
        self.plane = KVPlane(engine_id, pages, self.kv_spec, self.transports, kv_host, kv_port,
                             host_id=host_id(), timeout=transfer_timeout, best_effort=best_effort)
        self.transports = self.plane.transports
        self._vllm = ThreadPoolExecutor(1, thread_name_prefix="vllm-step")
        self._send_pool = ThreadPoolExecutor(8, thread_name_prefix="kv-send")
        self._pending: dict[str, asyncio.Queue[StepOutput]] = {}  # receivers' outputs before start_generate
        self._send_outs: dict[str, asyncio.Queue[StepOutput]] = {}  # prefill-only requests of sends
        self._keys: dict[str, str] = {}  # ticket id -> bridge key, until its transfer reported
        self._prompt_lens: dict[str, int] = {}  # generating requests not yet counted in the stats
        self._logprob_k: dict[str, int] = {}  # requests that asked for logprobs: how many alternatives
        self._prompt_k: dict[str, int] = {}  # ... and prompt logprobs, until their first output
        self._computed = self._cached = 0

    # -- the step --------------------------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self.scheduler.has_requests())

    async def step(self) -> list[StepOutput]:
        return [self._output(out) for out in await self._call(self._step_vllm)]

    def _step_vllm(self) -> list:
        return self.llm.step() if self.scheduler.has_requests() else []

    def _output(self, out) -> StepOutput:
        tokens = list(out.outputs[0].token_ids) if out.outputs else []
        reason = (out.outputs[0].finish_reason if out.outputs else None) or "abort" if out.finished else None
        cached = out.num_cached_tokens or 0
        n = self._prompt_lens.pop(out.request_id, None)
        if n is not None:  # the first output of a generating request: its prompt is done
            self._cached += cached
            self._computed += n - cached
        if out.request_id not in self._send_outs:
            self._computed += len(tokens)
        k = self._logprob_k.get(out.request_id)
        pk = self._prompt_k.pop(out.request_id, None)
        if out.finished:
            self._logprob_k.pop(out.request_id, None)
        return StepOutput(out.request_id, tokens, reason, cached, logprobs_of(out, tokens, k),
                          prompt_logprobs_of(out, pk))

    def _call(self, fn, *args):
        return asyncio.get_running_loop().run_in_executor(self._vllm, fn, *args)

    def fail_running(self) -> list[StepOutput]:
        return []  # NOTE: vLLM's step raised: its own engine core has ended what ran

    def take_output(self, out: StepOutput) -> bool:
        rid = out.request_id
        if self.service.streaming(rid):
            return False  # the stream interval applies
        queue = self._pending.get(rid) or self._send_outs.get(rid)
        if queue is not None:
            queue.put_nowait(out)
        return True

    async def load_lora(self, name: str, path: str) -> list[str]:
        return await self.loras.load(self._call, self.llm, name, path)

    async def unload_lora(self, name: str) -> list[str]:
        return await self.loras.unload(self._call, self.llm, self.scheduler, name)

    def _add(self, rid: str, prompt: list[int], sampling: SamplingParams, extra: dict | None = None):
        lora = self.loras.request(sampling.lora)
        params = to_vllm(sampling, extra)
        if sampling.logprobs is not None:
            self._logprob_k[rid] = sampling.logprobs
        if sampling.prompt_logprobs is not None:
            self._prompt_k[rid] = sampling.prompt_logprobs
        return self._call(functools.partial(self.llm.add_request, lora_request=lora), rid,
                          {"prompt_token_ids": list(prompt)}, params)

    async def _abort_vllm(self, rid: str) -> None:
        await self._call(self.llm.abort_request, [rid])
        self.service.wake()

    # -- generating --------------------------------------------------------------------------------
    def borrow(self, req: protocol.Request, lenders: list[protocol.LendTicket]) -> list:
        raise EngineError(ErrorCode.BAD_REQUEST, "start_generate(lenders=...): the vLLM backend does not borrow "
                          "KV ranges (its attention runs over its own pages only); borrow on built-in engines")

    async def submit(self, req: protocol.Request, prompt: list[int], begin: int, sampling: SamplingParams,
                      ticket: Ticket | None, lent: list | None = None) -> None:
        rid = req.request_id
        pending = self._pending.pop(rid, None)
        if ticket is not None and ticket.state is TicketState.COMPLETE and pending is not None:
            while not pending.empty():  # what vLLM produced since the pages arrived (through the stream interval)
                self.service.deliver(pending.get_nowait())
            return
        self._prompt_lens[rid] = len(prompt)
        await self._add(rid, prompt, sampling)

    def check_adoption(self, req: protocol.Request, sampling: SamplingParams) -> None:
        if sampling != req.sampling:
            raise EngineError(ErrorCode.BAD_REQUEST, "the vLLM backend starts a received request with the sampling "
                              "parameters given to prep_recv; pass the same ones to start_generate")

    async def abort_request(self, request_id: str) -> bool:
        self._logprob_k.pop(request_id, None)
        self._prompt_k.pop(request_id, None)
        if self.service.streaming(request_id) or self._pending.pop(request_id, None) is not None:
            await self._abort_vllm(request_id)
            return True
        return False

    # -- books -------------------------------------------------------------------------------------
    def check_prompt(self, prompt: list[int], whole: bool = True) -> None:
        check_prompt(prompt, self.vocab_size, self.max_model_len)

    def cached_hashes(self) -> list[int]:
        return []  # NOTE: vLLM's prefix cache publishes no KV events: the router learns placement by routing

    def store_stats(self) -> list[protocol.StoreTierStats]:
        return []

    def close(self) -> None:
        self.plane.close()
        self._send_pool.shutdown(wait=False, cancel_futures=True)

    def engine_stats(self) -> EngineStats:
        s = self.scheduler
        pool = s.kv_cache_manager.block_pool
        total = pool.num_gpu_blocks - 1  # block 0 is vLLM's null block
        reqs = list(s.running) + list(s.waiting)
        cached = sum(1 for b in pool.blocks if b.block_hash is not None and b.ref_cnt == 0) \
            if hasattr(pool, "blocks") else 0
        return EngineStats(running=len(s.running), waiting=len(s.waiting), kv_blocks_total=total,
                           kv_blocks_used=total - pool.get_num_free_blocks() + cached,  # NOTE: vLLM's free
                           kv_blocks_cached=cached,  # queue holds its cache-only blocks; ours counts them as used
                           prefix_cache_hit_tokens=self._cached, computed_tokens_total=self._computed,
                           queued_tokens=sum(r.num_tokens - r.num_computed_tokens for r in reqs), kernels="vllm",
                           loras=tuple(self.loras.names()))


def _layer_index(name: str) -> int:
    m = re.search(r"\.(\d+)\.", name)
    return int(m.group(1)) if m else 0


