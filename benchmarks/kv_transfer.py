"""KV transfer between two processes, every transport, against the limits of this host.

Part 1, the transfer layer (`kvapi.transfer`): move the KV of N tokens shaped like
Llama-3.1-8B (32 layers x 8 KV heads x 128 dims, bfloat16, 128 KiB/token) from this
process's pool into a receiver process's pool (a `KVReceiver` over a shared `memfd`
pool, offering every transport installed here), with the receiver's blocks laid out in
runs of R consecutive blocks (blocks of 8 tokens: a page is 16 KiB; R = 1 ... 128 gives
page runs of 16 KiB ... 2 MiB). Side by side, same bytes, same run:
  - `memcpy`: one contiguous copy into the receiver's mapped pool (the limit for shm and nixl);
  - raw socket: one `sendall` / `recv_into` stream into preallocated memory (the limit for tcp, ucx).
Part 2, the engines: two `microserve engine` processes (random Llama, 8 layers); the
time `remote_send` takes (prefill on P + transfer to D) next to a local prefill of the
same prompt on P (`start_generate` with max_tokens=1), per transport.

    python benchmarks/kv_transfer.py                      # 2k tokens, runs of 16 KiB ... 2 MiB
    python benchmarks/kv_transfer.py --tokens 8192 --runs 16 2048 --skip-engines
    python benchmarks/kv_transfer.py --handshakes 2000    # small transfers/s vs raw connect+exchange, flood or not
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from kvapi import KVSpec
from kvapi.transfer import KVAddr, KVReceiver, KVSender, host_id
from kvapi.transfer.base import recv_exact
from kvapi.transfer.nixl import nixl_available
from kvapi.transfer.shm import PoolMaps, SharedPool
from kvapi.transfer.ucx import ucx_available

SPEC_8B = KVSpec(num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16", block_size=8)  # 16 KiB pages
LIMIT = {"shm": "memcpy", "nixl": "memcpy", "tcp": "raw socket", "ucx": "raw socket"}


def _receiver_main(conn, num_blocks: int) -> None:
    pool = SharedPool(SPEC_8B, num_blocks)
    rx = KVReceiver(pool.tensor, SPEC_8B, shm_path=pool.path, ucx=ucx_available(), nixl=nixl_available())
    raw = socket.create_server(("127.0.0.1", 0))
    conn.send((rx.endpoint, raw.getsockname()[1], list(rx.transports), rx.fields))
    flat = pool.tensor.view(torch.uint8).view(-1).numpy()
    while True:
        cmd = conn.recv()
        if cmd[0] == "ticket":
            _, tid, blocks = cmd
            done = []
            rx.open_ticket(tid, "secret", blocks, done.append)
            conn.send("ok")
        elif cmd[0] == "raw":  # receive nbytes on a plain socket into the pool memory
            nbytes = cmd[1]
            conn.send("ready")
            s, _ = raw.accept()
            with s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                recv_exact(s, memoryview(flat)[:nbytes])
                s.sendall(b"k")
        else:
            break


def bench_size(tokens: int, run_blocks: list[int], repeats: int) -> list[tuple]:
    rows = []
    nb = tokens // SPEC_8B.block_size
    pool_blocks = 2 * nb + 1  # room for a gap after every run
    parent, child = mp.Pipe()
    proc = mp.get_context("spawn").Process(target=_receiver_main, args=(child, pool_blocks), daemon=True)
    proc.start()
    endpoint, raw_port, offered, fields = parent.recv()
    src = torch.randn(SPEC_8B.cache_shape(nb), dtype=torch.bfloat16)
    nbytes = src.numel() * src.element_size()
    tx = KVSender(src, SPEC_8B)
    pool = PoolMaps().get(fields["shm_path"], SPEC_8B)
    pool.zero_()  # NOTE: first touch of every page here (in this VM it costs more than the copy)
    dst = pool[:, :, :nb]
    src_blocks = list(range(nb))

    def raw_send():
        parent.send(("raw", nbytes))
        parent.recv()
        with socket.create_connection(("127.0.0.1", raw_port)) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            s.sendall(memoryview(src.view(torch.uint8).view(-1).numpy()))
            s.recv(1)
    counter = iter(range(10**6))

    def send(mode: str, blocks: list[int]) -> None:
        tid = f"t{next(counter)}"
        parent.send(("ticket", tid, blocks))
        parent.recv()
        addr = KVAddr("rx", endpoint, tid, "secret", 0, tokens, blocks, SPEC_8B, offered, host_id(), **fields)
        tx.send(addr, 0, tokens, lambda: src_blocks, mode)

    # NOTE: rounds interleave the paths, so drifts in machine speed hit all
    modes = [m for m in ("shm", "nixl", "ucx", "tcp") if m in offered]
    for run in run_blocks:
        blocks = [i + i // run for i in range(nb)]  # runs of `run` blocks, one free block between runs
        paths = {"memcpy": lambda: dst.copy_(src), "raw socket": raw_send}
        paths |= {m: (lambda m=m, b=blocks: send(m, b)) for m in modes}
        for fn in paths.values():  # NOTE: one untimed round: connections / endpoints are set up once per pair
            fn()
        times: dict[str, list[float]] = {k: [] for k in paths}
        for _ in range(repeats):
            for name, fn in paths.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        gbps = {k: nbytes / statistics.median(v) / 1e9 for k, v in times.items()}
        kib = run * SPEC_8B.page_bytes // 1024
        for mode in modes:
            limit = LIMIT[mode]
            rows.append((tokens, kib, mode, gbps[mode], limit, gbps[limit], gbps[mode] / gbps[limit]))
    parent.send(("stop",))
    proc.join(10)
    return rows


def _cuda_receiver_main(conn, num_blocks: int) -> None:
    pool = torch.zeros(SPEC_8B.cache_shape(num_blocks), dtype=torch.bfloat16, device="cuda")
    rx = KVReceiver(pool, SPEC_8B, transports=["nixl", "tcp"])
    conn.send((rx.endpoint, list(rx.transports), rx.fields))
    while True:
        cmd = conn.recv()
        if cmd[0] == "ticket":
            rx.open_ticket(cmd[1], "secret", cmd[2], lambda o: None)
            conn.send("ok")
        elif cmd[0] == "check":  # the pages that arrived equal what was sent (a checksum of the pool)
            torch.cuda.synchronize()
            conn.send(float(pool.float().sum()))
        else:
            break


def bench_cuda(tokens: int, repeats: int) -> list[tuple]:
    """VRAM to VRAM between two processes on one GPU: nixl (UCX's cuda_ipc underneath) and tcp
    (staged through host memory) against a device-to-device copy in one process."""
    nb = tokens // SPEC_8B.block_size
    parent, child = mp.Pipe()
    proc = mp.get_context("spawn").Process(target=_cuda_receiver_main, args=(child, nb), daemon=True)
    proc.start()
    if not parent.poll(120):
        raise RuntimeError(f"the receiver process did not start (exit code {proc.exitcode})")
    endpoint, offered, fields = parent.recv()
    src = torch.randn(SPEC_8B.cache_shape(nb), dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    nbytes = src.numel() * src.element_size()
    tx = KVSender(src, SPEC_8B)
    blocks, counter = list(range(nb)), iter(range(10**6))

    def send(mode: str) -> None:
        tid = f"t{next(counter)}"
        parent.send(("ticket", tid, blocks))
        parent.recv()
        addr = KVAddr("rx", endpoint, tid, "secret", 0, tokens, blocks, SPEC_8B, offered, host_id(), **fields)
        tx.send(addr, 0, tokens, lambda: blocks, mode)

    def device_copy() -> None:
        dst.copy_(src)
        torch.cuda.synchronize()

    paths = {"device copy": device_copy} | {m: (lambda m=m: send(m)) for m in ("nixl", "tcp") if m in offered}
    times: dict[str, list[float]] = {k: [] for k in paths}
    for round_ in range(repeats + 1):  # NOTE: round 0 untimed: connections, registrations, CUDA IPC handles
        for name, fn in paths.items():
            t0 = time.perf_counter()
            fn()
            if round_:
                times[name].append(time.perf_counter() - t0)
    parent.send(("check",))
    same = abs(parent.recv() - float(src.float().sum())) <= 1e-3 * float(src.float().abs().sum())
    parent.send(("stop",))
    proc.join(10)
    gbps = {k: nbytes / statistics.median(v) / 1e9 for k, v in times.items()}
    return [(tokens, nbytes / 2**20, m, gbps[m], gbps["device copy"], gbps[m] / gbps["device copy"], same)
            for m in paths if m != "device copy"]


def bench_transfer(tokens_list: list[int], runs_kib: list[int], repeats: int) -> list[tuple]:
    runs = [max(1, kib * 1024 // SPEC_8B.page_bytes) for kib in runs_kib]
    return [row for tokens in tokens_list for row in bench_size(tokens, runs, repeats)]


async def bench_engines(lengths: list[int], repeats: int) -> list[tuple]:
    sys.path.insert(0, str(Path(__file__).parent))
    sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
    from engine_throughput import build_model
    from engines import start_engine, wait_engine

    from microserve import SamplingParams
    from microserve.protocol import Request
    from microserve.router import EngineHandle

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        build_model(tmp)
        args = ["--num-kv-blocks", "2048", "--max-num-batched-tokens", "4096", "--log-level", "error"]
        # D never caches, so every ticket starts at 0; P caches, so a repeated send is transfer only
        procs = [start_engine(tmp, *args, engine_id="P"), start_engine(tmp, *args, "--no-prefix-caching",
                                                                       engine_id="D")]
        engines = [wait_engine(p) for p in procs]
        p, d = (EngineHandle(e.rpc, name=e.engine_id, timeout=600) for e in engines)
        try:
            sp = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
            gen = torch.Generator().manual_seed(0)
            modes = [m for m in ("shm", "nixl", "ucx", "tcp") if m in engines[1].transports]
            for n in lengths:
                for mode in modes:
                    local, remote, warm, sizes = [], [], [], []
                    for i in range(repeats):
                        prompt = torch.randint(5, 32000, (n,), generator=gen).tolist()
                        t0 = time.perf_counter()
                        async for _ in p.start_generate(Request(f"l{n}{mode}{i}", prompt, sp)):
                            pass
                        local.append(time.perf_counter() - t0)
                        prompt = torch.randint(5, 32000, (n,), generator=gen).tolist()
                        r = Request(f"r{n}{mode}{i}", prompt, sp)
                        t0 = time.perf_counter()
                        ticket = await d.prep_recv(r)
                        sent = await p.remote_send(r, ticket.kv, transport=mode)
                        remote.append(time.perf_counter() - t0)
                        sizes.append(sent.bytes)
                        await d.abort(r.request_id)
                        t0 = time.perf_counter()
                        ticket = await d.prep_recv(r)
                        sent = await p.remote_send(r, ticket.kv, transport=mode)
                        warm.append(time.perf_counter() - t0)
                        assert sent.computed_tokens == 0
                        await d.abort(r.request_id)
                    lo, re_, wa = (statistics.median(x) * 1e3 for x in (local, remote, warm))
                    rows.append((n, mode, sizes[0] / 2**20, lo, re_, re_ - lo, re_ / lo, wa))
        finally:
            await p.close()
            await d.close()
            for e in engines:
                e.stop()
    return rows


def bench_handshakes(n: int, flood: int = 0) -> tuple[float, float]:
    """One-block tcp transfers per second, one after another (connect, hello, reply, pages, reply), next
    to the same exchange on a raw socket with a bare accept-and-answer server, with `flood` idle
    connections held on the KV port meanwhile."""
    import threading

    spec = KVSpec(num_layers=2, num_kv_heads=2, head_dim=64, dtype="float32", block_size=8)
    pool = torch.zeros(spec.cache_shape(4))
    rx = KVReceiver(pool, spec)
    tx = KVSender(torch.randn(spec.cache_shape(4)), spec)
    host, port = rx.endpoint.rsplit(":", 1)
    idle = [socket.create_connection((host, int(port))) for _ in range(flood)]

    def one(i: int) -> None:
        rx.open_ticket(f"t{i}", "s", [1], lambda o: None)
        tx.send(KVAddr("rx", rx.endpoint, f"t{i}", "s", 0, 8, [1], spec, ["tcp"], host_id(), **rx.fields),
                0, 8, lambda: [0], "tcp")

    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.recv(256)
                conn.sendall(b"x" * 16)
                conn.recv(8192)
                conn.sendall(b"x" * 16)

    threading.Thread(target=serve, daemon=True).start()
    page = b"x" * (spec.page_bytes * 2 * spec.num_layers)

    def raw(i: int) -> None:
        with socket.create_connection(server.getsockname()) as c:
            c.sendall(b"h" * 200)
            c.recv(16)
            c.sendall(page)
            c.recv(16)

    rates = {}
    for name, fn in (("kv", one), ("raw", raw)) * 2:
        t0 = time.perf_counter()
        for i in range(n):
            fn(i + n * (name == "kv" and "kv" in rates))
        rates[name] = max(rates.get(name, 0.0), n / (time.perf_counter() - t0))
    for sock in idle:
        sock.close()
    server.close()
    rx.close()
    return rates["kv"], rates["raw"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048])
    ap.add_argument("--runs", type=int, nargs="+", default=[16, 64, 256, 1024, 2048], help="page runs, KiB")
    ap.add_argument("--engine-tokens", type=int, nargs="+", default=[512, 2000])  # the model holds 2048
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-engines", action="store_true")
    ap.add_argument("--skip-layer", action="store_true", help="skip part 1")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: part 1 moves VRAM to VRAM between two processes on one GPU (.ci/gpu-check)")
    ap.add_argument("--handshakes", type=int, default=0, help="only: N small transfers/s vs a raw socket")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.handshakes:
        print(f"one-block tcp transfers, one after another, {args.handshakes} per round, best of 2")
        print(f"{'idle conns on the port':>22} {'transfers/s':>11} {'raw exchanges/s':>15} {'ratio':>6}")
        for flood in (0, 200):
            kv, raw = bench_handshakes(args.handshakes, flood)
            print(f"{flood:>22} {kv:>11.0f} {raw:>15.0f} {kv / raw:>6.0%}")
        return
    if args.device == "cuda":
        print(f"VRAM to VRAM, two processes, one GPU, Llama-3.1-8B KV shape, median of {args.repeats}")
        print(f"{'tokens':>7} {'MiB':>6} {'transport':>9} {'GB/s':>7} {'device copy':>11} {'ratio':>6} {'bytes ok':>8}")
        rows = [r for t in args.tokens for r in bench_cuda(t, args.repeats)]
        for tokens, mib, mode, gbps, limit, ratio, same in rows:
            print(f"{tokens:>7} {mib:>6.0f} {mode:>9} {gbps:>7.1f} {limit:>11.1f} {ratio:>6.0%} {same!s:>8}")
        return

    if not args.skip_layer:
        part1(args)
    if args.skip_engines:
        return
    print("\nPart 2: engines (random Llama 8 layers, hidden 512, fp32, 1 thread each): remote_send (P prefills "
          f"and sends) vs a local prefill on P; warm = the same send again, P has it cached; median of {args.repeats}")
    print(f"{'tokens':>7} {'transport':>9} {'KV MiB':>7} {'prefill ms':>10} {'remote_send ms':>14} "
          f"{'added ms':>9} {'ratio':>6} {'warm send ms':>12}")
    for n, mode, mib, lo, re_, add, ratio, wa in asyncio.run(bench_engines(args.engine_tokens, args.repeats)):
        print(f"{n:>7} {mode:>9} {mib:>7.1f} {lo:>10.1f} {re_:>14.1f} {add:>9.1f} {ratio:>6.2f} {wa:>12.1f}")


def part1(args: argparse.Namespace) -> None:
    print(f"Part 1: transfer layer, Llama-3.1-8B KV shape {SPEC_8B}, median of {args.repeats}")
    print(f"{'tokens':>7} {'run KiB':>7} {'transport':>9} {'GB/s':>6} {'limit':>11} {'GB/s':>6} {'ratio':>6}")
    for tokens, kib, mode, gbps, lname, limit, ratio in bench_transfer(args.tokens, args.runs, args.repeats):
        print(f"{tokens:>7} {kib:>7} {mode:>9} {gbps:>6.2f} {lname:>11} {limit:>6.2f} {ratio:>6.0%}")


if __name__ == "__main__":
    main()
