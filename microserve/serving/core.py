"""`CoreBackend`: the `Backend` methods over an `EngineCore` (our own scheduler and KV books),
shared by the built-in engine (`serving.builtin`) and the simulated one (`sim.service`).

    reserve         Sequence prompt[:end]: pinned cached prefix [0, matched) + reserved [matched, end)
    send            SendJob: a prefill-only Sequence prompt[:end] through the normal scheduler;
                    `_push` (the backend) moves [begin, end) as its layers are computed
    submit          adopts a complete ticket's blocks (`EngineCore.adopt`) or queues a new request
    _extend_from_store   before each of the three prefills: the prompt's longest stored continuation
                    of its cached prefix is loaded into fresh blocks (off the step) and enters the cache

What differs between the two backends is only how a step runs (`step`) and how KV bytes
move (`recv_addr`, `open_receive`, `push`, ...): those stay abstract here.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING

from kvapi.radix import namespace_seed
from kvapi.transfer import KVAddr, TransferError
from microserve import protocol, tracing
from microserve.engine.core.engine_core import EngineCore, EngineStats, InvalidRequestError, StepOutput
from microserve.engine.core.sequence import Finish, Sequence
from microserve.sampling_params import SamplingParams
from microserve.serving.api import EngineError, ErrorCode
from microserve.serving.backend import Backend
from microserve.serving.streams import prompt_steps
from microserve.serving.tickets import SendJob, Ticket, TicketState
from microserve.text import check_prompt

if TYPE_CHECKING:  # NOTE: torch-free here (the simulator runs these hooks)
    from microserve.serving.kv_store import StoreLink


class CoreBackend(Backend):
    """A backend over one `EngineCore`.

    Args:
        engine: the engine's books and step.
        engine_id: names its tickets, events and errors.
        transports: the KV transports it offers, fastest first.
    """

    def __init__(self, engine: EngineCore, engine_id: str, transports: list[str]) -> None:
        self.engine, self.engine_id, self.transports = engine, engine_id, list(transports)
        self.kv_spec, self.max_model_len, self.vocab_size = engine.kv_spec, engine.max_model_len, engine.vocab_size
        self._jobs: dict[str, SendJob] = {}
        self.store: StoreLink | None = None  # --kv-store tiers (`use_store`)

    def bind(self, service) -> None:
        super().bind(service)
        service.hold.interval = self.engine.config.stream_interval
        self.engine.set_kv_event_hook(service.on_kv_event)

    def use_store(self, store: StoreLink) -> None:
        """Load prompts' stored continuations from `store` and write newly cached blocks to it."""
        self.store = store
        self.engine.set_store_hook(store.capture)

    def store_stats(self) -> list[protocol.StoreTierStats]:
        return self.store.stats() if self.store is not None else []

    async def _extend_from_store(self, prompt: list[int], limit: int, seed: int = 0) -> None:
        """Before a prefill of `prompt[:limit]`: load the longest stored continuation of its cached
        prefix into fresh blocks, off the step loop, and put them in the prefix cache. Whatever goes
        wrong (a tier down, no free blocks, a corrupt entry) ends the load there: the rest is computed."""
        engine, store = self.engine, self.store
        if store is None or not engine.kv.enable_prefix_caching:
            return
        limit = min(limit, len(prompt))
        async with self.service.lock:
            prefix = engine.kv.pin_prefix(prompt[:limit], seed)
        fresh: list[int] = []
        ok = 0
        try:
            hashes, segments = await store.lookup(prompt[:limit], len(prefix), seed)
            found = sum(n for _, n in segments)
            if found:
                bs = engine.block_size
                tiers = store.stats() if tracing.enabled() else []
                with tracing.span("engine.store_load", tokens=found * bs,
                                  tiers=",".join(f"{tiers[i].tier}:{n * bs}" for i, n in segments if i < len(tiers))
                                  ) as span:
                    async with self.service.lock:
                        fresh = engine.kv.take_blocks(found) or []
                    if fresh:
                        ok = await store.load(hashes[:found], segments, fresh)
                    tracing.set_attrs(span, loaded_tokens=ok * bs)
        finally:
            async with self.service.lock:
                engine.kv.insert_loaded(prompt, prefix, fresh, ok, seed)

    # -- what the backend provides ----------------------------------------------------------
    def new_job(self, job_id: str, request_id: str, prompt: list[int], lora: str | None = None) -> SendJob:
        """The books of one send (the simulator's wait on the loop)."""
        return SendJob(job_id, request_id, prompt, self.kv_spec.num_layers, lora)

    @abstractmethod
    async def push(self, job: SendJob, kv: KVAddr, begin: int, end: int, mode: str) -> tuple[int, str]:
        """Move `[begin, end)` of `job`'s KV into `kv` as its layers are computed: (bytes, transport)."""

    # -- the step ----------------------------------------------------------------------------
    def has_work(self) -> bool:
        return self.engine.has_unfinished()

    def fail_running(self) -> list[StepOutput]:
        return self.engine.fail_running()

    def take_output(self, out: StepOutput) -> bool:
        job = self._jobs.get(out.request_id)
        if job is None:
            return False
        if out.finish_reason == Finish.PREFILLED:
            job.prefilled()
        else:
            job.cancel(f"the sender's prefill ended with {out.finish_reason!r}")
        return True

    def close(self) -> None:
        for job in self._jobs.values():
            job.cancel("engine shutting down")
        if self.store is not None:
            self.store.close()

    # -- receiving -----------------------------------------------------------------------------
    async def reserve(self, req: protocol.Request, prompt: list[int], end: int) -> Ticket:
        seq = Sequence(req.request_id, prompt[:end], SamplingParams(max_tokens=1, lora=req.sampling.lora))
        await self._extend_from_store(prompt, end, seq.cache_seed)  # NOTE: stored KV counts as matched: senders skip it
        async with self.service.lock:
            if not self.engine.reserve(seq, end):
                raise EngineError(ErrorCode.OVERLOADED, f"not enough free KV blocks to receive {end} tokens")
        matched = seq.num_computed_tokens
        blocks = seq.block_table[matched // self.engine.block_size:]
        return self.service.tickets.open(req.request_id, matched, end, blocks, seq)

    async def lend_blocks(self, req: protocol.Request, begin: int, end: int) -> Ticket:
        n = -(-(end - begin) // self.engine.block_size)
        async with self.service.lock:
            blocks = self.engine.lend_blocks(n)
        if blocks is None:
            raise EngineError(ErrorCode.OVERLOADED, f"not enough free KV blocks to lend {end - begin} tokens")
        return self.service.tickets.open(req.request_id, begin, end, blocks, lent=True)

    async def received(self, ticket: Ticket, outcome, complete: bool) -> None:
        if complete and not ticket.lent:
            async with self.service.lock:
                self.engine.mark_received(ticket.hold, outcome.end)  # received KV enters our prefix cache

    async def release_ticket(self, ticket: Ticket) -> None:
        async with self.service.lock:
            if ticket.lent:  # NOTE: never cached: the blocks go straight back to the pool
                self.engine.return_blocks(ticket.blocks)
                return
            valid = ticket.matched if ticket.state is TicketState.OPEN else ticket.hold.num_computed_tokens
            self.engine.drop_received(ticket.hold, valid)  # partial pages are garbage

    # -- sending ---------------------------------------------------------------------------------
    def orphan_transfer(self, outcome) -> None:
        pass  # NOTE: the writer stopped before its ticket's blocks were released (`revoke` waits for it)

    async def send(self, job_id: str, request_id: str, prompt: list[int], kv: KVAddr, begin: int, end: int,
                   mode: str, lora: str | None = None) -> tuple[int, str, int]:
        job = self.new_job(job_id, request_id, prompt, lora)
        self._jobs[job_id] = job
        try:
            await self._extend_from_store(prompt, end, job.seq.cache_seed)
            async with self.service.lock:
                matched = self.engine.match_cached(job.seq, end)
                if matched < end:
                    self.engine.add_sequence(job.seq)
                    job.scheduled = True
                else:
                    job.prefilled()
            self.service.wake()
            try:
                nbytes, used = await self.push(job, kv, begin, end, mode)
            except TransferError:
                job.cancel("the transfer failed")
                raise
            finally:
                await self._finish_send(job)
                if tracing.enabled():
                    prompt_steps(job.seq.chunks)  # NOTE: the prefill behind this send, step by step
        finally:
            self._jobs.pop(job_id, None)
        if job.cancel_reason:
            raise EngineError(ErrorCode.ABORTED, job.cancel_reason)
        return nbytes, used, end - matched

    async def _finish_send(self, job: SendJob) -> None:
        seq = job.seq
        async with self.service.lock:
            if not job.scheduled or seq.finish_reason == Finish.PREFILLED:  # blocks held outside the scheduler
                self.engine.release(seq)
            elif not seq.is_finished:
                self.engine.abort(seq.request_id)

    async def abort_send(self, job_id: str) -> None:
        job = self._jobs.get(job_id)
        if job is not None:
            job.cancel("aborted")

    # -- generating --------------------------------------------------------------------------------
    async def submit(self, req: protocol.Request, prompt: list[int], begin: int, sampling: SamplingParams,
                      ticket: Ticket | None, lent: list | None = None) -> None:
        held = getattr(getattr(ticket, "hold", None), "sampling", None)
        if held is not None and held.lora != sampling.lora:  # NOTE: KV of one adapter never serves another
            raise EngineError(ErrorCode.BAD_REQUEST, f"the received KV was computed under LoRA adapter "
                              f"{held.lora!r}, not {sampling.lora!r}")
        if ticket is None or ticket.state is not TicketState.COMPLETE:
            await self._extend_from_store(prompt, len(prompt) - 1, namespace_seed(sampling.lora))
        async with self.service.lock:
            seq = None
            if ticket is not None and ticket.state is TicketState.COMPLETE:
                # NOTE: prompt logprobs need the whole prompt computed here: the received KV is let go
                start = 0 if sampling.prompt_logprobs is not None else begin
                seq = self.engine.adopt(ticket.hold, prompt, start, sampling)
            try:
                if seq is not None:
                    self.engine.add_sequence(seq)
                else:
                    self.engine.add_request(req.request_id, prompt, sampling, lent)
            except InvalidRequestError as exc:
                if seq is not None:
                    self.engine.release(seq)
                raise EngineError(ErrorCode.BAD_REQUEST, str(exc)) from exc

    def check_adoption(self, req: protocol.Request, sampling: SamplingParams) -> None:
        pass  # NOTE: any sampling may continue from received KV (prompt logprobs recompute it)

    async def abort_request(self, request_id: str) -> bool:
        async with self.service.lock:
            return self.engine.abort(request_id)

    # -- books ---------------------------------------------------------------------------------------
    def engine_stats(self) -> EngineStats:
        return self.engine.stats()

    def cached_hashes(self) -> list[int]:
        return self.engine.cached_prefix_hashes()

    def check_prompt(self, prompt: list[int], whole: bool = True) -> None:
        if whole:
            self.engine.validate_prompt(prompt)
        else:
            check_prompt(prompt, self.engine.vocab_size, self.engine.max_model_len)
