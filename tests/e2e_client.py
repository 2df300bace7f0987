"""mailmux end to end, driven by the official MCP Python SDK.

Usage:
  python3 tests/e2e_client.py stdio BINARY SMTP_PORT MAILDIR
  python3 tests/e2e_client.py http URL TOKEN MAILDIR
  python3 tests/e2e_client.py batch BINARY SMTP_PORT MAILDIR

stdio: starts BINARY as an MCP server over pipes (one relay: the aiosmtpd at
127.0.0.1:SMTP_PORT, configured with the seed's SMTP_* variables).
http: talks to a daemon already serving streamable HTTP at URL, with a bearer
TOKEN.

Either way it sends a message with text and HTML parts, an attachment, a Bcc
and a UTF-8 templated subject, then checks what aiosmtpd stored in MAILDIR.
batch: over stdio as above, a 300-message mail merge through send_batch
(with a Bcc shared by all and an idempotency key each), sent twice; checks
that each message arrived exactly once with its own variables.
"""

import asyncio
import base64
import email
import email.policy
import os
import sys
import tempfile
import time

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import create_mcp_http_client, streamable_http_client

TOOLS = {
    "send_email",
    "test_smtp_connection",
    "get_smtp_status",
    "switch_smtp_server",
    "reload_smtp_configuration",
    "reconnect_smtp_servers",
}

passed = 0
failed = 0


def check(cond, what):
    global passed, failed
    if cond:
        passed += 1
    else:
        failed += 1
        print(f"FAIL: {what}", file=sys.stderr)


def read_maildir(path):
    new = os.path.join(path, "new")
    if not os.path.isdir(new):
        return []
    out = []
    for name in sorted(os.listdir(new)):
        with open(os.path.join(new, name), "rb") as f:
            out.append(f.read())
    return out


ATTACHMENT = b"quarterly numbers\n1,2,3\n"


def server_params(binary, port):
    """The binary over pipes, with aiosmtpd at 127.0.0.1:port as its relay."""
    env = {
        "PATH": os.environ.get("PATH", ""),
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(port),
        "SMTP_USE_TLS": "false",
        "SMTP_FROM_EMAIL": "sender@example.org",
        "RUST_LOG": "info",
    }
    # The test's own queue store, never the default one in the working folder.
    if os.environ.get("MAILMUX_QUEUE__PATH"):
        env["MAILMUX_QUEUE__PATH"] = os.environ["MAILMUX_QUEUE__PATH"]
    return StdioServerParameters(command=binary, args=["serve"], env=env)


async def stdio_main(binary, port, maildir):
    params = server_params(binary, port)
    errlog = tempfile.TemporaryFile(mode="w+")
    async with stdio_client(params, errlog=errlog) as (read, write):
        async with ClientSession(read, write) as session:
            message_id = await exercise(session)
    check_delivery(maildir, message_id)

    errlog.seek(0)
    logs = errlog.read()
    check("mode=Pipe" in logs, "stdio used the non-blocking pipe path")
    check("mailmux stopped" in logs or "stdin closed" in logs, "clean shutdown logged")


async def http_main(url, token, maildir):
    headers = {"Authorization": f"Bearer {token}"}
    async with create_mcp_http_client(headers=headers) as http:
        async with streamable_http_client(url, http_client=http) as streams:
            read, write = streams[0], streams[1]
            async with ClientSession(read, write) as session:
                message_id = await exercise(session)
    check_delivery(maildir, message_id)


async def exercise(session):
    """Lists the tools, sends the full message, checks status and bad input;
    returns the Message-ID of the sent message."""
    attachment = ATTACHMENT
    await session.initialize()
    tools = await session.list_tools()
    names = {t.name for t in tools.tools}
    check(TOOLS <= names, f"tools listed: {names}")
    send = next(t for t in tools.tools if t.name == "send_email")
    check(send.output_schema is not None, "send_email has an output schema")

    result = await session.call_tool(
        "send_email",
        {
            "to": ["Ada Lovelace <ada@example.org>"],
            "cc": "cc@example.org",
            "bcc": ["hidden@example.org"],
            "subject": "Grüße, {name}",
            "body": "Hello {name}, the report is attached.",
            "html_body": "<p>Hello <b>{name}</b></p>",
            "template_vars": {"name": "Ada"},
            "attachments": [
                {
                    "filename": "report.csv",
                    "content_base64": base64.b64encode(attachment).decode(),
                    "content_type": "text/csv",
                }
            ],
        },
    )
    out = result.structured_content or {}
    check(not result.is_error, f"send is not an error: {out}")
    check(out.get("status") == "sent", f"status sent: {out}")
    message_id = out.get("message_id", "")
    check(bool(message_id), "message_id returned")

    status = await session.call_tool("get_smtp_status", {})
    s = status.structured_content or {}
    check(len(s.get("relays", [])) == 1, f"one relay: {s}")
    check(s.get("default_relay") is False, "not the default relay")

    bad = await session.call_tool(
        "send_email", {"to": "nobody", "subject": "x", "body": "y"}
    )
    b = bad.structured_content or {}
    check(bad.is_error is True, "invalid input is an error")
    check(b.get("error", {}).get("code") == "invalid_input", f"invalid_input: {b}")
    return message_id


