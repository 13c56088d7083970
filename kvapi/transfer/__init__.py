"""kvapi.transfer: move KV pages between engines' pools (shm, ucx, tcp).

One interface for every transport: the receiver opens tickets on a `KVReceiver`
and hands out `KVAddr`s; a sender calls `KVSender.send(addr, ...)`. Which transport
a pair uses is `choose_transport(...)`'s call. See `base.py` for the wire protocol.
"""

from kvapi.transfer.base import TRANSPORTS, KVAddr, TransferError, choose_transport, host_id
from kvapi.transfer.receiver import KVReceiver, TransferOutcome
from kvapi.transfer.sender import KVSender, SendStats

__all__ = ["TRANSPORTS", "KVAddr", "KVReceiver", "KVSender", "SendStats", "TransferError", "TransferOutcome",
           "choose_transport", "host_id"]
