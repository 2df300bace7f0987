"""A real third-party SMTP server for mailmux's tests: aiosmtpd on 127.0.0.1.

Each message is saved in the output folder as NNNNNN.eml (the data as received)
and then NNNNNN.env (the envelope: a "from <addr>" line and one "to <addr>" line per
recipient); the .env is written last, so a reader that sees it sees the whole
message. Prints "READY <port>" once listening. Loopback only; stores nothing else.

Usage: aiosmtpd_server.py PORT OUT_DIR [--tls CERT KEY] [--auth USER] [--max-recipients N]
                          [--size-limit BYTES]
(the password for --auth comes from the AIOSMTPD_PASSWORD environment variable;
with --max-recipients, each RCPT past N in one transaction is answered 452; with
--size-limit, aiosmtpd announces SIZE BYTES and refuses larger messages, as it
does at its default of 32 MiB).
"""

import argparse
import logging
import os
import ssl
import sys
import warnings

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


class SaveToFolder:
    def __init__(self, out_dir, max_recipients=None):
        self.out_dir = out_dir
        self.count = 0
        self.max_recipients = max_recipients

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.max_recipients is not None and len(envelope.rcpt_tos) >= self.max_recipients:
            return "452 4.5.3 Error: too many recipients"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.count += 1
        n = self.count
        base = os.path.join(self.out_dir, f"{n:06d}")
        write_atomically(base + ".eml", envelope.original_content or b"")
        lines = [f"from {envelope.mail_from}"]
        lines += [f"to {rcpt}" for rcpt in envelope.rcpt_tos]
        write_atomically(base + ".env", ("\n".join(lines) + "\n").encode("utf-8"))
        return f"250 2.0.0 Ok: queued as AIO{n}"


def write_atomically(path, data):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def authenticator_for(user, password):
    def authenticate(server, session, envelope, mechanism, auth_data):
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login == user.encode("utf-8")
            and auth_data.password == password.encode("utf-8")
        )
        # handled=False makes aiosmtpd send the 535 itself; with the default it
        # sends nothing and the client waits forever.
        return AuthResult(success=ok, handled=False)

    return authenticate


def main():
    # aiosmtpd logs a warning about its own deprecated attribute on every AUTH.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    warnings.simplefilter("ignore", DeprecationWarning)
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("out_dir")
    parser.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    parser.add_argument("--auth", metavar="USER")
    parser.add_argument("--max-recipients", type=int, metavar="N")
    parser.add_argument("--size-limit", type=int, metavar="BYTES")
    args = parser.parse_args()

    kwargs = {"enable_SMTPUTF8": True}
    if args.size_limit is not None:
        kwargs.update(data_size_limit=args.size_limit)
    if args.tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.tls[0], args.tls[1])
        kwargs.update(tls_context=context, require_starttls=True)
    if args.auth:
        password = os.environ.get("AIOSMTPD_PASSWORD", "")
        kwargs.update(
            authenticator=authenticator_for(args.auth, password),
            auth_required=True,
            # Without TLS there is nothing to require, and AUTH would never be offered.
            auth_require_tls=bool(args.tls),
        )

    controller = Controller(
        SaveToFolder(args.out_dir, args.max_recipients), hostname="127.0.0.1", port=args.port, **kwargs
    )
    try:
        controller.start()
    except Exception as error:  # the port was taken: the caller retries elsewhere
        print(f"FAILED {error}", flush=True)
        sys.exit(1)
    print(f"READY {args.port}", flush=True)
    # Run until killed, or until the parent closes our stdin.
    sys.stdin.read()
    controller.stop()


if __name__ == "__main__":
    main()
