"""Load-adaptive PD: disaggregate (balanced PD) while the prefill engine keeps up; when its
queue is long, serve the request whole on the least loaded engine, as data parallel does.

1P1D wins at low load (decode steps never stall behind a 3000-token prefill) but its one
prefill engine saturates first as the rate grows; data parallel then wins because both
engines prefill. This strategy watches the prefill engine's queued prompt tokens (the
router's exact view plus the engine's polled stats) and switches per request.
"""

from microserve import Strategy


class AdaptivePD(Strategy):
    roles = {"prefill": 1, "decode": 1}
    fraction = 0.1  # share of the prompt the decode engine prefills when disaggregating
    max_prefill_queue = 4096  # queued prompt tokens on the prefill engine beyond which decode prefills alone

    async def generate(self, req, cluster):
        prefill = cluster.least_loaded("prefill")
        if cluster.load(prefill).queued_tokens > self.max_prefill_queue:
            async for chunk in cluster.least_loaded().start_generate(req):  # every engine, any role
                yield chunk
            return
        decode = cluster.least_loaded("decode")
        end = min(req.split(1 - self.fraction), len(req.prompt_ids) - 1)
        ticket = await decode.prep_recv(req, end=end)
        if ticket.matched < end:
            await prefill.remote_send(req, ticket.kv, begin=ticket.matched, end=end)
        async for chunk in decode.start_generate(req, begin=end):
            yield chunk
