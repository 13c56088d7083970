"""`Backend`: what an engine provides to the call layer (`serving.base.EngineService`).

The service owns every call (`prep_recv`, `remote_send`, `start_generate`, `abort`, `stats`,
`health`, `kv_snapshot`): position and lease checks, tickets and their leases, signed
`KVAddr`s, streams with abort-on-exit, the step loop. It holds one `Backend` and asks it for
what differs between engines: how a step runs, how blocks are held, how KV bytes move. Every
method is abstract: a backend that misses one fails when it is constructed (`TypeError`),
never later by leaking blocks. The contract comes in five groups, one class each, that `Backend`
joins: `Stepping` (the step loop), `Receiving` (tickets, lent ranges), `Sending` (`remote_send`),
`Generating` (`start_generate`, `abort`) and `Books` (stats, adapters, keys, shutdown).

Three backends: `serving.builtin.BuiltinBackend` (our engine, KV through `kvapi.transfer`),
`serving.vllm.engine.VLLMBackend` (an in-process vLLM engine) and `sim.service.SimBackend`
(virtual time); the first and the last share `serving.core.CoreBackend` (an `EngineCore`'s
books), the first two `serving.kv_plane.PlaneTransfers` (the transfer methods over a `KVPlane`).

Every method runs on the service's asyncio loop. A backend whose step runs in another thread
touches engine state only under `service.lock` (the service steps under it). What a backend
may use of its service: `tickets`, `lock`, `wake()`, `deliver(out)`, `leases.transfer_done(outcome)`
(from any thread), `leases.close(ticket, why)`, `events`, `hold`, `streaming(request_id)`.
Errors: raise `serving.api.EngineError` with an `ErrorCode`, or `kvapi.transfer.TransferError`
from a send (the service converts it once).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvapi.spec import KVSpec
    from kvapi.transfer import KVAddr
    from microserve import protocol
    from microserve.engine.core.engine_core import EngineStats, StepOutput
    from microserve.sampling_params import SamplingParams
    from microserve.serving.base import EngineService
    from microserve.serving.tickets import Ticket


class Stepping(ABC):
    """The step loop's part of the contract (`EngineService.run`)."""

    @abstractmethod
    def has_work(self) -> bool:
        """Whether `step` has anything to do (the loop sleeps until a wake when not)."""

    @abstractmethod
    async def step(self) -> list[StepOutput]:
        """Run one engine step; its outputs, which the service hands to `deliver`."""

    @abstractmethod
    def fail_running(self) -> list[StepOutput]:
        """`step` raised: end every running request (outputs with finish reason `Finish.ERROR`)."""

    @abstractmethod
    def take_output(self, out: StepOutput) -> bool:
        """Whether an output belongs to the backend itself (a send's prefill, a received request
        not yet started), which then took it; False: it goes to the request's stream."""


class Receiving(ABC):
    """Receiving KV: `prep_recv` (tickets) and DistAttention's `lend` / `attend` (ranges lent out)."""

    @abstractmethod
    async def reserve(self, req: protocol.Request, prompt: list[int], end: int) -> Ticket:
        """Hold blocks for `prompt[:end]` (a cached prefix counts as matched) and open a ticket in
        `service.tickets`. Called by `prep_recv`. Raises EngineError OVERLOADED (no blocks),
        BAD_REQUEST."""

    @abstractmethod
    def recv_addr(self, ticket: Ticket) -> KVAddr:
        """Where senders write into `ticket` (unsigned: the service signs and dates it)."""

    @abstractmethod
    def open_receive(self, ticket: Ticket, addr: KVAddr) -> None:
        """Accept KV into `ticket` (only when something is missing); the outcome comes back
        through `service.leases.transfer_done`."""

    @abstractmethod
    def receiving(self, ticket_id: str) -> bool:
        """Whether a transfer is writing into the ticket now (its lease then holds)."""

    @abstractmethod
    def revoke(self, ticket_id: str) -> bool:
        """Refuse further writes into the ticket. False while a transfer still writes: it stops
        and reports through `service.leases.transfer_done`, and the ticket is released then."""

    @abstractmethod
    async def received(self, ticket: Ticket, outcome: Any, complete: bool) -> None:
        """A transfer into the ticket ended (a `kvapi.transfer.TransferOutcome`). `complete`: all of
        its KV arrived and the ticket completes; else the service releases it next."""

    @abstractmethod
    async def release_ticket(self, ticket: Ticket) -> None:
        """Give back the blocks of a ticket nobody adopted (its state is still "open" if its KV
        never arrived completely: those pages are garbage). Called once per ticket."""

    @abstractmethod
    def orphan_transfer(self, outcome: Any) -> None:
        """A transfer reported into a ticket that is gone (closed while it wrote)."""

    @abstractmethod
    async def lend_blocks(self, req: protocol.Request, begin: int, end: int) -> Ticket:
        """Hold blocks for positions `[begin, end)` (block aligned) of a request another engine runs,
        outside the prefix cache, and open a ticket with `lent=True` and `matched=begin` in
        `service.tickets`. Called by `lend`. Raises EngineError OVERLOADED, or BAD_REQUEST naming
        the call in a backend that does not lend."""

    @abstractmethod
    def attend_range(self, groups: list[tuple[list[Ticket] | None, int]], layer: int, positions: list[int],
                     q: bytes, scale: float) -> tuple[bytes, bytes]:
        """The parts of attention over complete lent tickets' ranges for these query rows: `groups` are
        `(tickets, rows)` per request in row order (its tickets merged into one part; None: a request
        that failed its checks, whose rows get out 0 and lse -inf). Returns (out, lse) as `AttendReply`
        carries them. Blocking, on a thread (the lender's attend thread, or off the loop): it reads only
        the lent blocks. Called by `attend` (tickets and secrets checked). Raises EngineError BAD_REQUEST
        (shapes), or naming the call in a backend that does not lend."""


