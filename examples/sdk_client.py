"""The microserve Python SDK against a running gateway.

    microserve launch --strategy strategies/round_robin.py --model demo --port 8000 &
    python examples/sdk_client.py [URL]      # default http://127.0.0.1:8000
"""

import asyncio
import sys

import microserve


async def main(url: str) -> None:
    async with microserve.AsyncClient(url) as client:
        out = await client.completions("The KV cache", max_tokens=16, temperature=0)
        print(repr(out.text), out.finish_reason, out.usage)
        async for piece in client.stream_chat([{"role": "user", "content": "Hi!"}], max_tokens=16, temperature=0):
            print(piece.text, end="", flush=True)
        print()


asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000"))
