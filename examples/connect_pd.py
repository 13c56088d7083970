"""Script the three microserving calls yourself: prefill on one engine, decode on another.

    microserve keygen cluster.key && export MICROSERVE_CLUSTER_KEY=$PWD/cluster.key
    microserve engine --model demo --rpc tcp://127.0.0.1:5601 &
    microserve engine --model demo --rpc tcp://127.0.0.1:5602 &
    python examples/connect_pd.py          # the handles read the same $MICROSERVE_CLUSTER_KEY
"""

import asyncio

import microserve
from microserve.demo import resolve_model
from microserve.engine.model.tokenizer import Tokenizer


async def main() -> None:
    tok = Tokenizer(resolve_model("demo"))
    cluster = await microserve.connect({"prefill": ["tcp://127.0.0.1:5601"], "decode": ["tcp://127.0.0.1:5602"]})
    try:
        ids = tok.encode("A long shared system prompt. " * 8 + "And a question?")
        req = microserve.Request("example-1", ids, microserve.SamplingParams(max_tokens=16, temperature=0))
        p, d = cluster.least_loaded("prefill"), cluster.least_loaded("decode")
        end = len(ids) - 1
        ticket = await d.prep_recv(req, end=end)  # D reserves blocks for [matched, end)
        if ticket.matched < end:
            sent = await p.remote_send(req, ticket.kv, begin=ticket.matched, end=end)  # P computes, writes into D
            print(f"moved {sent.bytes} bytes of KV over {sent.transport} in {sent.seconds * 1000:.1f} ms")
        tokens = [t async for chunk in d.start_generate(req, begin=end) for t in chunk.token_ids]
        print(repr(tok.decode(tokens)))
        await asyncio.sleep(0.1)
        print("prefix index:", cluster.prefix_index.longest_match(req))
    finally:
        await cluster.close()


asyncio.run(main())
