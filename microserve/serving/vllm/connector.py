"""The microserve KV connector for vLLM (V1): receive tickets and prefill-only sends in vLLM's own paged KV.

vLLM loads it by name (`kv_connector_module_path="microserve.serving.vllm.connector"`,
`kv_connector="MicroserveConnector"`). The engine runs in one process (in-process engine core,
one in-process worker), so the scheduler-side and the worker-side instances meet the serving
code through a `Bridge` registered under the engine's id (`kv_connector_extra_config`).
Bytes never go through vLLM: `kvapi.transfer` writes them straight into the pages vLLM
allocated (receiving) or reads them from the pages of a finished prefill (sending).

    receiver  prep_recv ─> request with {"microserve": {"recv": key}}
              get_num_new_matched_tokens: (end - locally cached, load async)
              update_state_after_alloc: the blocks ─> Bridge ─> ticket (KVAddr) ─> the sender
              KVReceiver writes the pages; done ─> get_finished(recving) ─> vLLM schedules the rest
    sender    remote_send ─> request prompt[:end], max_tokens=1, {"microserve": {"send": key}}
              request_finished(blocks): keep the blocks, KVSender pushes [begin, end) in a thread
              done ─> get_finished(sending) ─> vLLM frees the blocks

A receive whose request is aborted while its transfer is writing keeps its blocks (the
transfer is stopped first); an abort before the pages arrived frees them at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.v1.request import RequestStatus

log = logging.getLogger(__name__)


class BlockPages:
    """vLLM's per-layer KV tensors seen as the pool `kvapi.transfer` reads and writes.

    The transfer layer walks `pool[layer, kv, first:first + n]` for kv in (0, 1). vLLM's CPU
    layout keeps K and V of a block together (`[blocks, heads, block_size, K|V]`), so the
    whole block is the page: kv 0 is the block, kv 1 is empty. Both ends of a transfer
    between vLLM engines walk the same bytes; `KVSpec.layout` keeps other layouts out.
    """

    def __init__(self, layers: list[torch.Tensor]) -> None:
        self.layers = layers

    def __getitem__(self, index: tuple[int, int, slice]) -> torch.Tensor:
        layer, kv, blocks = index
        pages = self.layers[layer][blocks]
        return pages if kv == 0 else pages[:0]

    def tensors(self) -> list[torch.Tensor]:
        """vLLM's own KV tensors: what the nixl transport registers (no copy)."""
        return self.layers

    def page_regions(self) -> list[tuple[int, int, int]]:
        """(base address, block stride, page bytes) per (layer, K|V): the nixl transport's view."""
        out = []
        for t in self.layers:
            es = t.element_size()
            out += [(t.data_ptr(), t.stride(0) * es, t[0].numel() * es), (t.data_ptr(), 0, 0)]
        return out


@dataclass
class Recv:
    """A receive ticket waiting for its blocks, then for its pages."""

    end: int
    on_alloc: Callable[[str, int, list[int]], None]  # (vLLM request id, cached tokens, blocks); any thread
    revoke: Callable[[], bool]  # close the receive ticket; False while a transfer is still writing
    request_id: str = ""
    matched: int = -1
    loading: bool = False  # vLLM waits (WAITING_FOR_REMOTE_KVS) for this receive
    writing: bool = False  # a transfer may be writing into the blocks
    done: bool = False
    aborted: bool = False


@dataclass
class Send:
    """A prefill-only request whose KV `[begin, end)` goes to a receiver when it finishes."""

    start: Callable[[list[int]], None]  # called with the request's blocks, in the step thread
    request_id: str = ""