def check_delivery(maildir, message_id):
    """The message as aiosmtpd stored it."""
    attachment = ATTACHMENT
    deadline = time.time() + 10
    raw = []
    while time.time() < deadline:
        raw = read_maildir(maildir)
        if raw:
            break
        time.sleep(0.1)
    check(len(raw) == 1, f"one message received, got {len(raw)}")
    if raw:
        msg = email.message_from_bytes(raw[0], policy=email.policy.default)
        head = raw[0].split(b"\r\n\r\n" if b"\r\n\r\n" in raw[0] else b"\n\n", 1)[0]
        check(str(msg["Subject"]) == "Grüße, Ada", f"subject decoded: {msg['Subject']!r}")
        check(b"=?utf-8?" in head.lower(), "subject is RFC 2047 encoded")
        check(msg["Message-ID"].strip() == f"<{message_id}>", f"message-id {msg['Message-ID']}")
        check("ada@example.org" in str(msg["To"]), f"To: {msg['To']}")
        check("cc@example.org" in str(msg["Cc"]), f"Cc: {msg['Cc']}")
        check(msg["Bcc"] is None, "no Bcc header")
        rcpt = str(msg["X-RcptTo"])
        check("hidden@example.org" in rcpt and "cc@example.org" in rcpt, f"envelope: {rcpt}")
        check(str(msg["X-MailFrom"]) == "sender@example.org", f"MAIL FROM {msg['X-MailFrom']}")
        body = msg.get_body(preferencelist=("plain",))
        html = msg.get_body(preferencelist=("html",))
        check(body is not None and "Hello Ada, the report" in body.get_content(), "text part")
        check(html is not None and "<b>Ada</b>" in html.get_content(), "html part")
        atts = list(msg.iter_attachments())
        check(len(atts) == 1, f"one attachment, got {len(atts)}")
        if atts:
            check(atts[0].get_filename() == "report.csv", f"filename {atts[0].get_filename()}")
            check(atts[0].get_content_type() == "text/csv", atts[0].get_content_type())
            check(atts[0].get_payload(decode=True) == attachment, "attachment content")
        hidden_in_headers = [k for k, v in msg.items() if "hidden@example.org" in str(v) and k != "X-RcptTo"]
        check(not hidden_in_headers, f"bcc address only in the envelope: {hidden_in_headers}")


MERGE = 300


async def batch_main(binary, port, maildir):
    params = server_params(binary, port)
    errlog = tempfile.TemporaryFile(mode="w+")
    batch = {
        "defaults": {
            "subject": "Hello {name}",
            "body": "Dear {name},\nyour code is {code}.",
            "bcc": ["audit@example.org"],
        },
        "messages": [
            {
                "to": [f"r{i}@example.org"],
                "template_vars": {"name": f"n{i}", "code": f"c{i:04}"},
                "idempotency_key": f"merge-{i}",
            }
            for i in range(MERGE)
        ],
    }
    async with stdio_client(params, errlog=errlog) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            tools = await session.list_tools()
            check("send_batch" in {t.name for t in tools.tools}, "send_batch listed")
            first = await session.call_tool("send_batch", batch)
            out = first.structured_content or {}
            check(not first.is_error, f"batch is not an error: {str(out)[:300]}")
            check(out.get("summary") == {"sent": MERGE}, f"summary: {out.get('summary')}")
            results = out.get("results", [])
            check([r.get("index") for r in results] == list(range(MERGE)), "results in input order")
            again = await session.call_tool("send_batch", batch)
            rep = again.structured_content or {}
            replays = [r.get("idempotent_replay") for r in rep.get("results", [])]
            check(replays == [True] * MERGE, "the repeated batch is a replay, message by message")
            check(
                [r.get("message_id") for r in rep.get("results", [])]
                == [r.get("message_id") for r in results],
                "replays name the first messages",
            )
    time.sleep(0.5)
    raw = read_maildir(maildir)
    check(len(raw) == MERGE, f"{MERGE} messages at the sink, got {len(raw)}")
    seen = {}
    for data in raw:
        msg = email.message_from_bytes(data, policy=email.policy.default)
        to = str(msg["To"])
        seen[to] = seen.get(to, 0) + 1
        i = int(to.split("@")[0][1:])
        check(str(msg["Subject"]) == f"Hello n{i}", f"subject of {to}: {msg['Subject']}")
        body = msg.get_body(preferencelist=("plain",)).get_content()
        check(f"your code is c{i:04}." in body, f"body of {to}")
        check(msg["Bcc"] is None, "no Bcc header")
        check("audit@example.org" in str(msg["X-RcptTo"]), "the Bcc is in the envelope")
    check(sorted(seen) == sorted(f"r{i}@example.org" for i in range(MERGE)), "every recipient")
    check(all(n == 1 for n in seen.values()), "each exactly once")


def main(argv):
    if argv[1] == "stdio":
        asyncio.run(stdio_main(argv[2], int(argv[3]), argv[4]))
    elif argv[1] == "http":
        asyncio.run(http_main(argv[2], argv[3], argv[4]))
    elif argv[1] == "batch":
        asyncio.run(batch_main(argv[2], int(argv[3]), argv[4]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
