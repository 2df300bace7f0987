"""aiosmtpd requiring AUTH (PLAIN or LOGIN) over plain text, for tests.

Usage: python3 tests/aiosmtpd_auth.py PORT MAILDIR USER PASSWORD
Prints "ready" when listening; stops when stdin closes.
"""

import sys

from aiosmtpd.controller import Controller
from aiosmtpd.handlers import Mailbox
from aiosmtpd.smtp import AuthResult, LoginPassword

port, maildir, user, password = sys.argv[1:5]


def authenticate(server, session, envelope, mechanism, auth_data):
    ok = (
        isinstance(auth_data, LoginPassword)
        and auth_data.login == user.encode()
        and auth_data.password == password.encode()
    )
    return AuthResult(success=ok)


controller = Controller(
    Mailbox(maildir),
    hostname="127.0.0.1",
    port=int(port),
    authenticator=authenticate,
    auth_require_tls=False,
    auth_required=True,
)
controller.start()
print("ready", flush=True)
sys.stdin.read()
controller.stop()
