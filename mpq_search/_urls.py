"""How a storage URL is shown: torch- and Optuna-free, so that the CLI can show one (and the
search stage, the report and the dashboard all show it the same way) without importing them."""

from __future__ import annotations

import re

_URL_PASSWORD = re.compile(r"^([^:/?#]+://[^:/?#@]*:)[^/?#]*@")
"""`scheme://user:` and the password after it, up to the authority's last `@` (RFC 3986: the
user information ends there, so an unencoded `@` in a password is hidden with it)."""
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)
"""libpq's `password=` query parameter."""


def display_url(url: str) -> str:
    """The URL as it may be shown (console, `--json`, logs, reports, error messages): its
    password, in the user information or as a `password=` query parameter, replaced by `***`.

    Every display of a storage URL goes through here. By pattern rather than SQLAlchemy's
    `make_url(url).render_as_string(hide_password=True)`, which raises on a URL it cannot parse
    (a port `xx`: the very URL an error message shows), cuts a password at an unencoded `@` and
    shows the rest, and keeps a `password=` query parameter."""
    return _QUERY_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", url))
