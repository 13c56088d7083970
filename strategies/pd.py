"""Prefill/decode disaggregation (1P1D and up).

The prefill engine computes the prompt's KV and writes it straight into blocks the
decode engine reserved; the decode engine then only computes the last prompt token
(it needs that token's logits) and decodes.
"""

from microserve import Strategy


class PD(Strategy):
    roles = {"prefill": 1, "decode": 1}

    async def generate(self, req, cluster):
        prefill = cluster.least_loaded("prefill")
        decode = cluster.least_loaded("decode")
        end = len(req.prompt_ids) - 1  # all but the last token, which decode computes
        ticket = await decode.prep_recv(req, end=end)
        if ticket.matched < end:  # decode may already hold a prefix in its cache
            await prefill.remote_send(req, ticket.kv, begin=ticket.matched, end=end)
        async for chunk in decode.start_generate(req, begin=end):
            yield chunk
