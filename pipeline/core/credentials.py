"""Credentials embedded in a URL: found (config refuses them) and redacted (logs, the report).

A URL may carry a secret in its userinfo (`https://user:pass@host/...`, `s3://KEY:SECRET@bucket/...`)
or in a signed query string (S3/GCS presigned URLs, Azure SAS tokens). Written into a run's
config.toml, a log line or the report, it is readable by everyone who can read those.
"""

from __future__ import annotations

import re

# Query parameters that carry a signature or a token (matched case-insensitively).
SECRET_QUERY_PARAMS = frozenset(
    {
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
        "x-goog-signature",
        "x-goog-credential",
        "awsaccesskeyid",
        "signature",
        "sig",
        "token",
        "access_token",
        "api_key",
        "apikey",
        "password",
    }
)
REDACTED = "REDACTED"

# scheme://userinfo@ (also inside an fsspec chain such as simplecache::s3://...).
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#@\s]+)@")
_QUERY_PARAM = re.compile(r"(?P<lead>[?&;])(?P<name>[^=&;#\s]+)=(?P<value>[^&;#\s]*)")


def embedded_credential(url: str) -> str | None:
    """What kind of credential `url` embeds ('user:password@' or the query parameter's name), or None."""
    if _USERINFO.search(url):
        return "user:password@"
    for match in _QUERY_PARAM.finditer(url):
        if match["name"].lower() in SECRET_QUERY_PARAMS:
            return f"the query parameter {match['name']}="
    return None


def redact(text: str) -> str:
    """`text` with every URL userinfo and secret query value replaced by REDACTED."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    return _QUERY_PARAM.sub(
        lambda m: f"{m['lead']}{m['name']}={REDACTED}" if m["name"].lower() in SECRET_QUERY_PARAMS else m[0], text
    )
