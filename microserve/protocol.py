"""Wire messages of the microserving calls (msgspec, MessagePack over ZeroMQ).

Frames: a client (DEALER) sends `[call_id, body]`; the engine (ROUTER) answers every
call with one or more `[call_id, body]` frames, `body` a `Reply`. `start_generate`
streams `GenerateChunk`s until one carries a `finish_reason`; every call may instead
end with an `RPCError`. Decoding is strict: unknown tags or fields are errors.
"""

from __future__ import annotations

import msgspec

from kvapi.spec import KVSpec
from kvapi.transfer.base import KVAddr
from microserve.sampling_params import SamplingParams

__all__ = [
    "Abort", "AbortReply", "Call", "GenerateChunk", "Health", "HealthReply", "KVAddr", "KVEvent", "KVSnapshot",
    "KVSnapshotReply", "KVSpec",
    "PrepRecv", "RPCError", "RecvTicket", "RemoteSend", "Reply", "Request", "SendResult", "StartGenerate",
    "Stats", "StatsReply", "decode_call", "decode_reply", "encode",
]


class Request(msgspec.Struct, forbid_unknown_fields=True):
    """One generation request as the engines see it: token ids, not text."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams = msgspec.field(default_factory=SamplingParams)

    def split(self, fraction: float) -> int:
        """The token index `fraction` of the way into the prompt (0.0 → 0, 1.0 → len)."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        return int(len(self.prompt_ids) * fraction)

    def continued(self, tag: str, generated: list[int]) -> Request:
        """The request as it goes on after `generated` tokens, elsewhere or again (a retry: the attempt
        number; a move: `to-<engine>`): id `<id>~<tag>`, prompt + generated, the rest of its budget.
        The one scheme of derived ids (`base_id` undoes it)."""
        return Request(f"{self.request_id}~{tag}", self.prompt_ids + list(generated), self.sampling.after(generated))


def base_id(request_id: str) -> str:
    """The request a derived id (`Request.continued`) belongs to."""
    return request_id.split("~", 1)[0]


# -- calls ---------------------------------------------------------------------------
class PrepRecv(msgspec.Struct, tag="prep_recv", forbid_unknown_fields=True):
    req: Request
    end: int
    lease_s: float | None = None


class RemoteSend(msgspec.Struct, tag="remote_send", forbid_unknown_fields=True):
    req: Request
    kv: KVAddr
    begin: int
    end: int
    transport: str | None = None  # force one ("shm" | "ucx" | "tcp"); default: the fastest that works


class LendTicket(msgspec.Struct, tag="lend_ticket", forbid_unknown_fields=True):
    """A range lent for a request (`lend`): the borrower writes it through `kv` and attends to it over `rpc`."""

    kv: KVAddr  # where the borrower writes the range `[kv.begin, kv.end)` (signed, leased; block aligned)
    rpc: str = ""  # the lender's RPC address, as the router reaches it (filled by its EngineHandle)
    attend: str = ""  # the lender's attend socket (its host as in `rpc`; "": attend over `rpc`)


class StartGenerate(msgspec.Struct, tag="start_generate", forbid_unknown_fields=True):
    req: Request
    begin: int = 0
    sampling: SamplingParams | None = None  # default: req.sampling
    lenders: list[LendTicket] = []  # DistAttention: ranges of the prompt whose KV these lenders hold


class Lend(msgspec.Struct, tag="lend", forbid_unknown_fields=True):
    """Hold blocks for prompt positions `[begin, end)` of a request another engine runs (DistAttention):
    the borrower writes that range's KV into them and attends to it here."""

    req: Request
    begin: int
    end: int
    lease_s: float | None = None


class LentRef(msgspec.Struct, array_like=True):
    """Another range lent on the same engine: its ticket and the ticket's secret."""

    ticket_id: str
    secret: str


class AttendRows(msgspec.Struct, array_like=True):
    """Another borrowing request's rows in the same `Attend`: its lent range here (ticket and secret),
    its further ranges here (`more`), and how many rows of `positions` and `q` are its (they follow
    the rows before them: the first request's, then the earlier `others`')."""

    ticket_id: str
    secret: str
    rows: int
    more: list[LentRef] = []


