"""DKIM keys for the tests, and an independent verifier (dkimpy) of the
messages mailmux signed.

  python3 tests/dkim_verify.py keys DIR
      writes DIR/rsa.pem (PKCS#1), DIR/rsa8.pem (PKCS#8), DIR/ed.pem
      (PKCS#8) and DIR/records.json, the DNS TXT record of each public key
      by file name.

  python3 tests/dkim_verify.py verify RECORDS.json SELECTORS.json FILE...
      verifies every DKIM-Signature of each message file, looking the key
      up in SELECTORS.json ({"sel._domainkey.example.org.": "rsa.pem"})
      instead of the DNS. Prints one JSON object a file: its signatures,
      each with d=, s=, a=, the signed fields and whether it verified, and
      whether each still verifies with one body byte changed.
"""

import base64
import json
import os
import sys

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa


def write_rsa(out, name, private_format):
    """A 2048-bit RSA key in out/name; its DNS record."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with open(os.path.join(out, name), "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                private_format,
                serialization.NoEncryption(),
            )
        )
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "v=DKIM1; k=rsa; p=" + base64.b64encode(spki).decode()


def keys(out):
    records = {
        "rsa.pem": write_rsa(out, "rsa.pem", serialization.PrivateFormat.TraditionalOpenSSL),
        "rsa8.pem": write_rsa(out, "rsa8.pem", serialization.PrivateFormat.PKCS8),
    }
    e = ed25519.Ed25519PrivateKey.generate()
    raw = e.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    with open(os.path.join(out, "ed.pem"), "wb") as f:
        f.write(
            e.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    records["ed.pem"] = "v=DKIM1; k=ed25519; p=" + base64.b64encode(raw).decode()
    with open(os.path.join(out, "records.json"), "w") as f:
        json.dump(records, f)


def checked(d, i, txt):
    """Whether signature i verifies, and why not: dkimpy answers False for
    some failures and raises for others (a body hash that differs)."""
    try:
        return bool(d.verify(idx=i, dnsfunc=txt)), None
    except dkim.DKIMException as e:
        return False, str(e)


def verify(records_path, selectors_path, files):
    with open(records_path) as f:
        records = json.load(f)
    with open(selectors_path) as f:
        selectors = json.load(f)

    def txt(name, timeout=5):
        name = name.decode() if isinstance(name, bytes) else name
        key = selectors.get(name)
        return records[key].encode() if key else None

    for path in files:
        with open(path, "rb") as f:
            message = f.read()
        d = dkim.DKIM(message)
        count = sum(
            1
            for line in message.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
            if line.lower().startswith(b"dkim-signature:")
        )
        # One byte of the body changed: a real verifier must refuse it.
        head, body = message.split(b"\r\n\r\n", 1)
        changed = head + b"\r\n\r\n" + (b"X" + body[1:] if body else b"X")
        signatures = []
        for i in range(count):
            ok, why = checked(d, i, txt)
            sig = d.signature_fields
            tampered, _ = checked(dkim.DKIM(changed), i, txt)
            signatures.append(
                {
                    "d": sig.get(b"d", b"").decode(),
                    "s": sig.get(b"s", b"").decode(),
                    "a": sig.get(b"a", b"").decode(),
                    "h": [h.decode().strip() for h in sig.get(b"h", b"").split(b":")],
                    "c": sig.get(b"c", b"").decode(),
                    "verified": ok,
                    "why": why,
                    "verified_with_a_changed_body": tampered,
                }
            )
        print(json.dumps({"file": os.path.basename(path), "signatures": signatures}))


if __name__ == "__main__":
    if sys.argv[1] == "keys":
        keys(sys.argv[2])
    else:
        verify(sys.argv[2], sys.argv[3], sys.argv[4:])
