"""kvapi.transfer: move KV pages between engines' pools (shm, ucx, tcp).

One interface for every transport: the receiver opens tickets on a `KVReceiver`
and hands out `KVAddr`s; a sender calls `KVSender.send(addr, ...)`. Which transport
a pair uses is `choose_transport(...)`'s call. See `base.py` for the wire protocol.

The receiver and sender (which need torch) load on first use, so a process that only
reads `KVAddr`s (the router) never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from kvapi.transfer.base import TRANSPORTS, KVAddr, TransferError, TransferOutcome, choose_transport, host_id

_LAZY = {"KVReceiver": "receiver", "KVSender": "sender", "SendStats": "sender"}

__all__ = ["TRANSPORTS", "KVAddr", "KVReceiver", "KVSender", "SendStats", "TransferError", "TransferOutcome",
           "choose_transport", "host_id"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"kvapi.transfer.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
