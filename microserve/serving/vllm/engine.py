"""`VLLMEngine`: the microserving calls on a vLLM (V1) engine, KV through `kvapi.transfer`.

    microserve engine --backend vllm --model PATH      (in an environment with vLLM: pip install 'microserve[vllm]')

vLLM's `LLMEngine` runs in this process (in-process engine core and worker); every call into
it (add, abort, step) goes through one thread, as the built-in engine's step does. The
`MicroserveConnector` (`vllm_connector.py`) hands this class the blocks vLLM allocates for a
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
import contextlib
import itertools
import logging
import os
import re
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from kvapi.spec import KVSpec, KVSpecMismatch, dtype_name
from kvapi.transfer import KVAddr, KVReceiver, KVSender, TransferError, TransferOutcome, choose_transport
from kvapi.transfer.base import new_secret
from microserve.protocol import GenerateChunk, RecvTicket, Request, SendResult, StatsReply
from microserve.sampling_params import SamplingParams
from microserve.serving.tickets import EngineError, check_send, norm_pos

log = logging.getLogger(__name__)

LAYOUT = "vllm-cpu-block"
_ABORTED = object()  # a page is a whole block of one layer: [heads, block_size, K|V]


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # NOTE: a broken install (e.g. CUDA-only torchvision) fails with other errors too
        return False
    return True


@dataclass
class _Ticket:
    id: str
    secret: str
    request_id: str
    key: str
    end: int
    alloc: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    done: asyncio.Event = field(default_factory=asyncio.Event)
    error: str = ""
    nbytes: int = 0
    expiry: asyncio.TimerHandle | None = None


class VLLMEngine:
    """The microserving calls of one vLLM engine (same RPCs as `AsyncEngine`)."""

    def __init__(self, model: str, engine_id: str, dtype: str | None = None, block_size: int = 32,
                 num_kv_blocks: int | None = None, max_model_len: int | None = None,
                 enable_prefix_caching: bool = True, kv_host: str = "127.0.0.1", kv_port: int = 0,
                 lease_s: float = 60.0, transfer_timeout: float = 30.0, seed: int = 0) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # scheduler + worker in this process
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's default takes most of the RAM
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout carries only our READY line
        from vllm import EngineArgs, LLMEngine
        from vllm.config import KVTransferConfig

        from microserve.serving.vllm.connector import BlockPages, bridge_for

        self.engine_id, self.model = engine_id, model
        self.lease_s, self.transfer_timeout = lease_s, transfer_timeout
        self.bridge = bridge_for(engine_id)
        args = EngineArgs(
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
        self.max_model_len = mc.max_model_len
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
        self.receiver = KVReceiver(pages, self.kv_spec, kv_host, kv_port)  # type: ignore[arg-type]
        self.sender = KVSender(pages, self.kv_spec)  # type: ignore[arg-type]
        self.transports = ["tcp"]
        self._vllm = ThreadPoolExecutor(1, thread_name_prefix="vllm-step")
        self._send_pool = ThreadPoolExecutor(8, thread_name_prefix="kv-send")
        self._streams: dict[str, asyncio.Queue] = {}
        self._pending: dict[str, asyncio.Queue] = {}  # receivers' outputs before start_generate
        self._tickets: dict[str, _Ticket] = {}
        self._tasks: set[asyncio.Future] = set()
        self._keys: dict[str, str] = {}  # ticket id -> bridge key, until its transfer reported
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._ids = itertools.count()
        self._computed = self._cached = self._sends_active = 0

    # -- the step loop -------------------------------------------------------------------
    async def run(self) -> None:
        self._loop = loop = asyncio.get_running_loop()
        while not self._closed:
            outputs, busy = await loop.run_in_executor(self._vllm, self._step)
            for out in outputs:
                self._dispatch(out)
            if not outputs:  # idle, or only waiting for KV pages / pushing sends
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 0.002 if busy else None)

    def _step(self) -> tuple[list, bool]:
        if not self.scheduler.has_requests():
            return [], False
        return self.llm.step(), True

    def _call(self, fn, *args):
        assert self._loop is not None
        return self._loop.run_in_executor(self._vllm, fn, *args)

    def _dispatch(self, out) -> None:
        rid = out.request_id
        queue = self._streams.get(rid) or self._pending.get(rid)
        if queue is not None:
            queue.put_nowait(out)

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self.receiver.close()

    def _add(self, rid: str, prompt: list[int], sampling: SamplingParams, extra: dict | None = None):
        from vllm import SamplingParams as VSP
        from vllm.sampling_params import RequestOutputKind

        params = VSP(n=1, max_tokens=sampling.max_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                     top_k=sampling.top_k if sampling.top_k > 0 else 0, seed=sampling.seed,
                     stop_token_ids=list(sampling.stop_token_ids), ignore_eos=sampling.ignore_eos,
                     output_kind=RequestOutputKind.DELTA, detokenize=False,
                     extra_args={"kv_transfer_params": {"microserve": extra}} if extra else None)
        return self._call(self.llm.add_request, rid, {"prompt_token_ids": list(prompt)}, params)

    def _validated(self, req: Request) -> list[int]:
        prompt = req.prompt_ids
        if not prompt:
            raise EngineError("bad_request", "the prompt is empty")
        if len(prompt) + 1 > self.max_model_len:
            raise EngineError("bad_request", f"the prompt has {len(prompt)} tokens; this model's context is "
                              f"{self.max_model_len}")
        vocab = self.llm.model_config.get_vocab_size()
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise EngineError("bad_request", f"prompt token ids must be in [0, {vocab})")
        return prompt

    # -- prep_recv ---------------------------------------------------------------------
    async def prep_recv(self, req: Request, end: int, lease_s: float | None = None) -> RecvTicket:
        from microserve.serving.vllm.connector import Recv

        prompt = self._validated(req)
        end = norm_pos(end, len(prompt), "end")
        end = min(end, len(prompt) - 1)  # vLLM computes at least the last prompt token itself
        lease = self.lease_s if lease_s is None else lease_s
        if not 0 < lease <= 3600:
            raise EngineError("bad_request", f"lease_s must be in (0, 3600], got {lease}")
        rid = req.request_id
        if rid in self._pending or rid in self._streams:
            raise EngineError("bad_request", f"request id {rid!r} is already on this engine")
        loop = asyncio.get_running_loop()
        ticket = _Ticket(f"{self.engine_id}-t{next(self._ids)}", new_secret(), rid, f"{rid}\x00{time.monotonic_ns()}",
                         end)

        def on_alloc(vllm_id: str, matched: int, blocks: list[int]) -> None:  # vLLM's step thread
            loop.call_soon_threadsafe(lambda: ticket.alloc.done() or ticket.alloc.set_result((matched, blocks)))

        recv = Recv(end, on_alloc, revoke=lambda: self.receiver.revoke(ticket.id))
        self.bridge.recvs[ticket.key] = recv
        self._tickets[ticket.id] = ticket
        self._pending[rid] = asyncio.Queue()
        try:
            await self._add(rid, prompt, req.sampling, {"recv": ticket.key})
            self._wake.set()
            matched, blocks = await asyncio.wait_for(ticket.alloc, self.transfer_timeout)
        except BaseException as exc:
            await self._drop(ticket, "could not reserve KV blocks")
            if isinstance(exc, TimeoutError):
                raise EngineError("overloaded", f"vLLM did not reserve KV blocks for {end} tokens within "
                                  f"{self.transfer_timeout}s") from None
            raise
        bs = self.kv_spec.block_size
        addr = KVAddr(self.engine_id, self.receiver.endpoint, ticket.id, ticket.secret, matched, end,
                      blocks[matched // bs: -(-end // bs)], self.kv_spec, self.transports)
        if matched < end:
            recv.writing = True
            self._keys[ticket.id] = ticket.key
            self.receiver.open_ticket(ticket.id, ticket.secret, addr.block_ids, self._on_transfer_threadsafe)
        else:
            ticket.done.set()
        ticket.expiry = loop.call_later(lease, self._expire, ticket.id)
        return RecvTicket(addr, matched)

    def _on_transfer_threadsafe(self, outcome: TransferOutcome) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._on_transfer, outcome)

    def _on_transfer(self, outcome: TransferOutcome) -> None:
        key = self._keys.pop(outcome.ticket_id, None)
        ticket = self._tickets.get(outcome.ticket_id)
        recv = self.bridge.recvs.get(key) if key else None
        if ticket is not None and outcome.ok:
            ticket.nbytes = outcome.nbytes
            self.bridge.recv_done(key)  # vLLM schedules the request with the received pages
        elif recv is not None and recv.aborted:
            self.bridge.recv_done(key)  # vLLM kept the blocks for the writer, which stopped: free them
        else:
            # NOTE: never report a failed receive as done: vLLM would cache the garbage pages as
            # this prompt's prefix. Aborting the request frees them; start_generate recomputes.
            with self.bridge.lock:
                if recv is not None:
                    recv.writing = False
            if ticket is not None:
                ticket.error = ticket.error or outcome.error or "transfer failed"
                self._spawn(self._abort_vllm(ticket.request_id))
        if ticket is not None:
            ticket.done.set()
        self._wake.set()

    def _expire(self, ticket_id: str) -> None:
        ticket = self._tickets.get(ticket_id)
        if ticket is not None and ticket.request_id not in self._streams:
            self._spawn(self._drop(ticket, "lease expired"))

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drop(self, ticket: _Ticket, why: str) -> None:
        """Give a ticket's blocks back to vLLM (its request is aborted there)."""
        ticket.error = ticket.error or why
        self._tickets.pop(ticket.id, None)
        if ticket.expiry is not None:
            ticket.expiry.cancel()
        self.receiver.revoke(ticket.id)  # a writer in flight stops; vLLM keeps the blocks until it did
        await self._abort_vllm(ticket.request_id)
        outputs, _ = await self._call(self._step)  # vLLM frees them in its next step: take it now
        for out in outputs:
            self._dispatch(out)
        queue = self._pending.pop(ticket.request_id, None)
        if queue is not None:
            queue.put_nowait(None)
        ticket.done.set()

    async def _abort_vllm(self, rid: str) -> None:
        await self._call(self.llm.abort_request, [rid])
        self._wake.set()

    # -- remote_send -------------------------------------------------------------------
    async def remote_send(self, req: Request, kv: KVAddr, begin: int, end: int,
                          transport: str | None = None) -> SendResult:
        from microserve.serving.vllm.connector import Send

        prompt = self._validated(req)
        begin, end, mode = check_send(self.kv_spec, kv, begin, end, len(prompt),
                                      lambda: choose_transport(self.transports, kv, transport))
        if begin >= end:
            return SendResult(0, 0.0, mode)
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        bridge = self.bridge

        def start(blocks: list[int]) -> None:  # vLLM's step thread, when the prefill finished
            vllm_id = send.request_id

            def push() -> None:
                try:
                    stats = self.sender.send(kv, begin, end, lambda: blocks, mode)
                    result: object = stats
                except (TransferError, KVSpecMismatch) as exc:
                    result = exc
                finally:
                    bridge.send_done(vllm_id)
                    loop.call_soon_threadsafe(self._wake.set)
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result(result))

            self._send_pool.submit(push)

        send = Send(start)
        rid = f"{req.request_id}\x00send\x00{kv.ticket_id}"
        key = f"{rid}\x00{time.monotonic_ns()}"
        bridge.sends[key] = send
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = queue
        self._sends_active += 1
        t0 = loop.time()
        try:
            await self._add(rid, prompt[:end], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
                            {"send": key})
            self._wake.set()
            cached = 0
            while True:
                out = await queue.get()
                cached = out.num_cached_tokens or cached
                if out.finished:
                    break
            if key in bridge.sends:  # finished without a prefill to send (aborted)
                bridge.sends.pop(key, None)
                raise EngineError("aborted", f"the send of {req.request_id!r} was aborted")
            result = await done
        except asyncio.CancelledError:
            bridge.sends.pop(key, None)
            await self._abort_vllm(rid)
            raise
        finally:
            self._streams.pop(rid, None)
            self._sends_active -= 1
        if isinstance(result, TransferError):
            raise EngineError(result.code, str(result))
        if isinstance(result, Exception):
            raise EngineError("kv_spec_mismatch", str(result))
        self._computed += end - cached
        return SendResult(result.nbytes, loop.time() - t0, result.transport, end - cached)

    # -- start_generate ----------------------------------------------------------------
    async def start_generate(self, req: Request, begin: int = 0,
                             sampling: SamplingParams | None = None) -> AsyncIterator[GenerateChunk]:
        prompt = self._validated(req)
        norm_pos(begin, len(prompt), "begin")
        rid = req.request_id
        if rid in self._streams:
            raise EngineError("bad_request", f"request id {rid!r} is already generating on this engine")
        ticket = next((t for t in self._tickets.values() if t.request_id == rid), None)
        queue = self._pending.pop(rid, None)
        if ticket is not None:
            if sampling is not None and sampling != req.sampling:
                raise EngineError("bad_request", "the vLLM backend starts a received request with the sampling "
                                  "parameters given to prep_recv; pass the same ones to start_generate")
            try:
                await asyncio.wait_for(ticket.done.wait(), self.transfer_timeout)
            except TimeoutError:
                await self._drop(ticket, "timed out waiting for the KV transfer")
                raise EngineError("timeout", f"KV for {rid!r} did not arrive within {self.transfer_timeout}s") \
                    from None
            self._tickets.pop(ticket.id, None)
            if ticket.expiry is not None:
                ticket.expiry.cancel()
            if ticket.error:  # the pages did not arrive: compute the prompt here
                log.warning("request %s: KV transfer failed (%s); computing the prompt here", rid, ticket.error)
                queue = None
        if queue is None:
            queue = asyncio.Queue()
            self._streams[rid] = queue
            try:
                await self._add(rid, prompt, sampling or req.sampling)
            except BaseException:
                self._streams.pop(rid, None)
                raise
            self._wake.set()
        else:
            self._streams[rid] = queue
        return self._stream(rid, queue, len(prompt))

    async def _stream(self, rid: str, queue: asyncio.Queue, prompt_len: int) -> AsyncIterator[GenerateChunk]:
        finished, counted = False, False
        try:
            cached = 0
            while not finished:
                tokens: list[int] = []
                reason = None
                while reason is None and (not tokens or not queue.empty()):
                    out = await queue.get()
                    if out is None:  # its receive was dropped before it started here
                        raise EngineError("aborted", f"request {rid!r} was aborted")
                    if out is _ABORTED:
                        reason = "abort"
                        break
                    tokens += out.outputs[0].token_ids
                    cached = out.num_cached_tokens or cached
                    if out.finished:
                        reason = out.outputs[0].finish_reason or "abort"
                if not counted:
                    self._cached += cached
                    self._computed += prompt_len - cached
                    counted = True
                self._computed += len(tokens)
                finished = reason is not None
                yield GenerateChunk(tokens, reason, cached)
        finally:
            self._streams.pop(rid, None)
            if not finished:
                await self.abort(rid)

    # -- abort / stats -----------------------------------------------------------------
    async def abort(self, request_id: str) -> bool:
        found = False
        for ticket in [t for t in self._tickets.values() if t.request_id == request_id]:
            await self._drop(ticket, "aborted")
            found = True
        sends = [rid for rid in self._streams if rid.startswith(f"{request_id}\x00send\x00")]
        for rid in [request_id, *sends]:
            queue = self._streams.get(rid) or self._pending.pop(rid, None)
            if queue is not None:
                await self._abort_vllm(rid)
                if rid == request_id:  # vLLM sends no output for an abort: end the stream here
                    queue.put_nowait(_ABORTED)
                found = True
        return found

    async def cached_prefix_hashes(self, before=None) -> list[int]:
        if before is not None:
            before()
        return []  # vLLM's block hashes are not ours: cache-aware routing sees no vLLM cache

    def stats(self) -> StatsReply:
        s = self.scheduler
        pool = s.kv_cache_manager.block_pool
        total = pool.num_gpu_blocks - 1  # block 0 is vLLM's null block
        free = pool.get_num_free_blocks()
        running, waiting = len(s.running), len(s.waiting)
        queued = sum(r.num_tokens - r.num_computed_tokens for r in list(s.running) + list(s.waiting))
        cached = sum(1 for b in pool.blocks if b.block_hash is not None and b.ref_cnt == 0) \
            if hasattr(pool, "blocks") else 0
        return StatsReply(self.engine_id, running, waiting, queued, total, total - free, cached, self._cached,
                          self._computed, 0, len(self._tickets), self._sends_active, self.sender.bytes_sent,
                          self.receiver.bytes_received)


def _layer_index(name: str) -> int:
    m = re.search(r"\.(\d+)\.", name)
    return int(m.group(1)) if m else 0
