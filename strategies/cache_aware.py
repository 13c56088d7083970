"""Cache-aware routing: send a request where most of its prompt is already cached, unless
that engine is much busier than the idlest one (so one hot prefix cannot pile every
request onto a single engine)."""

from microserve import Strategy


class CacheAware(Strategy):
    roles = {"engine": 2}
    balance_requests = 2  # how many more requests the cache holder may carry than the idlest engine
    min_tokens = 16  # matches shorter than this do not count as locality

    async def generate(self, req, cluster):
        idle = cluster.least_loaded()
        matches = cluster.prefix_index.matches(req)
        engine = max(cluster.engines(), key=lambda e: (matches.get(e, 0), -cluster.load(e).requests))
        too_busy = cluster.load(engine).requests > cluster.load(idle).requests + self.balance_requests
        if matches.get(engine, 0) < self.min_tokens or too_busy:
            engine = idle
        async for chunk in engine.start_generate(req):
            yield chunk
