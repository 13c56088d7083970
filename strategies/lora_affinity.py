"""LoRA affinity: a request under an adapter goes to an engine that holds the adapter (its stats say
so), preferring the engine already running that adapter's requests, so each engine's batches mix
few adapters (a step pays for every adapter its rows use: docs/models.md); once that engine carries
`balance_requests` more requests than the idlest holder, a hot adapter spreads to the idlest one.
Requests on the base model go to the least loaded engine."""

from collections import Counter, defaultdict

from microserve import Strategy


class LoraAffinity(Strategy):
    roles = {"engine": 2}
    balance_requests = 4  # how many more requests the adapter's engine may carry than the idlest holder

    async def generate(self, req, cluster):
        name = req.sampling.lora
        engines = cluster.engines()
        if name is not None:
            engines = [e for e in engines if (s := cluster.load(e).stats) is None or name in s.loras] or engines
        idle = min(engines, key=lambda e: cluster.load(e).requests)
        engine = idle if name is None else max(engines, key=lambda e: (self._running[e][name],
                                                                      -cluster.load(e).requests))
        if cluster.load(engine).requests > cluster.load(idle).requests + self.balance_requests:
            engine = idle
        self._running[engine][name] += 1
        try:
            async for chunk in engine.start_generate(req):
                yield chunk
        finally:
            self._running[engine][name] -= 1

    @property
    def _running(self) -> defaultdict:
        """Requests in flight per engine and adapter, as this strategy placed them."""
        if "_by_engine" not in self.__dict__:
            self._by_engine = defaultdict(Counter)
        return self._by_engine
