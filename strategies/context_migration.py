"""Context migration: a request whose prefix is cached on a busy engine runs on an idle
engine instead, after the busy engine sends it the cached KV (no recompute anywhere)."""

from microserve import Strategy


class ContextMigration(Strategy):
    roles = {"engine": 2}
    min_tokens = 32  # shorter cached prefixes are cheaper to recompute than to move
    busy_margin = 2  # holder's extra requests over the idlest engine before we migrate

    async def generate(self, req, cluster):
        engine = cluster.least_loaded()
        holder, matched = cluster.prefix_index.longest_match(req)
        matched = min(matched, len(req.prompt_ids) - 1)
        begin = 0
        if holder is not None and holder is not engine and matched >= self.min_tokens:
            if cluster.load(holder).requests <= cluster.load(engine).requests + self.busy_margin:
                engine = holder  # not busy enough to bother: reuse its cache in place
            else:
                ticket = await engine.prep_recv(req, end=matched)
                if ticket.matched < matched:
                    await holder.remote_send(req, ticket.kv, begin=ticket.matched, end=matched)
                begin = matched
        async for chunk in engine.start_generate(req, begin=begin):
            yield chunk
