"""`Strategy`: how one request is served, written as a few microserving calls.

A strategy file holds exactly one `Strategy` subclass:

    class BalancedPD(Strategy):
        roles = {"prefill": 1, "decode": 1}      # default engine layout for `microserve launch`
        fraction = 0.1                           # tunable: `--strategy-arg fraction=0.2`

        async def generate(self, req, cluster):  # an async generator of GenerateChunk
            ...

The router runs `generate` once per request (again on another engine if an engine
dies before the first token; see `microserve.router.runtime`). Class attributes
other than `roles` are the strategy's parameters; `load_strategy` overrides them.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from microserve.protocol import GenerateChunk, Request
    from microserve.router.cluster import Cluster


class StrategyError(ValueError):
    """A strategy file that cannot be used (no subclass, several, import error, bad argument)."""


class Strategy:
    """Base class of routing strategies.

    Attributes:
        roles: default layout `{role: number of engines}` used by `microserve launch`.
    """

    roles: ClassVar[dict[str, int]] = {"engine": 1}

    async def generate(self, req: Request, cluster: Cluster) -> AsyncIterator[GenerateChunk]:
        """Serve `req` on `cluster`: yield the `GenerateChunk`s of its output, in order."""
        raise NotImplementedError(f"{type(self).__name__} does not implement generate()")
        yield  # pragma: no cover  (makes this an async generator)

    @classmethod
    def parameters(cls) -> dict[str, Any]:
        """The tunable class attributes (`--strategy-arg NAME=VALUE`) and their defaults."""
        return class_parameters(cls, ("roles",))


def class_parameters(cls: type, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The public class attributes of `cls` and its bases that are numbers, booleans or strings (a
    strategy's or a planner's parameters), by name, the subclass's value winning."""
    out = {}
    for klass in reversed(cls.__mro__[:-1]):
        for name, value in vars(klass).items():
            if not name.startswith("_") and name not in exclude and isinstance(value, bool | int | float | str):
                out[name] = value
    return out


_SHIPPED = Path(__file__).resolve().parents[2] / "strategies"


def resolve_strategy_path(spec: str | Path) -> Path:
    """A file path, or the name of a shipped strategy ("pd", "balanced_pd", ...)."""
    path = Path(spec)
    if path.is_file():
        return path
    if path.suffix == "" and "/" not in str(spec):
        try:
            import strategies
            shipped = Path(strategies.__file__).parent / f"{spec}.py"
        except ImportError:  # pragma: no cover
            shipped = _SHIPPED / f"{spec}.py"
        if shipped.is_file():
            return shipped
    raise StrategyError(f"strategy file {str(spec)!r} not found (give a path to a .py file, or one of the "
                        f"shipped names: {', '.join(shipped_strategies())})")


def shipped_strategies() -> list[str]:
    try:
        import strategies
        folder = Path(strategies.__file__).parent
    except ImportError:  # pragma: no cover
        folder = _SHIPPED
    return sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))


def load_subclass(path: Path, base: type, kind: str, error: type[Exception] = StrategyError) -> type:
    """Import the file at `path` and return its one subclass of `base` (a strategy, a planner);
    raises `error` naming the `kind` of file when it has none, several, or fails to import."""
    name = f"microserve_{kind}_{path.stem}_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise error(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise error(f"{kind} file {path} failed to import: {type(exc).__name__}: {exc}") from exc
    found = [obj for obj in vars(module).values()
             if inspect.isclass(obj) and issubclass(obj, base) and obj is not base and obj.__module__ == name]
    if not found:
        raise error(f"{kind} file {path} defines no microserve.{base.__name__} subclass")
    if len(found) > 1:
        raise error(f"{kind} file {path} defines {len(found)} {base.__name__} subclasses "
                    f"({', '.join(c.__name__ for c in found)}); keep exactly one per file")
    return found[0]


def load_strategy_class(spec: str | Path) -> type[Strategy]:
    """Import a strategy file and return its one `Strategy` subclass."""
    cls = load_subclass(resolve_strategy_path(spec), Strategy, "strategy")
    if not inspect.isasyncgenfunction(cls.generate):
        raise StrategyError(f"{cls.__name__}.generate must be an async generator (`async def` with `yield`)")
    for role, n in cls.roles.items():
        if not isinstance(n, int) or n < 1:
            raise StrategyError(f"{cls.__name__}.roles[{role!r}] must be a positive integer, got {n!r}")
    return cls


def load_strategy(spec: str | Path, args: Mapping[str, str | Any] | None = None) -> Strategy:
    """Load a strategy file and instantiate it with parameter overrides (strings are converted
    to the type of the class attribute they override)."""
    cls = load_strategy_class(spec)
    strategy = cls()
    params = cls.parameters()
    for key, value in (args or {}).items():
        if key not in params:
            raise StrategyError(f"{cls.__name__} has no parameter {key!r}; parameters: "
                                f"{', '.join(f'{k}={v!r}' for k, v in params.items()) or 'none'}")
        setattr(strategy, key, convert(key, value, params[key]))
    return strategy


def convert(key: str, value: Any, default: Any, error: type[Exception] = StrategyError) -> Any:
    """`value` as the type of `default` (a `NAME=VALUE` string from the command line or the admin API)."""
    if not isinstance(value, str) or isinstance(default, str):
        return value
    try:
        if isinstance(default, bool):
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("1", "true", "yes")
        return type(default)(value)
    except ValueError:
        raise error(f"parameter {key}: {value!r} is not a {type(default).__name__}") from None


def parse_roles(text: str) -> dict[str, int]:
    """"prefill=1,decode=2" -> {"prefill": 1, "decode": 2}."""
    roles: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        role, sep, count = part.partition("=")
        if not sep or not role.strip() or not count.strip().isdigit() or int(count) < 1:
            raise StrategyError(f"bad --roles entry {part!r}: expected ROLE=N with N >= 1, e.g. prefill=1,decode=1")
        roles[role.strip()] = int(count)
    if not roles:
        raise StrategyError("--roles is empty")
    return roles
