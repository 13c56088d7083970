"""Call a running gateway with the official `openai` client (streaming chat, then a completion).

    microserve launch --strategy strategies/balanced_pd.py --model demo --port 8000 &
    python examples/openai_client.py [BASE_URL]     # default http://127.0.0.1:8000/v1
"""

import asyncio
import sys

import openai


async def main(base_url: str) -> None:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="none")
    model = (await client.models.list()).data[0].id
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is prefill/decode disaggregation?"}],
        max_tokens=32, temperature=0, stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.choices:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
        if chunk.usage:
            print(f"\n[{chunk.usage.prompt_tokens} prompt + {chunk.usage.completion_tokens} completion tokens]")
    out = await client.completions.create(model=model, prompt="Once upon a time", max_tokens=16, temperature=0)
    print(repr(out.choices[0].text), out.choices[0].finish_reason)


asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000/v1"))
