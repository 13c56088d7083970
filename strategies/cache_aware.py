"""Cache-aware routing: send a request where the least of its prompt must be computed, unless
that engine is much busier than the idlest one (so one hot prefix cannot pile every request
onto a single engine).

What an engine has without computing is read from `cluster.prefix_index.locate`: prompt tokens
in its page pool (free), in its own KV store tiers and in the cluster's shared tier (loaded, at
`load_cost` of a computed token). A prefix in the shared tier makes every engine a good choice,
so the load decides."""

from microserve import Strategy


class CacheAware(Strategy):
    roles = {"engine": 2}
    balance_requests = 2  # how many more requests the cache holder may carry than the idlest engine
    min_tokens = 16  # savings smaller than this many computed tokens do not count as locality
    load_cost = 0.1  # cost of loading a stored token relative to computing it (LMCache: ~10x cheaper)

    def saved(self, reach) -> float:
        """Computed tokens an engine saves on this prompt (pool hits are free, tier hits cost a load)."""
        return reach.pool + (reach.shared - reach.pool) * (1 - self.load_cost)

    async def generate(self, req, cluster):
        idle = cluster.least_loaded()
        reach = cluster.prefix_index.locate(req)
        engine = max(cluster.engines(), key=lambda e: (self.saved(reach[e]) if e in reach else 0,
                                                      -cluster.load(e).requests))
        gain = (self.saved(reach[engine]) if engine in reach else 0) - (self.saved(reach[idle]) if idle in reach else 0)
        too_busy = cluster.load(engine).requests > cluster.load(idle).requests + self.balance_requests
        if gain < self.min_tokens or too_busy:
            engine = idle
        async for chunk in engine.start_generate(req):
            yield chunk