class Attend(msgspec.Struct, tag="attend", forbid_unknown_fields=True):
    """A borrower's query rows of one layer, attended here over a range this engine lent (DistAttention),
    and over each range in `more` (the reply is then the part over all of them, merged here). `others`:
    the rows of the borrower's other requests of this step that use this engine, in the same message
    (their rows after the first request's; the reply's rows in the same order)."""

    ticket_id: str
    secret: str  # the lent ticket's (its KVAddr's): only the borrower holds it
    layer: int
    positions: list[int]  # each row's position in its sequence (causality)
    q: bytes  # [rows, query heads, head dim] in the KV cache's dtype, row-major
    scale: float
    more: list[LentRef] = []  # further ranges of the same request lent here: one message per lender and layer
    others: list[AttendRows] = []


class Abort(msgspec.Struct, tag="abort", forbid_unknown_fields=True):
    request_id: str


class Stats(msgspec.Struct, tag="stats", forbid_unknown_fields=True):
    pass


class Health(msgspec.Struct, tag="health", forbid_unknown_fields=True):
    pass


class KVSnapshot(msgspec.Struct, tag="kv_snapshot", forbid_unknown_fields=True):
    """Ask for every prefix hash in the engine's cache (a router joining late, or one that lost events)."""


class Lora(msgspec.Struct, tag="lora", forbid_unknown_fields=True):
    """Load (`path`: a PEFT folder on the engine's host) or unload a LoRA adapter by name."""

    action: str  # "load" | "unload"
    name: str
    path: str = ""


Call = PrepRecv | RemoteSend | StartGenerate | Lend | Attend | Abort | Stats | Health | KVSnapshot | Lora


# -- replies -------------------------------------------------------------------------
class RecvTicket(msgspec.Struct, tag="recv_ticket", forbid_unknown_fields=True):
    kv: KVAddr
    matched: int  # prompt tokens the receiver already had cached (block aligned)


class AttendReply(msgspec.Struct, tag="attend_reply", forbid_unknown_fields=True):
    out: bytes  # [rows, query heads, head dim] in the query's dtype: attention over the lent range alone
    lse: bytes  # [rows, query heads] float32: log-sum-exp of those scores (-inf: the row saw none of it)
    errors: list[str] = []  # with `others`: per request ("" or why its rows are zeros), first request first


class SendResult(msgspec.Struct, tag="send_result", forbid_unknown_fields=True):
    bytes: int
    seconds: float
    transport: str = ""
    computed_tokens: int = 0  # tokens the sender prefilled for this send (0: all from its cache)


class TokenLogprob(msgspec.Struct, array_like=True):
    """One generated token's logprob (of the model's raw logits) and its top alternatives."""

    logprob: float
    top: list[tuple[int, float]] = []  # (token id, logprob), most likely first
    rank: int | None = None  # the token's 1-based rank in the distribution (prompt logprobs), also outside `top`


class GenerateChunk(msgspec.Struct, tag="chunk", forbid_unknown_fields=True):
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" at the end of the stream
    num_cached_tokens: int = 0  # prompt tokens that were not recomputed (received or cached)
    logprobs: list[TokenLogprob] | None = None  # one per token, when sampling.logprobs is set
    prompt_logprobs: list[TokenLogprob] | None = None  # prompt tokens 1.. (first chunk, sampling.prompt_logprobs)
    phases: list[float] | None = None  # first chunk: seconds the engine queued and prefilled the request


class AbortReply(msgspec.Struct, tag="abort_reply", forbid_unknown_fields=True):
    found: bool


class StoreTierStats(msgspec.Struct, array_like=True):
    """One KV store tier of one engine (`microserve_kv_store_*` metrics)."""

    tier: str
    hit_tokens: int
    bytes_read: int
    bytes_written: int
    errors: int
    dropped_writes: int


