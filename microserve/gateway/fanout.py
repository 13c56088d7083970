"""The choices of one OpenAI request as streams: merged as they come, collected to the end, and
best_of's pick of the `n` most likely; a choice's logprobs in OpenAI's two formats.

    prompts x n (or best_of) Router.generate streams ─ merge ─> (choice index, Delta) as they arrive
                                                      ─ collect ─> one result per choice ─ best ─> n per prompt
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from microserve.router.deltas import Delta
from microserve.router.runtime import RouterError
from microserve.sampling_params import SamplingParams


def sum_usage(usages: list, n: int = 1) -> Any:
    """Usage of several choices: each prompt's tokens once (its `n` choices share it), every
    choice's completion tokens."""
    from microserve.router.deltas import Usage

    return Usage(sum(u.prompt_tokens for u in usages) // n, sum(u.completion_tokens for u in usages),
                 sum(u.cached_tokens for u in usages) // n)


async def merge(streams: list[AsyncIterator[Delta]]) -> AsyncIterator[tuple[int, Delta | RouterError]]:
    """Interleave several requests' deltas as they come (one stream: no tasks at all).
    A RouterError of one stream is yielded as an item, and ends the merge."""
    if len(streams) == 1:
        try:
            async for d in streams[0]:
                yield 0, d
        except RouterError as exc:
            yield 0, exc
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, s: AsyncIterator[Delta]) -> None:
        try:
            async for d in s:
                await queue.put((i, d))
        except RouterError as exc:
            await queue.put((i, exc))
        finally:
            await s.aclose()
            queue.put_nowait((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        live = len(tasks)
        while live:
            i, item = await queue.get()
            if item is None:
                live -= 1
                continue
            yield i, item
            if isinstance(item, RouterError):
                return
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class _Result:
    text: str = ""
    reason: str | None = None
    stop_reason: str | int | None = None
    usage: Any = None
    ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    prompt_logprobs: list | None = None


async def collect(streams: list[AsyncIterator[Delta]]) -> list[_Result]:
    """Run requests to the end: text, finish reason, usage, token ids and logprobs per request."""
    results = [_Result() for _ in streams]
    texts: list[list[str]] = [[] for _ in streams]
    # NOTE: closed on the spot when the handler is cancelled (client gone), not whenever the
    # garbage collector finalises the generator: that is what aborts the request and counts it
    async with contextlib.aclosing(merge(streams)) as merged:
        async for i, item in merged:
            if isinstance(item, RouterError):
                raise item
            texts[i].append(item.text)
            results[i].ids += item.token_ids
            results[i].logprobs += item.logprobs or []
            if item.prompt_logprobs is not None:
                results[i].prompt_logprobs = item.prompt_logprobs
            if item.finish_reason is not None:
                results[i].reason, results[i].usage = item.finish_reason, item.usage
                results[i].stop_reason = item.stop_reason
    for r, t in zip(results, texts):
        r.text = "".join(t)
    return results


def best(results: list[_Result], prompts: int, sp: SamplingParams) -> list[_Result]:
    """best_of: per prompt, the n choices of highest cumulative logprob (their usage counts every choice)."""
    count = max(sp.n, sp.best_of or 1)
    if count == sp.n:
        return results
    out = []
    for i in range(prompts):
        group = results[i * count:(i + 1) * count]
        out += sorted(group, key=lambda r: -sum(lp.logprob for lp in r.logprobs))[:sp.n]
    return out


# -- logprobs, as OpenAI's two formats -----------------------------------------------------
def token_namer(tokenizer, as_ids: bool | None):
    """How logprobs name a token: its text, or `token_id:N` (vLLM's return_tokens_as_token_ids)."""
    return (lambda t: f"token_id:{t}") if as_ids else (lambda t: tokenizer.decode([t]))


def completion_logprobs(name, ids: list[int], lps, offset: int) -> dict[str, Any]:
    """/v1/completions: tokens, token_logprobs, top_logprobs (token text -> logprob), text_offset."""
    texts = [name(t) for t in ids]
    offsets, pos = [], offset
    for t in texts:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": texts, "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{name(t): v for t, v in lp.top} for lp in lps],
            "text_offset": offsets}


def chat_logprobs(name, ids: list[int], lps) -> dict[str, Any]:
    """/v1/chat/completions: content = [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]."""
    def entry(t: int, v: float) -> dict[str, Any]:
        text = name(t)
        return {"token": text, "logprob": v, "bytes": list(text.encode())}

    return {"content": [entry(t, lp.logprob) | {"top_logprobs": [entry(a, v) for a, v in lp.top]}
                        for t, lp in zip(ids, lps)]}


def vllm_prompt_logprobs(name, prompt: list[int], lps) -> list[dict[str, Any] | None]:
    """vLLM's `prompt_logprobs`: None for the first token, then {token id: {logprob, rank, decoded_token}}
    holding the prompt token and its top alternatives (rank: 1-based in the whole vocabulary, as vLLM's)."""
    out: list[dict[str, Any] | None] = [None]
    for token, lp in zip(prompt[1:], lps):
        ranks = {t: r for r, (t, _) in enumerate(lp.top, 1)}
        entry = {str(t): {"logprob": v, "rank": ranks[t], "decoded_token": name(t)} for t, v in lp.top}
        rank = lp.rank if lp.rank is not None else ranks.get(token)
        entry.setdefault(str(token), {"logprob": lp.logprob, "rank": rank, "decoded_token": name(token)})
        out.append(entry)
    return out


def echo_logprobs(name, prompt: list[int], prompt_lps, ids: list[int], lps) -> dict[str, Any]:
    """Completions' `echo` with `logprobs`: the prompt's tokens first (the first one has none), then the output's."""
    head = completion_logprobs(name, prompt, prompt_lps, 0)
    head["token_logprobs"] = [None, *head["token_logprobs"]]
    head["top_logprobs"] = [None, *head["top_logprobs"]]
    tail = completion_logprobs(name, ids, lps, head["text_offset"][-1] + len(head["tokens"][-1]) if prompt else 0)
    return {key: head[key] + tail[key] for key in head}


def result_logprobs(body, name, prompt: list[int], r) -> dict[str, Any] | None:
    """The `logprobs` of one finished (not streamed) completion choice, echo included."""
    if body.logprobs is None:
        return None
    if body.echo:
        return echo_logprobs(name, prompt, r.prompt_logprobs or [], r.ids, r.logprobs)
    return completion_logprobs(name, r.ids, r.logprobs, 0)
