"""How long cancelling a whole batch takes: `cancel_message {"batch_id"}` on
a scheduled batch of N messages, and `mailmux queue cancel --batch` on
another, with the daemon over stdio on the default SQLite store (the `file`
relay; nothing is delivered, the batches wait for their send_at).

    python3 benches/cancel_batch.py target/debug/mailmux 1000

Needs Python's `mcp` package. Writes only to a temporary folder.
"""
import asyncio, json, os, subprocess, sys, tempfile, time
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

BIN, N = os.path.abspath(sys.argv[1]), int(sys.argv[2])

async def main():
    d = tempfile.mkdtemp()
    cfg = os.path.join(d, "mailmux.toml")
    open(cfg, "w").write('[queue]\npath = "%s/q.db"\n' % d)
    params = StdioServerParameters(command=BIN, args=["--config", cfg, "serve"], cwd=d,
                                   env={"PATH": os.environ["PATH"]})
    async with stdio_client(params, errlog=open(os.devnull, "w")) as (r, w):
        async with ClientSession(r, w) as s:
            await s.initialize()
            batches = []
            for _ in range(2):
                msgs = [{"to": f"r{i}@example.org"} for i in range(N)]
                out = await s.call_tool("send_batch", {"defaults": {"subject": "s", "body": "b", "from_email": "a@example.org"},
                                                        "send_at": "1h", "messages": msgs})
                batches.append(out.structured_content["batch_id"])
            t = time.perf_counter()
            out = await s.call_tool("cancel_message", {"batch_id": batches[0]})
            tool = time.perf_counter() - t
            assert out.structured_content["cancelled_count"] == N, out
            t = time.perf_counter()
            p = subprocess.run([BIN, "--config", cfg, "queue", "cancel", "--batch", batches[1]],
                               cwd=d, capture_output=True, text=True)
            cli = time.perf_counter() - t
            assert p.returncode == 0 and f"cancelled: {N} of {N}" in p.stdout, p
            print(f"N={N}: cancel_message {tool*1000:.0f} ms ({tool*1e6/N:.0f} us/msg); queue cancel --batch {cli*1000:.0f} ms ({cli*1e6/N:.0f} us/msg)")

asyncio.run(main())
