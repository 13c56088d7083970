"""The OpenAI-compatible HTTP gateway (aiohttp) in front of a router."""
