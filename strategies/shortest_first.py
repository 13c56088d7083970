"""Shortest job first: a request's priority is the output it asks for (`max_tokens`, in buckets of
16), so under load the engines admit short answers before long ones (lower runs first, as vLLM's
`priority`). A priority the client set itself is kept. Routing is data parallel."""

import msgspec

from microserve import Strategy


class ShortestFirst(Strategy):
    roles = {"engine": 2}
    bucket = 16  # max_tokens that share one priority

    async def generate(self, req, cluster):
        if req.sampling.priority == 0:
            req.sampling = msgspec.structs.replace(req.sampling, priority=1 + req.sampling.max_tokens // self.bucket)
        engine = cluster.least_loaded()
        async for chunk in engine.start_generate(req):
            yield chunk
