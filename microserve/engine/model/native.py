"""Optional native CPU kernels from `microserve/csrc/` (the top-level `csrc/` links there), built
on first use with torch's C++ extension JIT. The source ships inside the package (wheel, sdist,
editable install alike), so every install can build them.

Every kernel here has a pure-torch twin that stays the reference; the native one is used
only when it builds and loads. `MICROSERVE_NATIVE=0` turns it off (the plain path), e.g.
to compare the two. The build (~15 s, once per machine and source version) lands in
torch's extension cache (`TORCH_EXTENSIONS_DIR`, default `~/.cache/torch_extensions`);
concurrent processes wait on torch's file lock instead of building twice.

Without them the engine runs the torch path at about half the speed (docs/benchmarks.md:
1.0-1.05x Hugging Face decode instead of 1.7-1.8x): that is never silent. `load()` logs one
WARNING naming the cause, and `path()` names what the engine runs (`stats().kernels`,
`/metrics` `microserve_engine_info{kernels=...}`).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from types import ModuleType

from kvapi.native import build

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "cpu_kernels.cpp"
_COST = ("the torch path decodes at about 1.0x Hugging Face instead of 1.7-1.8x with the kernels "
         "(docs/benchmarks.md)")
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
            log.warning("native CPU kernels unavailable: %s is missing from this install; %s", _SOURCE, _COST)
            return None
        flags = _cpu_flags()
        if "-mavx2" not in flags and not _switched_off("MICROSERVE_NATIVE_SIMD"):
            log.warning("native CPU kernels built without AVX2/FMA (this CPU lacks them): portable scalar kernels, "
                        "projections on oneDNN; slower than the AVX2 build")
        try:
            _module = build("microserve_native", _SOURCE, ["-O3", "-fopenmp", *flags], ["-fopenmp"])
        except Exception as exc:  # any build failure means: use the torch path
            log.warning("native CPU kernels unavailable: the build failed (%s: %s; needs a C++ compiler and "
                        "ninja); %s", type(exc).__name__, exc, _COST)
            _module = None
    return _module


def loaded() -> ModuleType | None:
    """The kernels `load()` gave this process, if it ran: never builds (a caller on the serving path, such
    as the sampler, must not start a build mid-request; the engine loads them when it starts)."""
    return _module


def path(module: ModuleType | None) -> str:
    """Which kernels a CPU engine runs: "native" (AVX2 build), "native-scalar" (portable
    build, CPUs without AVX2) or "torch" (no kernels)."""
    if module is None:
        return "torch"
    return "native" if module.simd() else "native-scalar"
