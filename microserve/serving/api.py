"""`EngineAPI`: the engine side of the microserving calls, one interface for every backend.

    wire (ZeroMQ, msgspec) ─> decode_call ─> dispatch(api, call) ─> EngineAPI method ─> Reply | chunks
    in-process (simulator)  ─────────────────> dispatch(api, call) ─┘

One class implements it, `serving.base.EngineService`, over one of three backends
(`serving.backend.Backend`): the built-in engine (`serving.builtin.BuiltinBackend`), a vLLM
engine (`serving.vllm.engine.VLLMBackend`) and a simulated one (`sim.service.SimBackend`).
A call fails with `EngineError(code, message)`;
`code` is an `ErrorCode`, and it crosses the wire unchanged as `protocol.RPCError.code`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from enum import StrEnum
from typing import Protocol, runtime_checkable

from microserve import protocol
from microserve.sampling_params import SamplingParams


class ErrorCode(StrEnum):
    """Why a call or a request failed. The engine-side codes travel as `RPCError.code`;
    the router adds its own; `gateway.app.HTTP_STATUS` maps every code to an HTTP status.

    Members compare equal to their wire strings, so a code decoded from the wire is `ErrorCode.of(code)`.
    """

    # engine side (the calls)
    BAD_REQUEST = "bad_request"  # malformed call, bad positions, bad sampling, prompt the engine cannot serve
    NOT_FOUND = "not_found"  # an unknown ticket or request
    FORBIDDEN = "forbidden"  # a wrong ticket secret
    KV_SPEC_MISMATCH = "kv_spec_mismatch"  # sender and receiver KV layouts differ
    OVERLOADED = "overloaded"  # not enough free KV blocks
    TIMEOUT = "timeout"  # a deadline passed (an engine's answer, KV that did not arrive)
    UNAVAILABLE = "unavailable"  # the engine (or its peer) is down or unreachable
    TRANSFER_FAILED = "transfer_failed"  # a KV transfer broke off
    ABORTED = "aborted"  # the request was aborted while the call ran
    INTERNAL = "internal"  # a bug: the engine failed while serving the call
    # router and gateway side
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    INVALID_API_KEY = "invalid_api_key"
    MODEL_NOT_FOUND = "model_not_found"
    TOO_MANY_REQUESTS = "too_many_requests"
    STRATEGY_ERROR = "strategy_error"
    INVALID_REQUEST = "invalid_request_error"  # an HTTP-level error (bad path, method)

    @classmethod
    def of(cls, code: str) -> ErrorCode:
        """The member for a wire string; unknown strings (a newer peer) become INTERNAL."""
        try:
            return cls(code)
        except ValueError:
            return cls.INTERNAL


class EngineError(Exception):
    """The one server-side failure of a call: `code` says why, the message says what; `peer`
    names the other engine when the failure is its (a receiver that is unreachable or stalled)."""

    def __init__(self, code: ErrorCode | str, message: str, peer: str = "") -> None:
        super().__init__(message)
        self.code, self.peer = ErrorCode.of(code), peer


@runtime_checkable
class EngineAPI(Protocol):
    """Every call an engine serves. Positions are token indices into `req.prompt_ids`
    (negative: from the end, as in Python). Every method may raise `EngineError`."""

    engine_id: str

    async def prep_recv(self, req: protocol.Request, end: int, lease_s: float | None = None) -> protocol.RecvTicket:
        """Called by a strategy on the engine that will decode (D), before the sender runs.

        Matches the local prefix cache on `prompt[:end]` (pinning the matched blocks) and
        reserves blocks for `[matched, end)` under a lease of `lease_s` seconds (default:
        the engine's). The blocks are held until `start_generate` adopts them, the request
        is aborted or the lease expires; only a sender holding the ticket's secret writes
        into them. Raises BAD_REQUEST (positions, lease, prompt), OVERLOADED (no blocks)."""
        ...

    async def remote_send(self, req: protocol.Request, kv: protocol.KVAddr, begin: int, end: int,
                          transport: str | None = None) -> protocol.SendResult:
        """Called by a strategy on the engine that prefills (P).

        Makes sure KV for `prompt[:end]` exists here (prefix cache, then a prefill of the
        rest through the normal scheduler) and writes `[begin, end)` into the receiver's
        ticket `kv`, layer by layer as they are computed; returns when the receiver has it
        all. Raises BAD_REQUEST (positions, range outside the ticket, transport),
        KV_SPEC_MISMATCH, TRANSFER_FAILED / UNAVAILABLE / TIMEOUT (the transfer), ABORTED."""
        ...

    async def start_generate(self, req: protocol.Request, begin: int = 0, sampling: SamplingParams | None = None,
                             lenders: list[protocol.LendTicket] | None = None) -> AsyncIterator[protocol.GenerateChunk]:
        """Called by a strategy on the engine that decodes.

        Uses KV received into this request's ticket (waiting for a transfer in flight) or
        cached here for `prompt[:begin]`, prefills the rest (at least the last prompt
        token) and decodes. Returns the stream of chunks; the last carries the finish
        reason. Leaving the stream early aborts the request. `lenders` (DistAttention, `begin`
        0): ranges of the prompt lent by other engines (`lend`); they are computed here, written
        to their lenders and attended there, layer by layer. Raises BAD_REQUEST (also: lenders on
        a backend that does not borrow, bad ranges), TIMEOUT (the ticket's KV did not arrive),
        ABORTED; the stream raises INTERNAL if the engine fails while running the request, or
        UNAVAILABLE if a lender is lost."""
        ...

    async def lend(self, req: protocol.Request, begin: int, end: int,
                   lease_s: float | None = None) -> protocol.LendTicket:
        """Called by a DistAttention strategy on an engine with free blocks (the lender), for a
        request another engine (the borrower) runs but cannot hold.

        Holds blocks for prompt positions `[begin, end)` (`begin` on a block boundary) under a
        lease and returns a signed ticket whose `kv` the borrower writes that range into (as a
        `remote_send` target). Lent blocks never enter this engine's prefix cache, KV events or
        store; `abort(request_id)` or the lease's end frees them. Raises BAD_REQUEST (positions,
        a backend that does not lend: vLLM, the simulator), OVERLOADED (no free blocks), ABORTED."""
        ...

    async def attend(self, ticket_id: str, secret: str, layer: int, positions: list[int], q: bytes,
                     scale: float, more: list[protocol.LentRef] = (),
                     others: list[protocol.AttendRows] = ()) -> protocol.AttendReply:
        """Called by the engine that borrowed a range here (DistAttention), for each layer that needs it.

        Attends the query rows (`q`: [rows, query heads, head dim] in the KV dtype; `positions`:
        each row's position, for causality) to the lent range's keys alone and returns the part's
        output and log-sum-exp, which the borrower merges with its own (engine/model/dist_attention.py).
        Renews the ticket's lease. Raises NOT_FOUND (no such lent ticket: ended, expired),
        FORBIDDEN (wrong secret), BAD_REQUEST (its KV has not arrived, bad layer or shapes). With
        `others` (more requests' rows in one message), a request whose tickets fail those checks gets
        zero rows and its reason in `AttendReply.errors`; the other requests' rows are unaffected."""
        ...

    async def abort(self, request_id: str) -> bool:
        """Called by the router when a request ends early (client gone, stop string, error).
        Cancels everything of the request here (tickets, sends, the running sequence) and
        frees its blocks. Returns whether anything was found. Never raises for an unknown id."""
        ...

    def stats(self) -> protocol.StatsReply:
        """Called by the router's load polls and `/metrics`: counters, read between steps."""
        ...

    def health(self) -> protocol.HealthReply:
        """Called by the router when it connects and to probe a down engine: liveness,
        model, KV spec, transports, the KV-event address, the context limit."""
        ...

    async def kv_snapshot(self) -> protocol.KVSnapshotReply:
        """Called by a router that joins late or lost KV events: every prefix hash cached
        here and the sequence number of the last event published before the snapshot."""
        ...

    async def lora(self, action: str, name: str, path: str = "") -> protocol.LoraReply:
        """Called by the gateway's `/v1/load_lora_adapter` and `/v1/unload_lora_adapter` (admin key), on
        every engine. `load` reads the PEFT folder `path` (on this engine's host) into a free slot;
        `unload` frees the slot of an adapter no request runs under. Returns the adapters loaded after
        the call. Raises BAD_REQUEST (unknown action or adapter, a bad folder or rank, no free slot,
        adapters off, requests still running under it)."""
        ...


async def dispatch(api: EngineAPI, call: protocol.Call) -> protocol.Reply | AsyncIterator[protocol.GenerateChunk]:
    """The single place a decoded call becomes a method call: a reply, or for
    `StartGenerate` the chunk stream. Raises `EngineError`."""
    if isinstance(call, protocol.StartGenerate):
        return await api.start_generate(call.req, call.begin, call.sampling, call.lenders or None)
    if isinstance(call, protocol.PrepRecv):
        return await api.prep_recv(call.req, call.end, call.lease_s)
    if isinstance(call, protocol.RemoteSend):
        return await api.remote_send(call.req, call.kv, call.begin, call.end, call.transport)
    if isinstance(call, protocol.Lend):
        return await api.lend(call.req, call.begin, call.end, call.lease_s)
    if isinstance(call, protocol.Attend):
        return await api.attend(call.ticket_id, call.secret, call.layer, call.positions, call.q, call.scale,
                                call.more, call.others)
    if isinstance(call, protocol.Abort):
        return protocol.AbortReply(await api.abort(call.request_id))
    if isinstance(call, protocol.Stats):
        return api.stats()
    if isinstance(call, protocol.Health):
        return api.health()
    if isinstance(call, protocol.KVSnapshot):
        return await api.kv_snapshot()
    if isinstance(call, protocol.Lora):
        return await api.lora(call.action, call.name, call.path)
    raise EngineError(ErrorCode.BAD_REQUEST, f"unknown call {type(call).__name__}")
