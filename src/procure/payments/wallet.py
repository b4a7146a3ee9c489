"""The agent's wallet key: from X402_PRIVATE_KEY, or generated once and kept (mode 0600)."""

from __future__ import annotations

import os
from pathlib import Path

from eth_account import Account
from eth_account.signers.local import LocalAccount


def load_or_create_account(private_key: str | None, home: Path) -> LocalAccount:
    """The signing account. The key is never printed or logged; only its address is shown."""
    if private_key:
        return Account.from_key(private_key)
    path = home / "wallet.key"
    if path.exists():
        return Account.from_key(path.read_text().strip())
    home.mkdir(parents=True, exist_ok=True)
    account = Account.create()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process created it first: use theirs
        return Account.from_key(path.read_text().strip())
    with os.fdopen(fd, "w") as f:
        f.write(account.key.hex())
    return account
