"""Optional native CPU kernels from `csrc/`, built on first use with torch's C++ extension JIT.

Every kernel here has a pure-torch twin that stays the reference; the native one is used
only when it builds and loads. `MICROSERVE_NATIVE=0` turns it off (the plain path), e.g.
to compare the two. The build (~30 s, once per machine and source version) lands in
torch's extension cache (`TORCH_EXTENSIONS_DIR`, default `~/.cache/torch_extensions`);
concurrent processes wait on torch's file lock instead of building twice.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).resolve().parents[3] / "csrc" / "cpu_kernels.cpp"
_lock = threading.Lock()
_module: ModuleType | None = None
_tried = False


def _switched_off(name: str) -> bool:
    return os.environ.get(name, "1").strip().lower() in ("0", "false", "no", "off")


def enabled() -> bool:
    return not _switched_off("MICROSERVE_NATIVE")


def _cpu_flags() -> list[str]:
    """Vector ISA flags this CPU has (the build is cached per flag set, so a cache shared
    between machines never hands a CPU code it cannot run). `MICROSERVE_NATIVE_SIMD=0`: none,
    the portable scalar build that CPUs without AVX2 get (e.g. to test that fallback on x86)."""
    if _switched_off("MICROSERVE_NATIVE_SIMD"):
        return []
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))
    return [f"-m{f}" for f in ("avx2", "fma", "f16c") if f in flags]


def load() -> ModuleType | None:
    """The compiled kernels, or None (disabled, no source, no compiler): callers fall back."""
    global _module, _tried
    if _tried or not enabled():
        return _module
    with _lock:
        if _tried:
            return _module
        _tried = True
        if not _SOURCE.is_file():
            log.info("native kernels: %s not found (installed without csrc/); using the torch path", _SOURCE)
            return None
        flags = _cpu_flags()
        tag = hashlib.sha1((_SOURCE.read_text() + " ".join(flags)).encode()).hexdigest()[:10]
        try:
            from torch.utils import cpp_extension

            _module = cpp_extension.load(
                name=f"microserve_native_{tag}", sources=[str(_SOURCE)],
                extra_cflags=["-O3", "-fopenmp", *flags], extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as exc:  # any build failure means: use the torch path
            log.warning("native kernels unavailable (%s: %s); using the torch path", type(exc).__name__, exc)
            _module = None
    return _module
