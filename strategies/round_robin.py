"""Data parallel: every request runs whole on the least loaded engine (equal loads take turns)."""

from microserve import Strategy


class RoundRobin(Strategy):
    roles = {"engine": 2}

    async def generate(self, req, cluster):
        engine = cluster.least_loaded()
        async for chunk in engine.start_generate(req):
            yield chunk
