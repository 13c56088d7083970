"""AEGIS-128L for store entries (kvapi/csrc/aegis128l.cpp, built on first use; kvapi.native).

AES-256-GCM opens about 3.5 GB/s on one core of a current x86 server and holds the GIL while it
works; AEGIS-128L (draft-irtf-cfrg-aegis-aead, a CAESAR finalist built from the AES round: about 8
AES rounds per 32 bytes against GCM's 14 per 16 plus GHASH) opens 11-12 GB/s with the GIL released,
so sealed loads run at the speed of a copy (docs/benchmarks.md, "KV store tiers"). Before first use
the build is checked against the draft's test vectors; a build that fails them, or no build (no
compiler, not x86-64 with AES-NI, `MICROSERVE_NATIVE=0`), leaves the store on AES-256-GCM.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from types import ModuleType

from kvapi.native import build

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "aegis128l.cpp"
_lock = threading.Lock()
_module: ModuleType | None = None
_tried = False

# draft-irtf-cfrg-aegis-aead, AEGIS-128L test vectors 3 and 4 (key, nonce, ad, msg, ct, tag128)
_KEY = bytes.fromhex("10010000000000000000000000000000")
_NONCE = bytes.fromhex("10000200000000000000000000000000")
_AD = bytes.fromhex("0001020304050607")
_VECTORS = (
    ("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
     "79d94593d8c2119d7e8fd9b8fc77845c5c077a05b2528b6ac54b563aed8efe84", "cc6f3372f6aa1bb82388d695c3962d9a"),
    ("000102030405060708090a0b0c0d", "79d94593d8c2119d7e8fd9b8fc77", "5c04b3dba849b2701effbe32c7f0fab7"),
)


def _passes(module: ModuleType) -> bool:
    """Whether the build seals and opens the draft's vectors (and refuses a flipped tag)."""
    for msg, ct, tag in _VECTORS:
        msg_b, ct_b, tag_b = bytes.fromhex(msg), bytes.fromhex(ct), bytes.fromhex(tag)
        got_ct, got_tag, opened = bytearray(len(msg_b)), bytearray(16), bytearray(len(msg_b))
        module.seal(_KEY, _NONCE, _AD, msg_b, got_ct, got_tag)
        if (bytes(got_ct), bytes(got_tag)) != (ct_b, tag_b) or not module.open(_KEY, _NONCE, _AD, ct_b, tag_b, opened) \
                or bytes(opened) != msg_b or module.open(_KEY, _NONCE, _AD, ct_b, bytes(16), opened):
            return False
    return True


def load() -> ModuleType | None:
    """The AEGIS-128L module when this host runs it (built, checked), else None: AES-256-GCM."""
    global _module, _tried
    if _tried:
        return _module
    with _lock:
        if _tried:
            return _module
        _tried = True
        if os.environ.get("MICROSERVE_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
            return None
        try:
            module = build("kvapi_aegis128l", _SOURCE, ["-O3"])
        except Exception as exc:  # no compiler, no source: GCM
            log.warning("store entries are sealed with AES-256-GCM (about a third of a copy's speed): AEGIS-128L "
                        "did not build (%s: %s)", type(exc).__name__, exc)
            return None
        if not module.available():
            log.info("store entries are sealed with AES-256-GCM: this CPU has no AES-NI for AEGIS-128L")
        elif not _passes(module):
            log.error("store entries are sealed with AES-256-GCM: the AEGIS-128L build failed its test vectors")
        else:
            _module = module
    return _module
