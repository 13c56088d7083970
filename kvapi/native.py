"""Build a C++ source of this package on first use with torch's C++ extension JIT (the engine's CPU
kernels, microserve/csrc/; the store's AEGIS-128L, kvapi/csrc/). The sources ship inside the
packages, so every install (wheel, sdist, editable) can build them; the build lands in torch's
extension cache (`TORCH_EXTENSIONS_DIR`, default `~/.cache/torch_extensions`), once per machine,
torch install, source version and flag set, and concurrent processes wait on torch's file lock instead of
building twice. Callers keep a fallback: a build fails without a C++ compiler and ninja."""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

STALE_LOCK_S = 600.0  # no build takes this long: a lock this old was left by a killed build


def _clear_stale_lock(name: str) -> None:
    """torch's build lock has no owner: a build killed mid-way leaves `lock` in the build folder
    and every later process would wait on it forever. A lock older than any build is removed."""
    try:
        from torch.utils import cpp_extension

        lock = Path(cpp_extension._get_build_directory(name, False)) / "lock"
        age = time.time() - lock.stat().st_mtime
    except (OSError, AttributeError):  # no lock (the usual case), or another torch layout
        return
    if age > STALE_LOCK_S:
        log.warning("native build: removing a build lock left %.0f s ago by a build that never finished (%s)", age,
                    lock)
        lock.unlink(missing_ok=True)


def build_name(prefix: str, source: Path, cflags: list[str], install: str | None = None) -> str:
    """`<prefix>_<hash of source, flags and the torch install>`: a changed source or flag set is a new
    build, and two environments sharing the extension cache each keep their own (with one name they
    rebuilt it over each other on every switch: torch's include paths differ). `install`: this one's."""
    if install is None:
        import torch

        install = f"{torch.__version__} {Path(torch.__file__).resolve().parent}"
    return f"{prefix}_{hashlib.sha1((source.read_text() + ' '.join(cflags) + install).encode()).hexdigest()[:10]}"


def build(prefix: str, source: Path, cflags: list[str], ldflags: list[str] | None = None) -> ModuleType:
    """The extension module built from `source` with `cflags`, named by `build_name`. Raises whatever
    the build raises."""
    name = build_name(prefix, source, cflags)
    _clear_stale_lock(name)
    from torch.utils import cpp_extension

    return cpp_extension.load(name=name, sources=[str(source)], extra_cflags=cflags,
                              extra_ldflags=ldflags or [], verbose=False)
