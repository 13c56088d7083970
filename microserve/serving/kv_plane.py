"""`KVPlane`: one engine's side of the KV data plane, shared by the backends whose bytes move
through `kvapi.transfer` (built-in and vLLM; the simulator times transfers instead).

It owns the engine's `KVReceiver` and `KVSender` over one page pool and the transports the engine
offers, and implements the transfer methods of `serving.backend.Backend` once for both backends
(`PlaneTransfers`): the `KVAddr` of a ticket, opening and revoking a receive, whether a transfer
is writing, which transport a send uses, the KV key, bytes moved.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvapi.spec import KVSpec
from kvapi.transfer import KVAddr, KVReceiver, KVSender, TransferOutcome, choose_transport
from kvapi.transfer.base import FALLBACK, TRANSPORTS, transport_class

__all__ = ["KVPlane", "PlaneTransfers", "pick_transports"]


def pick_transports(choice: str, device: str, allowed: tuple[str, ...] = TRANSPORTS,
                    shared_pool: bool = True) -> list[str]:
    """Transports an engine offers for `--transport CHOICE`, in preference order (the fallback, tcp, last);
    raises ValueError for an impossible choice.

    `allowed`: what the backend can serve (vLLM owns its KV memory: no shared pool);
    `shared_pool`: whether the pool may live in shared memory."""
    if choice != "auto" and choice not in TRANSPORTS:
        raise ValueError(f"unknown transport {choice!r}; choose auto, {', '.join(TRANSPORTS)}")
    if choice not in ("auto", *allowed):
        raise ValueError(f"this backend moves KV over {', '.join(allowed)} only; use auto or one of those")
    offered = []
    for name in allowed if choice == "auto" else (choice,):
        cls = transport_class(name)
        why = cls.unavailable(device)
        if why is None and (shared_pool or not cls.needs_shared_pool):
            offered.append(name)
        elif choice != "auto":
            raise ValueError(f"--transport {name}: {why or 'this backend has no shared KV pool'}; use auto or tcp")
    return [*dict.fromkeys([*offered, FALLBACK])]


class KVPlane:
    """The receiver and sender of one engine's page pool.

    Args:
        engine_id: named in every `KVAddr` this engine hands out.
        pool: the KV pages (the engine's cache tensor, or vLLM's per-layer pages).
        spec: their layout.
        transports: what this engine offers, fastest first (`pick_transports`).
        host, port: where the KV control socket listens.
        shm_path: the file backing `pool` when it is in shared memory.
        host_id: this machine's identity (shm only between engines with the same one).
        timeout: seconds a transfer may stall.
        best_effort: leave out (with a warning) a transport that fails to start (`--transport auto`).
    """

    def __init__(self, engine_id: str, pool: Any, spec: KVSpec, transports: list[str], host: str = "127.0.0.1",
                 port: int = 0, shm_path: str = "", host_id: str = "", timeout: float = 30.0,
                 best_effort: bool = False) -> None:
        self.engine_id, self.spec, self.host_id = engine_id, spec, host_id
        self.receiver = KVReceiver(pool, spec, host, port, shm_path=shm_path, transports=list(transports),
                                   best_effort=best_effort)
        self.transports = [t for t in transports if t in self.receiver.transports]
        self.sender = KVSender(pool, spec, timeout, host=host.strip("[]"), transports=self.receiver.transports)

    @property
    def endpoint(self) -> str:
        return self.receiver.endpoint

    def addr(self, ticket: Any, block_ids: list[int] | None = None) -> KVAddr:
        """Where senders write into `ticket` (unsigned: the call layer signs it)."""
        return KVAddr(self.engine_id, self.receiver.endpoint, ticket.id, ticket.secret, ticket.matched, ticket.end,
                      ticket.blocks if block_ids is None else block_ids, self.spec, self.transports, self.host_id,
                      **self.receiver.fields)

    def open(self, ticket_id: str, secret: str, block_ids: list[int],
             on_done: Callable[[TransferOutcome], None]) -> None:
        self.receiver.open_ticket(ticket_id, secret, block_ids, on_done)

    def pick(self, kv: KVAddr, forced: str | None) -> str:
        return choose_transport(self.transports, kv, forced)

    def use_key(self, key: bytes) -> None:
        self.sender.sign_key = key

    def bytes(self) -> tuple[int, int]:
        return self.sender.bytes_sent, self.receiver.bytes_received

    def close(self) -> None:
        self.receiver.close()


class PlaneTransfers:
    """The transfer methods of a `Backend` over `self.plane` (mixed into the built-in and vLLM backends).
    Receives report to the backend's service (`transfer_done`)."""

    plane: KVPlane
    service: Any

    def recv_addr(self, ticket: Any) -> KVAddr:
        return self.plane.addr(ticket)

    def open_receive(self, ticket: Any, addr: KVAddr) -> None:
        self.plane.open(ticket.id, ticket.secret, addr.block_ids, self.service.leases.transfer_done)

    def receiving(self, ticket_id: str) -> bool:
        return self.plane.receiver.is_active(ticket_id)

    def revoke(self, ticket_id: str) -> bool:
        return self.plane.receiver.revoke(ticket_id)

    def transport_for(self, kv: KVAddr, forced: str | None) -> str:
        return self.plane.pick(kv, forced)

    def use_kv_key(self, key: bytes) -> None:
        self.plane.use_key(key)

    def kv_bytes(self) -> tuple[int, int]:
        return self.plane.bytes()
