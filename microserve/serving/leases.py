"""`TicketLeases`: the life of an engine's tickets, for its `EngineService` (serving/base.py).

    issue        a new ticket's signed, dated `KVAddr`; its receive opened, its lease timer started
    transfer_done / on_transfer   a transfer into a ticket ended: complete it, or drop it
    expiry       an unused ticket's lease ends: closed (a transfer still writing keeps it; a lent range
                 in use renews on every attend)
    close / drop a writer still in flight is revoked first; the blocks go back through the backend

Backends report through `service.leases.transfer_done` (any thread) and close tickets they cannot
serve with `service.leases.close`.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import msgspec

from kvapi.transfer import KVAddr
from kvapi.transfer.base import sign_addr
from microserve import tracing
from microserve.serving.api import EngineError, ErrorCode
from microserve.serving.tickets import Ticket, TicketState

if TYPE_CHECKING:
    from microserve.serving.base import EngineService


class TicketLeases:
    """Addresses, leases and transfer outcomes of one service's tickets (`service.tickets`)."""

    def __init__(self, service: EngineService) -> None:
        self.service = service

    def check(self, lease_s: float | None) -> float:
        lease = self.service.lease_s if lease_s is None else lease_s
        if not 0 < lease <= self.service.max_lease_s:
            raise EngineError(ErrorCode.BAD_REQUEST, f"lease_s must be in (0, {self.service.max_lease_s:g}] "
                              f"(this engine's --max-lease-seconds), got {lease}")
        return lease

    async def issue(self, ticket: Ticket, lease: float) -> KVAddr:
        """A new ticket's signed, dated address, its receive opened and its lease started."""
        if self.service.aborted.recent(ticket.request_id):  # aborted while we reserved: give the blocks back now
            await self.drop(ticket)
            self.service.aborted.check(ticket.request_id)
        ticket.expires_at, ticket.lease = time.time() + lease, lease
        service = self.service
        addr = msgspec.structs.replace(service.backend.recv_addr(ticket), expiry=ticket.expires_at,
                                       model=service.model_id)
        if self.service.kv_sign_key is not None:
            addr = sign_addr(addr, self.service.kv_sign_key)
        if ticket.matched < ticket.end:
            self.service.backend.open_receive(ticket, addr)
        else:
            ticket.complete()
        ticket.expiry = asyncio.get_running_loop().call_later(lease, self._expire, ticket.id)
        return addr

    def transfer_done(self, outcome: Any) -> None:
        """A transfer into one of our tickets ended (a `kvapi.transfer.TransferOutcome`; any thread)."""
        loop = self.service._loop or asyncio.get_running_loop()
        loop.call_soon_threadsafe(lambda: self.service._spawn(self.on_transfer(outcome)))

    async def on_transfer(self, outcome: Any) -> None:
        """As `transfer_done`, on the loop."""
        ticket = self.service.tickets.get(outcome.ticket_id)
        if ticket is None:
            self.service.backend.orphan_transfer(outcome)
            return
        complete = outcome.ok and ticket.state is TicketState.OPEN
        if ticket.trace:  # NOTE: the receiver's side of the transfer, under the prep_recv that opened it
            now = time.time_ns()
            tracing.record("engine.kv_receive", now - int(outcome.seconds * 1e9), now, parent=ticket.trace,
                           bytes=outcome.nbytes, tokens=outcome.end - outcome.begin, ok=outcome.ok,
                           error=outcome.error or None)
        await self.service.backend.received(ticket, outcome, complete)
        if complete:
            ticket.complete(outcome.nbytes)
            return
        ticket.error = ticket.error or outcome.error or "transfer failed"
        await self.drop(ticket)

    def _expire(self, ticket_id: str) -> None:
        ticket = self.service.tickets.get(ticket_id)
        if ticket is None:
            return
        if ticket.state is TicketState.OPEN and self.service.backend.receiving(ticket_id):  # in use: the lease holds
            ticket.expiry = asyncio.get_running_loop().call_later(1.0, self._expire, ticket_id)
            return
        left = ticket.used_at + ticket.lease - time.monotonic()
        if ticket.lent and left > 0:  # NOTE: a lent range in use lives on: each attend renews its lease
            ticket.expiry = asyncio.get_running_loop().call_later(left, self._expire, ticket_id)
            return
        self.service._spawn(self.close(ticket, "lease expired"))

    async def close(self, ticket: Ticket, why: str) -> None:
        """Give back a ticket's blocks; a transfer writing into it is stopped first."""
        if ticket.state is TicketState.OPEN and not self.service.backend.revoke(ticket.id):
            ticket.error = why  # the writer stops and reports through on_transfer
            return
        ticket.error = ticket.error or why
        await self.drop(ticket)

    async def drop(self, ticket: Ticket) -> None:
        """Forget a ticket: its blocks go back to the engine (if it held any), its waiters wake."""
        self.service.tickets.remove(ticket)
        if ticket.state in (TicketState.OPEN, TicketState.COMPLETE):
            await self.service.backend.release_ticket(ticket)
            ticket.state = TicketState.FAILED if ticket.state is TicketState.OPEN else TicketState.CLOSED
        ticket.done.set()
