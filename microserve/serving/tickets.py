"""Books of the microserving calls on one engine, every backend: receive tickets and send jobs.

    Ticket (receiver):  blocks held = | pinned prefix [0, matched) | reserved [matched, end) |
                        state: open ──transfer ok──> complete ──start_generate──> (adopted)
                                 └─expired/aborted/failed──> failed/closed (blocks released)
    SendJob (sender):   a prefill-only Sequence of prompt[:end]; the sending thread waits on
                        `wait_layer(l)`, released layer by layer by the step that completes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from kvapi.spec import KVSpec, KVSpecMismatch
from kvapi.transfer import KVAddr, TransferError
from microserve.engine.core.sequence import Sequence
from microserve.sampling_params import SamplingParams
from microserve.serving.api import EngineError, ErrorCode

log = logging.getLogger(__name__)

ARRIVAL_GRACE_S = 2.0  # how long `attend` waits for a lent range's KV whose write is ending


def norm_pos(pos: int, n: int, what: str) -> int:
    """A prompt position (negative: from the end) checked against a prompt of `n` tokens."""
    p = pos + n if pos < 0 else pos
    if not 0 <= p <= n:
        raise EngineError(ErrorCode.BAD_REQUEST, f"{what}={pos} is outside the prompt of {n} tokens")
    return p


def model_identity(model: str) -> str:
    """How a `KVAddr` names its engine's model: the checkpoint's fingerprint when `model` is a folder
    (the same on every host that has a copy, whatever its path), else the name as given."""
    if (Path(model) / "config.json").is_file():
        from microserve.engine.model.loader import checkpoint_fingerprint

        return checkpoint_fingerprint(model)
    return model


def check_send(spec: KVSpec, kv: KVAddr, begin: int, end: int, n: int,
               pick: Callable[[], str], model: str = "") -> tuple[int, int, str]:
    """`remote_send`'s checks, whatever the backend: positions, model, KV spec, transport (`pick()`),
    and the range against the receiver's ticket. Returns (begin, end, transport)."""
    begin, end = norm_pos(begin, n, "begin"), norm_pos(end, n, "end")
    if model and kv.model and kv.model != model:  # NOTE: same shapes, other weights: the KV would be garbage
        raise EngineError(ErrorCode.KV_SPEC_MISMATCH, f"{kv.engine_id} serves another model (fingerprint "
                          f"{kv.model[:12]}, this engine's {model[:12]}): KV of one model is never sent to another's")
    try:
        spec.check_compatible(kv.spec)
        mode = pick()
    except KVSpecMismatch as exc:
        raise EngineError(ErrorCode.KV_SPEC_MISMATCH, str(exc)) from exc
    except TransferError as exc:
        raise EngineError(exc.code, str(exc), exc.peer) from exc
    begin = max(begin, kv.begin)
    if begin > kv.begin or end > kv.end:
        raise EngineError(ErrorCode.BAD_REQUEST, f"[{begin}, {end}) does not match the ticket's "
                          f"[{kv.begin}, {kv.end}): send from the receiver's `matched` up to at most the ticket's end")
    return begin, end, mode


class TicketState(StrEnum):
    OPEN = "open"  # blocks held, KV (still) expected
    COMPLETE = "complete"  # all KV arrived: start_generate adopts the blocks
    FAILED = "failed"  # released before its KV arrived (expired, aborted, a failed transfer)
    CLOSED = "closed"  # released after its KV arrived (not adopted)


@dataclass(eq=False)
class Ticket:
    """A receive ticket: blocks reserved for `[matched, end)` of one request's prompt.

    `hold` is what the backend keeps the blocks with: the built-in and simulated engines a
    `Sequence` of `prompt[:end]` (pinned prefix + reserved blocks), vLLM its bridge key.
    """

    id: str
    secret: str
    request_id: str
    matched: int
    end: int
    blocks: list[int]  # reserved blocks, for logical blocks matched // bs ..
    hold: Any = None
    state: TicketState = TicketState.OPEN
    done: asyncio.Event = field(default_factory=asyncio.Event)
    error: str = ""
    bytes: int = 0
    expiry: asyncio.TimerHandle | None = None
    expires_at: float = 0.0  # unix time the lease ends (signed into the KVAddr)
    lent: bool = False  # held for another engine's request (`lend`): never adopted, never cached
    lease: float = 0.0  # seconds the lease runs from its last renewal
    used_at: float = 0.0  # monotonic time of a lent range's last `attend` (it renews the lease)
    trace: str = ""  # the traceparent of the call that opened it (its KV's arrival is a span under it)

    def complete(self, nbytes: int = 0) -> None:
        self.state, self.bytes = TicketState.COMPLETE, nbytes
        self.done.set()


