"""The models behind one gateway (`launch --config`): each served name leads to one model's router.

A request's `model` picks the `Served` entry whose names (or unlisted accepted names, such as the
checkpoint path as given) hold it, else the one whose engines report a LoRA adapter of that name.
Each model has its own router, cluster and strategy, so its requests reach its engines only, and
its prefix index, KV events and transfers never see another model's.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

from microserve.router.runtime import Router, RouterError
from microserve.serving.api import ErrorCode
from microserve.text import NoTokenizer


@dataclass
class Served:
    """One model: its router, the names clients pass as `model`, and its default sampling.

    `names[0]` is its primary name (responses carry the name their request gave); `accept`: more
    names taken but not listed by /v1/models; `defaults`: sampling fields a request leaves out
    (`--generation-config`, gateway/generation.py)."""

    router: Router
    names: list[str]
    accept: list[str] = field(default_factory=list)
    defaults: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.names = list(dict.fromkeys(self.names))
        self.accepted = {*self.names, *self.accept}
        # no tokenizer (skip_tokenizer_init): token-id prompts, every choice carries its token ids
        self.ids_only = isinstance(self.router.tokenizer, NoTokenizer)

    @property
    def name(self) -> str:
        return self.names[0]

    def adapters(self) -> set[str]:
        """The LoRA adapters this model's live engines report loaded (their polled stats)."""
        cluster = self.router.cluster
        return {name for h in cluster.handles if h.alive and (st := cluster.load(h).stats) is not None
                for name in st.loras}


class ServedModels:
    """The gateway's models, in the order given (the first serves requests that name no model)."""

    def __init__(self, first: Served) -> None:
        self.all = [first]

    def add(self, served: Served) -> None:
        taken = {n for m in self.all for n in m.accepted}
        if clash := sorted(taken & served.accepted):
            raise ValueError(f"the served name {clash[0]!r} is given to two models; each name leads to one model")
        self.all.append(served)

    @property
    def default(self) -> Served:
        return self.all[0]

    def listed(self) -> list[str]:
        return [n for m in self.all for n in m.names]

    def by_name(self, model: str | None) -> Served:
        """The model a request names (None: the first); 404 naming what is served."""
        if model is None:
            return self.default
        for m in self.all:
            if model in m.accepted:
                return m
        raise self._unknown(model)

    def _unknown(self, model: str) -> RouterError:
        return RouterError(ErrorCode.MODEL_NOT_FOUND, f"the model {model!r} does not exist; this server serves "
                           f"{', '.join(map(repr, self.listed()))}", param="model")

    def by_adapter(self, model: str) -> Served | None:
        return next((m for m in self.all if model in m.adapters()), None)

    async def target(self, model: str | None) -> tuple[Served, str, str | None]:
        """The model a request runs on, the name its response carries, and the LoRA adapter it runs
        under (a served adapter's name as `model`; None: the base model)."""
        if model is None or any(model in m.accepted for m in self.all):
            served = self.by_name(model)
            return served, model or served.name, None
        if self.by_adapter(model) is None:  # NOTE: loaded since the last poll? ask once, bounded
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(m.router.cluster.poll() for m in self.all)), 2.0)
        if (served := self.by_adapter(model)) is not None:
            return served, model, model
        raise self._unknown(model)
