"""`microserve engine --join URL --role R`: an engine adds itself to a running deployment, and on
SIGTERM drains and removes itself before it exits.

    READY ─> POST URL/admin/engines {"address": its RPC address, "role", "id"}  (retried until the gateway answers)
          ─> every 5 s the same POST: a no-op while it is a member; after an eviction (it did not answer
             for a while) or a gateway restart, it joins again
    SIGTERM ─> DELETE URL/admin/engines/{engine id}: the router stops sending it requests and waits
               for those in flight, which the engine keeps serving ─> the engine stops

Both calls carry the cluster's join token (derived from the cluster key), so only an engine of the
cluster can join or leave; the admin key is not needed.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

log = logging.getLogger("microserve.join")


async def join(url: str, address: str, role: str, token: str, engine_id: str = "", timeout: float = 60.0,
               interval: float = 5.0) -> None:
    """Register with the gateway at `url`, retrying while it is not up yet (RuntimeError when refused
    or unreachable for `timeout`), then keep checking membership every `interval` seconds (re-joins
    after an eviction). Runs until cancelled."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    headers = {"Authorization": f"Bearer {token}"}
    body = {"address": address, "role": role, "id": engine_id}
    member = False
    async with aiohttp.ClientSession(trust_env=False) as s:
        while True:
            try:
                async with s.post(f"{url.rstrip('/')}/admin/engines", json=body, headers=headers) as r:
                    if r.status == 201:
                        log.warning("%s %s as %s", "re-joined" if member else "joined", url, role)
                    elif r.status != 200:
                        raise RuntimeError(f"{url} refused to add this engine: {r.status} {await r.text()}")
                    member = True
            except aiohttp.ClientError as exc:
                if not member and loop.time() > deadline:
                    raise RuntimeError(f"cannot reach {url} to join: {exc}") from None
                log.info("membership check at %s: %s", url, exc)
                await asyncio.sleep(0.5 if not member else interval)
                continue
            await asyncio.sleep(interval)


async def leave(url: str, engine_id: str, token: str) -> None:
    """Drain and deregister (the gateway answers once this engine's requests in flight are done)."""
    try:
        async with aiohttp.ClientSession(trust_env=False) as s, s.delete(
                f"{url.rstrip('/')}/admin/engines/{engine_id}", headers={"Authorization": f"Bearer {token}"}) as r:
            if r.status != 200:
                log.warning("leaving %s: %s %s", url, r.status, await r.text())
    except aiohttp.ClientError as exc:
        log.warning("leaving %s: %s (stopping anyway)", url, exc)