def lent_now(tickets, ticket_id: str, secret: str) -> Ticket | None:
    """A lent ticket of `tickets` (by id), its secret checked; None while its KV is still arriving.
    Raises NOT_FOUND (ended, aborted, expired), FORBIDDEN (wrong secret), BAD_REQUEST (its KV never came)."""
    ticket = tickets.get(ticket_id)
    if ticket is None or not ticket.lent:
        raise EngineError(ErrorCode.NOT_FOUND, f"no lent ticket {ticket_id!r} here (ended, aborted or expired)")
    if not hmac.compare_digest(ticket.secret, secret):
        raise EngineError(ErrorCode.FORBIDDEN, "wrong secret for the lent ticket")
    if ticket.state is TicketState.OPEN:
        return None
    if ticket.state is not TicketState.COMPLETE:
        raise EngineError(ErrorCode.BAD_REQUEST, "the lent range's KV has not arrived")
    return ticket


def attend_ids(call) -> list[str]:
    """Every lent ticket an `Attend` names."""
    return [call.ticket_id, *(m.ticket_id for m in call.more),
            *(i for o in call.others for i in (o.ticket_id, *(m.ticket_id for m in o.more)))]


async def lent_arrivals(tickets, ids: list[str]) -> None:
    """Wait (up to ARRIVAL_GRACE_S) for the KV of those lent tickets still arriving: the borrower's write
    returned, its completion may be on its way."""
    for tid in ids:
        ticket = tickets.get(tid)
        if ticket is not None and ticket.lent and ticket.state is TicketState.OPEN:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(ARRIVAL_GRACE_S):
                    await ticket.done.wait()


def lent_groups(tickets, call, ready_only: bool) -> tuple[list[tuple[list[Ticket] | None, int]], list[str]] | None:
    """An `Attend`'s requests (the first, then `others`) as `(tickets, rows)` groups in row order, each
    ticket marked used (a range in use lives on: `used_at` renews its lease). With several requests, one
    failing its checks gets `(None, rows)` and its reason in the errors ("" for the others), so it never
    fails the others' rows; alone, its EngineError is raised. A range whose KV is still arriving: None
    with `ready_only` (the caller waits on the loop and asks again), else that request's error."""
    asks = [(call.ticket_id, call.secret, call.more, len(call.positions) - sum(o.rows for o in call.others)),
            *((o.ticket_id, o.secret, o.more, o.rows) for o in call.others)]
    if any(n <= 0 for *_, n in asks):
        raise EngineError(ErrorCode.BAD_REQUEST, "attend: every request in it has rows")
    groups, errors, now = [], [], time.monotonic()
    for tid, key, refs, n in asks:
        try:
            held = [lent_now(tickets, t, k) for t, k in ((tid, key), *((m.ticket_id, m.secret) for m in refs))]
            if None in held:
                if ready_only:
                    return None
                raise EngineError(ErrorCode.BAD_REQUEST, "the lent range's KV has not arrived yet")
        except EngineError as exc:
            if not call.others:
                raise
            groups.append((None, n))
            errors.append(f"{exc.code}: {exc}")
            continue
        for ticket in held:
            ticket.used_at = now  # type: ignore[union-attr]
        groups.append((held, n))
        errors.append("")
    return groups, errors  # type: ignore[return-value]


class TicketBook:
    def __init__(self) -> None:
        self._tickets: dict[str, Ticket] = {}

    def open(self, request_id: str, matched: int, end: int, blocks: list[int], hold: Any = None,
             lent: bool = False) -> Ticket:
        ticket = Ticket(uuid.uuid4().hex, secrets.token_hex(16), request_id, matched, end, list(blocks), hold,
                        lent=lent)
        self._tickets[ticket.id] = ticket
        return ticket

    def get(self, ticket_id: str) -> Ticket | None:
        return self._tickets.get(ticket_id)

    def remove(self, ticket: Ticket) -> None:
        self._tickets.pop(ticket.id, None)
        if ticket.expiry is not None:
            ticket.expiry.cancel()

    def of_request(self, request_id: str) -> list[Ticket]:
        return [t for t in self._tickets.values() if t.request_id == request_id]

    def latest(self, request_id: str) -> Ticket | None:
        """The request's last receive ticket (lent ones are not the request's own KV)."""
        mine = [t for t in self.of_request(request_id) if not t.lent]
        return mine[-1] if mine else None

    def lent(self) -> list[Ticket]:
        return [t for t in self._tickets.values() if t.lent]

    def __len__(self) -> int:
        return len(self._tickets)


