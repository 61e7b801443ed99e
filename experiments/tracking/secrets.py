"""Secrets kept out of logs, tags and error messages: passwords in URLs and secret query parameters."""

from __future__ import annotations

import re

_SECRET_IN_URL = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<secret>[^@\s/]+)@"
)
_SECRET_IN_QUERY = re.compile(
    r"(?P<key>(?:password|passwd|pwd|token|secret|api_key)=)(?P<secret>[^&\s]+)", re.IGNORECASE
)


def mask_secrets(text: str) -> str:
    """``text`` with passwords in URLs and secret query parameters replaced by ``***``:
    ``postgresql://user:pass@host/db`` -> ``postgresql://user:***@host/db``."""
    text = _SECRET_IN_URL.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    return _SECRET_IN_QUERY.sub(lambda m: f"{m['key']}***", text)
