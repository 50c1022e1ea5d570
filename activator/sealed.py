"""Images sealed at rest: each file encrypted and authenticated (AES-256-GCM).

An image is the app's whole memory, secrets included. With a key, CRIU dumps
into a directory in memory (/dev/shm), the activator seals each file into the
state directory, and a restore opens them into memory again: the plaintext
never reaches the disk. The key is 32 bytes, given as a file holding them raw,
or as 64 hex digits, or base64 (a Kubernetes Secret mounted as a file).
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from activator.config import FieldError
from activator.criu import CriuError

KEY_BYTES = 32
_NONCE_BYTES = 12
# Where plaintext images live while CRIU works: memory, not disk.
PLAIN_ROOT = Path("/dev/shm/pod-activator")


class SealError(CriuError):
    """An image cannot be opened: wrong key, or changed since it was sealed.
    (A CriuError: the restore fails, and the pod falls back to a cold start.)"""


def read_key(path: Path, field: str) -> bytes | FieldError:
    fix = (
        "give a file with 32 random bytes (raw, 64 hex digits or base64),"
        " e.g. head -c32 /dev/urandom >KEY"
    )
    try:
        data = path.read_bytes()
    except OSError as exc:
        return FieldError(field, f"cannot read {path}: {exc.strerror}", fix)
    if len(data) == KEY_BYTES:
        return data
    text = data.strip()
    for decode in (binascii.unhexlify, base64.b64decode):
        try:
            key = decode(text)
        except (ValueError, binascii.Error):
            continue
        if len(key) == KEY_BYTES:
            return key
    return FieldError(field, f"{path} does not hold a 32-byte key", fix)


def seal(plain: Path, sealed: Path, key: bytes) -> None:
    """Encrypt every file of `plain` into `sealed` (0700 directory, 0600 files)."""
    aead = AESGCM(key)
    sealed.mkdir(mode=0o700, parents=True, exist_ok=True)
    for source in plain.iterdir():
        if not source.is_file():
            continue
        nonce = secrets.token_bytes(_NONCE_BYTES)
        # The file name is authenticated too: files cannot be swapped around.
        data = nonce + aead.encrypt(nonce, source.read_bytes(), source.name.encode())
        fd = os.open(sealed / source.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "wb") as target:
            target.write(data)


def unseal(sealed: Path, plain: Path, key: bytes) -> None:
    """Decrypt every file of `sealed` into `plain`; SealError if any was changed."""
    aead = AESGCM(key)
    plain.mkdir(mode=0o700, parents=True, exist_ok=True)
    for source in sealed.iterdir():
        if not source.is_file():
            continue
        data = source.read_bytes()
        try:
            opened = aead.decrypt(data[:_NONCE_BYTES], data[_NONCE_BYTES:], source.name.encode())
        except InvalidTag:
            raise SealError(f"{source} does not open with this key, or was changed") from None
        fd = os.open(plain / source.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "wb") as target:
            target.write(opened)
