"""What a recipient's mail client sees: every message of a maildir folder
read with Python's email package (policy.default, its modern parser), one
JSON object a line: the headers decoded, the bodies as text, the
attachments' names, types and bytes, the parts the HTML shows by their
Content-ID, the MIME tree, and every defect the parser noted.

  python3 tests/read_mail.py MAILDIR_NEW_FOLDER
"""

import base64
import email
import email.policy
import json
import os
import sys


def addresses(msg, name):
    header = msg[name]
    if header is None:
        return None
    return [[a.display_name, a.addr_spec] for a in header.addresses]


def defects(msg):
    found = []
    for part in msg.walk():
        found += [type(d).__name__ for d in part.defects]
        for name, value in part.items():
            found += [f"{name}: {type(d).__name__}" for d in getattr(value, "defects", ())]
    return found


# The fields aiosmtpd's Mailbox handler adds to each message it stores.
SINK_FIELDS = {"x-peer", "x-mailfrom", "x-rcptto"}


def text(msg, kind):
    part = msg.get_body(preferencelist=(kind,))
    if part is None:
        return None
    return part.get_content()


def shown(part):
    """A part the HTML body shows (cid:): inline, with a Content-ID."""
    return part["content-id"] is not None and part.get_content_disposition() == "inline"


def tree(part):
    """The MIME tree as type(child,child)."""
    if part.is_multipart():
        return f"{part.get_content_type()}({','.join(tree(p) for p in part.iter_parts())})"
    return part.get_content_type()


def read(path):
    with open(path, "rb") as f:
        raw = f.read()
    try:
        # UTF-8 header fields (RFC 6532, sent with SMTPUTF8) are read as
        # text: the bytes parser would keep them as undecodable bytes.
        msg = email.message_from_string(raw.decode("utf-8"), policy=email.policy.default)
    except UnicodeDecodeError:
        msg = email.message_from_bytes(raw, policy=email.policy.default)
    subject = msg["subject"]
    return {
        "message_id": str(msg["message-id"] or ""),
        "subject": None if subject is None else str(subject),
        "from": addresses(msg, "from"),
        "to": addresses(msg, "to"),
        "cc": addresses(msg, "cc"),
        "reply_to": addresses(msg, "reply-to"),
        "in_reply_to": None if msg["in-reply-to"] is None else " ".join(str(msg["in-reply-to"]).split()),
        "references": None if msg["references"] is None else " ".join(str(msg["references"]).split()),
        "headers": [k.lower() for k in msg.keys()],
        # Unfolded, as a provider reads it to find the links.
        "list_unsubscribe": None if msg["list-unsubscribe"] is None else " ".join(str(msg["list-unsubscribe"]).split()),
        "list_unsubscribe_post": None if msg["list-unsubscribe-post"] is None else str(msg["list-unsubscribe-post"]),
        # The sender's own fields (send_email's `headers`), decoded.
        "own_fields": {
            k: str(v)
            for k, v in msg.items()
            if (k.lower().startswith("x-") and k.lower() not in SINK_FIELDS) or k.lower() == "auto-submitted"
        },
        # The envelope, as aiosmtpd's Mailbox handler records it.
        "rcpt_to": sorted(r.strip() for r in str(msg["x-rcptto"] or "").split(",") if r.strip()),
        "text": text(msg, "plain"),
        "html": text(msg, "html"),
        "attachments": [
            {
                # The parsed parameter: get_filename() strips quotes or
                # angle brackets around the name a second time.
                "filename": a["content-disposition"].params.get("filename"),
                "content_type": a.get_content_type(),
                "content_base64": base64.b64encode(a.get_payload(decode=True) or b"").decode(),
            }
            for a in msg.iter_attachments()
            if not shown(a)
        ],
        "inline": [
            {
                "content_id": str(p["content-id"]).strip().strip("<>"),
                "filename": p.get_filename(),
                "content_type": p.get_content_type(),
                "content_base64": base64.b64encode(p.get_payload(decode=True) or b"").decode(),
            }
            for p in msg.walk()
            if shown(p)
        ],
        "tree": tree(msg),
        "defects": defects(msg),
    }


def main():
    folder = sys.argv[1]
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        try:
            print(json.dumps(read(path)))
        except Exception as e:
            # The parser itself failed on the message: report it, with the
            # Message-ID as the old parser reads it.
            with open(path, "rb") as f:
                msg = email.message_from_bytes(f.read())
            print(json.dumps({"message_id": msg["message-id"], "error": repr(e)}))


if __name__ == "__main__":
    main()
