"""Credentials never leave the process: every URL the harness shows (messages, logs, MLflow params and tags,
reports, CSV) goes through :func:`mask_credentials` first."""
from __future__ import annotations

import re
from typing import Any

# scheme://user:password@host -> scheme://user:***@host ; scheme://token@host -> scheme://***@host.
# The password runs to the last "@" of the URL (SQLAlchemy, which parses Optuna's storage URLs, accepts "/" and ":"
# in it), so an unencoded "@" or "/" in a password is masked whole rather than cut at its first special character.
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^:/@\s'\"<>]*)"
                       r"(?::(?P<password>[^\s'\"<>]*))?@")
_SECRET_KEY = r"\w*(?:password|passwd|pwd|secret|token|api_?key|access_?key)"
# key=value in query strings and libpq connection strings (quoted values and spaces around "=" included)
_SECRET_PARAM = re.compile(rf"(?i)\b(?P<key>{_SECRET_KEY})(?P<eq>\s*=\s*)"
                           r"(?P<value>'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|[^&\s'\",;)]+)")
# 'password': 'value' in an echoed dict or JSON text (connection arguments in an exception)
_SECRET_ITEM = re.compile(rf"(?i)(?P<key>(?P<q>['\"]){_SECRET_KEY}(?P=q)\s*:\s*)"
                          r"(?P<value>'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")")
# an HTTP Authorization header, or a bearer token, echoed in an error
_AUTHORIZATION = re.compile(r"(?i)(?P<head>\bAuthorization['\"]?\s*[:=]\s*['\"]?(?:[A-Za-z]+\s+)?|\bBearer\s+)"
                            r"(?P<value>[A-Za-z0-9\-._~+/*]+=*)")


def _userinfo(match: re.Match[str]) -> str:
    scheme, password = match.group("scheme"), match.group("password")
    if password is None:  # a user name alone may be a token (https://TOKEN@host): it goes too
        return f"{scheme}***@" if match.group("user") else match.group(0)
    return f"{scheme}{match.group('user')}:***@"


def _quoted_mask(value: str) -> str:
    return f"{value[0]}***{value[0]}" if value[:1] in ("'", '"') else "***"


def mask_credentials(text: str) -> str:
    """``text`` with ``***`` for the password (or token) of every URL, every ``password=`` style parameter (query
    strings, libpq connection strings), every ``'password': '...'`` item and every ``Authorization`` header or
    bearer token.

    A URL without credentials, and a path (``sqlite:////tmp/harness.db``), come back unchanged.
    """
    text = _USERINFO.sub(_userinfo, text)
    text = _SECRET_PARAM.sub(lambda m: f"{m.group('key')}{m.group('eq')}{_quoted_mask(m.group('value'))}", text)
    text = _SECRET_ITEM.sub(lambda m: f"{m.group('key')}{_quoted_mask(m.group('value'))}", text)
    return _AUTHORIZATION.sub(lambda m: f"{m.group('head')}***", text)


def mask_all(value: Any) -> Any:
    """``value`` with :func:`mask_credentials` applied to every string in it (keys too), through dicts, lists and
    tuples: for records about to be written to a report, a CSV or JSON."""
    if isinstance(value, str):
        return mask_credentials(value)
    if isinstance(value, dict):
        return {mask_all(k): mask_all(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(mask_all(v) for v in value)
    return value
