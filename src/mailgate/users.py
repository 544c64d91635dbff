"""Local users: which mailbox name a local part reaches (a passwd account or a folder under
``maildir_root``). A routing fact, asked at RCPT and at delivery; kept out of the delivery
agents so that the snapshot and routing need none of them."""

from __future__ import annotations

import os
import pwd
from pathlib import Path


def _valid_name(user: str) -> bool:
    return (
        bool(user)
        and "/" not in user
        and "\0" not in user
        and not user.startswith(".")
        and (len(user.encode("utf-8", "surrogateescape")) <= 255)
    )


def getpw(name: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(name)
    except (KeyError, ValueError, UnicodeError):
        return None


def resolve_local_user(user: str, maildir_root: Path) -> str | None:
    """The mailbox name ``user`` delivers to, or None if there is no such local user.

    Matching: the name exactly as given first (a passwd account, or anything named
    ``maildir_root/<user>``), then its lower-case form.  Sendmail compares passwd names
    case-sensitively, but admins expect ``Root@`` to reach ``root``; since Unix account names
    are in practice lower-case, the fallback cannot reach a different person.
    A non-directory at ``maildir_root/<user>`` still counts, so that a misconfigured mailbox
    gives a temporary error at delivery (fixable) instead of a bounce.
    """
    if not _valid_name(user):
        return None
    candidates = [user] if user == user.lower() else [user, user.lower()]
    for name in candidates:
        if getpw(name) is not None or os.path.lexists(maildir_root / name):
            return name
    return None
