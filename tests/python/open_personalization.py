"""Opens a casd personalization file (docs/format.md §9) with an
independent implementation: Python's `cryptography` (AES key wrap,
RFC 3394, and the SP 800-108 counter-mode CMAC KDF).

usage: open_personalization.py TRANSPORT_KEY_FILE PMK_HEX FILE

Prints one line per device, `device_id duk_hex`, after checking for each
that the unwrapped DUK belongs to the line's device and equals
KDF(PMK, "CAS-DUK", u64(device_id)). Exits non-zero on any mismatch.
"""

import json
import sys

from cryptography.hazmat.primitives import cmac, hashes  # noqa: F401 (cmac: KDF PRF)
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap
from cryptography.hazmat.primitives.kdf.kbkdf import (
    CounterLocation,
    KBKDFCMAC,
    Mode,
)
from cryptography.hazmat.primitives.ciphers import algorithms


def fingerprint(key: bytes) -> str:
    kdf = KBKDFCMAC(algorithm=algorithms.AES, mode=Mode.CounterMode, length=8, rlen=4,
                    llen=4, location=CounterLocation.BeforeFixed,
                    label=b"CAS-KEY-FINGERPRINT", context=b"", fixed=None)
    return kdf.derive(key).hex()


def duk(pmk: bytes, device_id: int) -> bytes:
    kdf = KBKDFCMAC(algorithm=algorithms.AES, mode=Mode.CounterMode, length=16, rlen=4,
                    llen=4, location=CounterLocation.BeforeFixed, label=b"CAS-DUK",
                    context=device_id.to_bytes(8, "big"), fixed=None)
    return kdf.derive(pmk)


def main() -> int:
    ktk_file, pmk_hex, path = sys.argv[1:4]
    ktk = bytes.fromhex(open(ktk_file).read().strip())
    pmk = bytes.fromhex(pmk_hex)
    with open(path) as f:
        header = json.loads(f.readline())
        assert header["format"] == "casd-personalization/1", header
        assert header["wrap"] == "aes128-kw-rfc3394", header
        assert header["transport_key_id"] == fingerprint(ktk), "another transport key"
        n = 0
        for text in f:
            line = json.loads(text)
            plain = aes_key_unwrap(ktk, bytes.fromhex(line["wrapped_duk"]))
            key, owner = plain[:16], int.from_bytes(plain[16:], "big")
            assert owner == line["device_id"], f"line of {line['device_id']} holds {owner}'s key"
            assert key == duk(pmk, owner), f"device {owner}: DUK is not KDF(PMK)"
            print(owner, key.hex())
            n += 1
        assert n == header["devices"], f"{n} lines, header says {header['devices']}"
    return 0


if __name__ == "__main__":
    sys.exit(main())
