"""The agent's wallet key: from X402_PRIVATE_KEY, or generated once and kept (mode 0600)."""

from __future__ import annotations

from pathlib import Path

from eth_account import Account
from eth_account.signers.local import LocalAccount

from procure.keyfiles import create_once


def load_or_create_account(private_key: str | None, home: Path) -> LocalAccount:
    """The signing account. The key is never printed or logged; only its address is shown."""
    if private_key:
        return Account.from_key(private_key)
    path = home / "wallet.key"
    if path.exists():
        return Account.from_key(path.read_text().strip())
    # Whole or not at all: a second process starting on a new home read it empty and died.
    made = create_once(path, Account.create().key.hex().encode())
    return Account.from_key(made.decode().strip())
