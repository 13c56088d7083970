"""Generate offline with the built-in engine (no server).

    python examples/offline.py [MODEL]      # MODEL: a checkpoint folder, default "demo"
"""

import sys

import microserve

llm = microserve.LLM(sys.argv[1] if len(sys.argv) > 1 else "demo")
outs = llm.generate(["Hello, world", "KV caches are"], microserve.SamplingParams(max_tokens=16, temperature=0))
for out in outs:
    print(f"{out.finish_reason:>6} {len(out.token_ids):>3} tokens: {out.text!r}")
