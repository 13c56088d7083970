"""A custom strategy: short prompts run whole on one engine, long ones are disaggregated.

    microserve launch --strategy examples/my_strategy.py --model demo --strategy-arg threshold=64
"""

from microserve import Strategy


class LengthAwarePD(Strategy):
    roles = {"prefill": 1, "decode": 1}  # noqa: RUF012
    threshold = 256  # prompts at least this long go through the prefill engine

    async def generate(self, req, cluster):
        decode = cluster.least_loaded("decode")
        end = len(req.prompt_ids) - 1
        if end >= self.threshold:
            ticket = await decode.prep_recv(req, end=end)
            if ticket.matched < end:
                await cluster.least_loaded("prefill").remote_send(req, ticket.kv, begin=ticket.matched, end=end)
        else:
            end = 0
        async for chunk in decode.start_generate(req, begin=end):
            yield chunk