@dataclass
class Bridge:
    """What the serving code and the two connector instances of one engine share."""

    layers: dict[str, torch.Tensor] = field(default_factory=dict)
    recvs: dict[str, Recv] = field(default_factory=dict)
    sends: dict[str, Send] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    finished_recving: set[str] = field(default_factory=set)  # vLLM request ids
    finished_sending: set[str] = field(default_factory=set)
    pending_push: int = 0
    loaded_tokens: int = 0

    def recv_done(self, key: str) -> None:
        """The pages of receive `key` are in, or its writer stopped: vLLM may schedule the
        request (or, if it finished meanwhile, free its blocks)."""
        with self.lock:
            r = self.recvs.get(key)
            if r is None or r.done:
                return
            r.done, r.writing = True, False
            if r.loading:  # vLLM waits for this id only when it was asked to load asynchronously
                self.finished_recving.add(r.request_id)
            if r.aborted:
                self.recvs.pop(key, None)

    def send_done(self, request_id: str) -> None:
        with self.lock:
            self.finished_sending.add(request_id)
            self.pending_push -= 1


_BRIDGES: dict[str, Bridge] = {}


def bridge_for(engine_id: str) -> Bridge:
    return _BRIDGES.setdefault(engine_id, Bridge())


def _key(request: Any, kind: str) -> str | None:
    params = request.kv_transfer_params or {}
    mine = params.get("microserve") or {}
    return mine.get(kind)


class _Meta(KVConnectorMetadata):
    pass


class MicroserveConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        engine_id = self._kv_transfer_config.kv_connector_extra_config.get("engine_id")
        if not engine_id:
            raise ValueError("MicroserveConnector needs kv_connector_extra_config={'engine_id': ...}")
        self.bridge = bridge_for(engine_id)

    # -- worker side ------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.bridge.layers = dict(kv_caches)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        """Nothing to start: `kvapi.transfer` writes received pages as they arrive."""

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Received pages are complete before vLLM schedules the request (`get_finished`)."""

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        """Sends start when the prefill-only request finishes (`request_finished`)."""

    def wait_for_save(self) -> None:
        pass

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        with self.bridge.lock:
            sending, self.bridge.finished_sending = self.bridge.finished_sending, set()
            recving, self.bridge.finished_recving = self.bridge.finished_recving, set()
        return sending or None, recving or None

    # -- scheduler side ---------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        key = _key(request, "recv")
        if key is None:
            return 0, False
        with self.bridge.lock:
            r = self.bridge.recvs.get(key)
            if r is None or r.matched >= 0:  # aborted, or its pages are in already
                return 0, False
            r.request_id = request.request_id
            want = r.end - num_computed_tokens
            if want <= 0:  # all cached here already: nothing to receive
                r.matched, r.done = r.end, True
            else:
                r.loading = True
        if want <= 0:
            r.on_alloc(request.request_id, r.end, [])
            return 0, False
        return want, True

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        if num_external_tokens <= 0:
            return
        key = _key(request, "recv")
        r = self.bridge.recvs.get(key) if key else None
        if r is None or r.matched >= 0:
            return
        block_ids = list(blocks.get_block_ids()[0])
        r.matched = request.num_computed_tokens
        self.bridge.loaded_tokens += num_external_tokens
        r.on_alloc(request.request_id, r.matched, block_ids)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        return _Meta()

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        key = _key(request, "send")
        if key is not None:
            s = self.bridge.sends.pop(key, None)
            if s is not None and request.status != RequestStatus.FINISHED_ABORTED:
                s.request_id = request.request_id
                with self.bridge.lock:
                    self.bridge.pending_push += 1
                s.start(list(block_ids))
                return True, None
            return False, None
        key = _key(request, "recv")
        if key is not None:
            with self.bridge.lock:
                r = self.bridge.recvs.get(key)
                if r is not None and r.loading and not r.done:
                    # vLLM frees a request that waits for remote KV when its id comes back in
                    # finished_recving: now if nothing writes, else when the writer stopped
                    if r.writing and not r.revoke():
                        r.aborted = True  # recv_done reports it
                        return True, None
                    r.done = True
                    self.bridge.finished_recving.add(request.request_id)
                self.bridge.recvs.pop(key, None)
        return False, None

    def has_pending_push_work(self) -> bool:
        with self.bridge.lock:
            return self.bridge.pending_push > 0
