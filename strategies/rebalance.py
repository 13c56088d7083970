"""Rebalance: data parallel, and a long-running decode leaves an engine whose KV cache is filling up
for the idlest engine, taking its KV with it (live migration: `cluster.migrate`), at most once."""

from microserve import Strategy


class Rebalance(Strategy):
    roles = {"engine": 2}
    high = 0.8  # move when the engine's KV use is above this ...
    margin = 0.3  # ... and the idlest engine's is this much lower
    min_tokens = 16  # only requests that have decoded this many tokens (long-running ones)

    async def generate(self, req, cluster):
        source = cluster.least_loaded()
        generated, stream = [], source.start_generate(req)
        target = None
        async for chunk in stream:
            generated += chunk.token_ids
            yield chunk
            if chunk.finish_reason is not None:
                return
            if len(generated) >= self.min_tokens and cluster.load(source).kv_usage > self.high:
                idle = cluster.least_loaded(exclude=[source]) if len(cluster.engines()) > 1 else None
                if idle is not None and cluster.load(idle).kv_usage < cluster.load(source).kv_usage - self.margin:
                    target = idle
                    break
        await stream.aclose()  # stops it on the source; its KV stays in the source's prefix cache
        async for chunk in cluster.migrate(req, generated, source, to=target):
            yield chunk