class Sending(ABC):
    """Sending KV: `remote_send`."""

    @abstractmethod
    def transport_for(self, kv: KVAddr, forced: str | None) -> str:
        """The transport a send into `kv` uses (`forced`: the caller's choice). Raises
        TransferError / EngineError BAD_REQUEST when none fits."""

    @abstractmethod
    async def send(self, job_id: str, request_id: str, prompt: list[int], kv: KVAddr, begin: int, end: int,
                   mode: str, lora: str | None = None) -> tuple[int, str, int]:
        """Prefill `prompt` (= the request's `prompt[:end]`) here, under the LoRA adapter `lora` (None: the
        base model), and write `[begin, end)` into `kv`.
        Returns (bytes, transport, tokens prefilled). Raises TransferError, EngineError ABORTED
        (after `abort_send`)."""

    @abstractmethod
    async def abort_send(self, job_id: str) -> None:
        """Stop a send in flight (its `send` then raises)."""


class Generating(ABC):
    """Generating: `start_generate` and `abort`."""

    @abstractmethod
    def check_adoption(self, req: protocol.Request, sampling: SamplingParams) -> None:
        """Refuse (EngineError BAD_REQUEST) to start `req` with `sampling` on its ticket's KV."""

    @abstractmethod
    def borrow(self, req: protocol.Request, lenders: list[protocol.LendTicket]) -> list:
        """The engine's view of the ranges `lenders` hold for `req` (DistAttention: `LentRange`s whose
        peers write to and attend on each lender), for `submit`. Raises EngineError BAD_REQUEST naming
        `start_generate(lenders=...)` in a backend that does not borrow."""

    @abstractmethod
    async def submit(self, req: protocol.Request, prompt: list[int], begin: int, sampling: SamplingParams,
                     ticket: Ticket | None, lent: list | None = None) -> None:
        """Start generating `req`, adopting `ticket`'s blocks when it is complete (the service has
        taken it out of `service.tickets`), with the ranges `lent` on lenders (`borrow`); outputs go
        through `step`. Raises EngineError BAD_REQUEST."""

    @abstractmethod
    async def abort_request(self, request_id: str) -> bool:
        """Cancel the request in the engine (queued, running or received); whether it was there."""


class Books(ABC):
    """What the engine reports (`stats`, `health`, `kv_snapshot`), adapters (`lora`), keys, shutdown."""

    @abstractmethod
    def check_prompt(self, prompt: list[int], whole: bool = True) -> None:
        """Raise `text.InvalidRequestError` for a prompt this engine cannot take (`whole=False`: only part
        of its KV will be here, a lent range or a borrower's own ranges: token ids and context only)."""

    @abstractmethod
    def engine_stats(self) -> EngineStats:
        """Running, waiting, KV blocks, prefix hits, computed tokens (for `stats`)."""

    @abstractmethod
    def cached_hashes(self) -> list[int]:
        """Block hashes of the prefix cache (for `kv_snapshot`, under `service.lock`)."""

    @abstractmethod
    def kv_bytes(self) -> tuple[int, int]:
        """(bytes sent, bytes received) so far."""

    @abstractmethod
    def store_stats(self) -> list[protocol.StoreTierStats]:
        """Per KV-store tier: hits, bytes (empty without `--kv-store`)."""

    @abstractmethod
    async def load_lora(self, name: str, path: str) -> list[str]:
        """Load the PEFT adapter folder `path` as `name` (for `lora`); returns the adapters loaded.
        Raises EngineError BAD_REQUEST (adapters off, a bad folder or rank, no free slot, a name in use)."""

    @abstractmethod
    async def unload_lora(self, name: str) -> list[str]:
        """Unload adapter `name` (for `lora`); returns the adapters left. Raises EngineError
        BAD_REQUEST (unknown, or requests still run under it)."""

    @abstractmethod
    def use_kv_key(self, key: bytes) -> None:
        """The cluster's KV key: refuse unsigned `KVAddr`s in sends (the service signs its own)."""

    @abstractmethod
    def close(self) -> None:
        """Shut down: stop sends, close sockets and threads."""


class Backend(Stepping, Receiving, Sending, Generating, Books):
    """One engine under the call layer. Set by the backend's constructor: `engine_id`,
    `kv_spec`, `max_model_len`, `vocab_size`, `model_name`, `transports` (KV transports it
    offers, fastest first); `idle_poll_s`: step again after this long when a busy step produced
    nothing (a backend whose requests wait on pages it cannot see arrive), None: wait for a wake."""

    engine_id: str
    kv_spec: KVSpec
    max_model_len: int
    vocab_size: int
    model_name: str = ""
    transports: list[str]
    idle_poll_s: float | None = None
    service: EngineService  # set by the service that holds this backend (`bind`)

    def bind(self, service: EngineService) -> None:
        self.service = service
