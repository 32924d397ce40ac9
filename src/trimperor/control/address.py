"""Where the control socket is, and the token that guards it: what both the emperor
and ``trimperor ctl`` need (kept apart from ctl, which an emperor never imports)."""

from __future__ import annotations

import os

from trimperor.core.errors import UsageError

__all__ = ["default_control_path", "read_token"]


def default_control_path() -> str:
    """``/run/trimperor/control.sock`` as root, else ``$XDG_RUNTIME_DIR/trimperor.sock``
    (``/tmp/trimperor-UID/control.sock`` without it)."""
    uid = os.getuid()
    if uid == 0:
        return "/run/trimperor/control.sock"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "trimperor.sock")
    return f"/tmp/trimperor-{uid}/control.sock"


def read_token(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read(4096).strip()
    except OSError as exc:
        raise UsageError(f"cannot read token file {path}: {exc.strerror}") from None
    if len(token) < 16:
        raise UsageError(f"token file {path}: the token must be at least 16 characters")
    return token
