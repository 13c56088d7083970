"""DistAttention (DistKV-LLM): data parallel, and a request larger than its engine's free KV borrows the
overflow: ranges of its prompt are lent by the engines with the most free blocks (the global manager's
rule), their KV is written there and each layer's attention over them runs there. The router frees the
lent ranges when the request ends; a lost lender fails the request over (recomputed without it)."""

from microserve import Strategy


def room(cluster, engine) -> int:
    """Free KV tokens on an engine by its last stats (cached blocks can be evicted)."""
    s = cluster.load(engine).stats
    free = s.kv_blocks_total - s.kv_blocks_used + s.kv_blocks_cached if s else 0
    return free * cluster.health[engine].kv_spec.block_size


class DistAttention(Strategy):
    roles = {"engine": 2}
    span = 256  # tokens per lent range (each is computed here before it moves: two fit beside the head)

    async def generate(self, req, cluster):
        engine, n = cluster.least_loaded(), len(req.prompt_ids)
        need, have = n + req.sampling.max_tokens, room(cluster, engine) - self.span  # NOTE: polled: a margin
        lenders = {e: room(cluster, e) for e in cluster.engines() if e is not engine}
        ranges = []
        if need > have and lenders:  # keep [0, span) and the tail here, lend [span, end) in spans
            end = min(-(-(self.span + need - have) // self.span) * self.span, n // self.span * self.span)
            for begin in range(self.span, end, self.span):
                lender = max(lenders, key=lenders.get)
                lenders[lender] -= self.span
                ranges.append(await lender.lend(req, begin, begin + self.span))
        async for chunk in engine.start_generate(req, lenders=ranges):
            yield chunk