class SendJob:
    """One `remote_send` in flight on the sending engine."""

    def __init__(self, job_id: str, request_id: str, prompt: list[int], num_layers: int,
                 lora: str | None = None) -> None:
        self.id, self.request_id, self.num_layers = job_id, request_id, num_layers
        self.seq = Sequence(job_id, prompt, SamplingParams(max_tokens=1, lora=lora))
        self.seq.prefill_only = True
        self.seq.layer_hook = self._layer_done
        self.scheduled = False
        self.cancel_reason: str | None = None
        self._ready = 0
        self._cond = threading.Condition()

    def _layer_done(self, layer: int) -> None:  # step thread
        with self._cond:
            self._ready = max(self._ready, layer + 1)
            self._cond.notify_all()

    def prefilled(self) -> None:
        self._layer_done(self.num_layers - 1)

    def cancel(self, reason: str) -> None:
        with self._cond:
            self.cancel_reason = self.cancel_reason or reason
            self._cond.notify_all()

    def wait_layer(self, layer: int) -> None:  # sending thread
        with self._cond:
            while self._ready <= layer and self.cancel_reason is None:
                self._cond.wait()
            if self.cancel_reason is not None:
                raise TransferError(f"send abandoned: {self.cancel_reason}", "aborted")


class Aborted:
    """Request ids aborted in the last `memory_s` seconds (at most `limit` of them). A call of such a
    request still in flight when the abort came (a prep_recv waiting for the store, a start_generate
    waiting for its KV) ends with "aborted" instead of holding blocks until a lease ends."""

    def __init__(self, memory_s: float = 60.0, limit: int = 65536) -> None:
        self.memory_s, self.limit = memory_s, limit
        self._ids: OrderedDict[str, float] = OrderedDict()  # request id -> when, oldest first

    def add(self, request_id: str) -> None:
        self._ids[request_id] = time.monotonic()
        self._ids.move_to_end(request_id)
        while len(self._ids) > self.limit:
            self._ids.popitem(last=False)

    def recent(self, request_id: str) -> bool:
        stale = time.monotonic() - self.memory_s
        while self._ids and next(iter(self._ids.values())) < stale:
            self._ids.popitem(last=False)
        return request_id in self._ids

    def check(self, request_id: str) -> None:
        """Raise EngineError("aborted") when `request_id` was aborted lately."""
        if self.recent(request_id):
            raise EngineError(ErrorCode.ABORTED, f"request {request_id!r} was aborted")


STOP_WAIT_S = 5.0  # how long a timed-out ticket's writer gets to stop


async def wait_for_kv(ticket: Ticket, timeout: float, close: Callable[[Ticket, str], Awaitable[None]]) -> None:
    """Before `start_generate` runs on a ticket: wait for the KV in flight into it. A transfer that failed,
    or that has not ended after `timeout` seconds (a sender that died before it connected looks the same),
    closes the ticket and the prompt is computed here; a TIMEOUT error only when its writer does not stop
    within `STOP_WAIT_S` (its blocks are not ours to reuse until it does)."""
    if ticket.state is TicketState.OPEN:
        try:
            async with asyncio.timeout(timeout):  # NOTE: not wait_for, which may swallow a cancel (router/attempts.py)
                await ticket.done.wait()
        except TimeoutError:
            await close(ticket, f"the KV transfer did not end within {timeout}s")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STOP_WAIT_S):
                    await ticket.done.wait()
            if ticket.state is TicketState.OPEN:
                raise EngineError(ErrorCode.TIMEOUT, f"KV for {ticket.request_id!r} did not arrive within "
                                  f"{timeout}s and its transfer did not stop") from None
    if ticket.state is not TicketState.COMPLETE and ticket.error != "aborted":
        log.warning("request %s: KV transfer failed (%s); computing the prompt here", ticket.request_id,
                    ticket.error)
