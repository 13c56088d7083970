"""Balanced prefill/decode: the decode engine prefills the last `fraction` of the prompt
itself, so the prefill engine is not the bottleneck when prompts are long."""

from microserve import Strategy


class BalancedPD(Strategy):
    roles = {"prefill": 1, "decode": 1}
    fraction = 0.1  # share of the prompt prefilled on the decode engine

    async def generate(self, req, cluster):
        prefill = cluster.least_loaded("prefill")
        decode = cluster.least_loaded("decode")
        end = min(req.split(1 - self.fraction), len(req.prompt_ids) - 1)
        ticket = await decode.prep_recv(req, end=end)
        if ticket.matched < end:
            await prefill.remote_send(req, ticket.kv, begin=ticket.matched, end=end)
        async for chunk in decode.start_generate(req, begin=end):
            yield chunk