class StatsReply(msgspec.Struct, tag="stats_reply", forbid_unknown_fields=True):
    engine_id: str
    running: int
    waiting: int
    queued_tokens: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_cached: int
    prefix_cache_hit_tokens: int
    computed_tokens_total: int
    num_preemptions: int
    open_tickets: int
    active_sends: int
    kv_bytes_sent: int
    kv_bytes_received: int
    kernels: str = ""  # which kernels the model runs ("native", "native-scalar", "torch", "triton", "vllm")
    kv_store: list[StoreTierStats] = []  # the engine's KV store tiers (--kv-store), fastest first
    kv_blocks_lent: int = 0  # blocks held for other engines' requests (`lend`)
    kv_blocks_borrowed: int = 0  # blocks of this engine's requests held by lenders (`start_generate(lenders=...)`)
    prefix_cache_query_tokens: int = 0  # prompt tokens looked up in the prefix cache (hits / queries: hit rate)
    remote_attends: int = 0  # DistAttention: attend messages sent to lenders, and their round trips summed
    remote_attend_seconds: float = 0.0
    attends_served: int = 0  # DistAttention: attend messages answered here as a lender
    busy_seconds: float = 0.0  # time spent in steps (a planner's capacity: computed tokens per busy second)
    kv_refusals: int = 0  # prep_recv calls refused for want of free KV blocks so far (a planner's signal)
    loras: list[str] = []  # LoRA adapters loaded (`--lora-modules`), by name
    lora_loads: int = 0  # adapters written into one of the engine's slots so far (a slot miss costs one)

    @property
    def kv_usage(self) -> float:
        """Share of the KV blocks in use, as vLLM counts it: blocks only the prefix cache holds are free."""
        return (self.kv_blocks_used - self.kv_blocks_cached) / max(1, self.kv_blocks_total)


class HealthReply(msgspec.Struct, tag="health_reply", forbid_unknown_fields=True):
    ok: bool
    engine_id: str
    model: str
    kv_spec: KVSpec
    transports: list[str]
    events: str  # ZeroMQ PUB address of the KV events
    max_model_len: int


class KVSnapshotReply(msgspec.Struct, tag="kv_snapshot_reply", forbid_unknown_fields=True):
    engine_id: str
    hashes: list[int]  # prefix hashes of every block in the prefix cache
    seq: int  # sequence number of the last KV event published before the snapshot


class RPCError(msgspec.Struct, tag="error", forbid_unknown_fields=True):
    """`code`: bad_request | not_found | forbidden | kv_spec_mismatch | overloaded |
    timeout | unavailable | transfer_failed | aborted | internal."""

    code: str
    message: str
    peer: str = ""  # the engine at fault when it is not the one answering (a transfer's receiver)


class LoraReply(msgspec.Struct, tag="lora_reply", forbid_unknown_fields=True):
    loras: list[str]  # the adapters loaded after the call


Reply = (RecvTicket | LendTicket | AttendReply | SendResult | GenerateChunk | AbortReply | StatsReply | HealthReply
         | KVSnapshotReply | LoraReply | RPCError)


class KVEvent(msgspec.Struct, tag="kv_event", forbid_unknown_fields=True):
    """Published on the engine's PUB socket: blocks entered or left its prefix cache."""

    engine_id: str
    kind: str  # "stored" | "evicted"
    hashes: list[int]  # chained prefix hashes (kvapi.radix.prefix_hashes) of the blocks
    seq: int  # per-engine event counter, to notice drops
    tier: str = ""  # where: "" the engine's page pool, else a KV store tier ("host", "disk", "valkey")
    shared: bool = False  # the tier is shared by every engine of the cluster (a remote store)


_encoder = msgspec.msgpack.Encoder()
_call_decoder = msgspec.msgpack.Decoder(Call)
_reply_decoder = msgspec.msgpack.Decoder(Reply)
_event_decoder = msgspec.msgpack.Decoder(KVEvent)


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


def decode_call(data: bytes) -> Call:
    """Raises msgspec.DecodeError / msgspec.ValidationError on malformed input."""
    return _call_decoder.decode(data)


def decode_reply(data: bytes) -> Reply:
    return _reply_decoder.decode(data)


def decode_event(data: bytes) -> KVEvent:
    return _event_decoder.decode(data)
