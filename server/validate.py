"""Checks shared by the handlers: names, ids, page tokens and page sizes.

Nothing a client sends ever becomes a file path: ids are made by the server, and names (which
are only ever stored as data) are limited to a safe alphabet anyway, so that they also print
safely in logs and tables.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets

from cnnd.server.errors import InvalidArgument

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ID_RE = re.compile(r"[a-z]{1,4}_[0-9a-f]{16}")
DEFAULT_PAGE = 50
MAX_PAGE = 1000


def new_id(prefix: str) -> str:
    """A server-made id such as ``mdl_3f2a9c0e1b7d4a65``."""
    return f"{prefix}_{secrets.token_hex(8)}"


def check_name(name: str, field: str = "name") -> str:
    """1-64 characters from [A-Za-z0-9._-], starting with a letter or digit, no '..'."""
    if not name:
        raise InvalidArgument(f"{field} is required", field)
    if not NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidArgument(
            f"{field} {name[:80]!r} is not valid: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
            field,
        )
    return name


def check_key(key: str, field: str) -> str:
    """An id or a name, as accepted by Get/Delete/Train/Infer."""
    if not key:
        raise InvalidArgument(f"{field} is required", field)
    if not (ID_RE.fullmatch(key) or (NAME_RE.fullmatch(key) and ".." not in key)):
        raise InvalidArgument(f"{field} {key[:80]!r} is not a valid id or name", field)
    return key


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument(f"page_size must be >= 0, got {requested}", "page_size")
    return min(requested or DEFAULT_PAGE, MAX_PAGE)


def encode_page_token(last_id: str) -> str:
    return base64.urlsafe_b64encode(last_id.encode()).decode().rstrip("=")


def decode_page_token(token: str) -> str:
    if not token:
        return ""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError) as e:
        raise InvalidArgument("page_token is not valid", "page_token") from e
    if not ID_RE.fullmatch(raw):
        raise InvalidArgument("page_token is not valid", "page_token")
    return raw
