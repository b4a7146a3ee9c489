"""The agent's wallet key: from X402_PRIVATE_KEY, or generated once and kept (mode 0600)."""

from __future__ import annotations

import re
import secrets
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coincurve import PublicKey
from eth_hash.auto import keccak

from procure.keyfiles import create_once

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount

_KEY = re.compile(r"(0x)?[0-9a-fA-F]{64}")
# secp256k1's group order: a private key is a number in [1, order).
_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def checksum_address(raw: bytes) -> str:
    """A 20-byte address in EIP-55 form: a hex letter is upper case where the keccak of the
    lowercase hex has a nibble of 8 or more."""
    plain = raw.hex()
    digest = keccak(plain.encode()).hex()
    return "0x" + "".join(
        c.upper() if int(d, 16) >= 8 else c for c, d in zip(plain, digest, strict=False)
    )


def key_address(key: bytes) -> str:
    """The address of a private key: the last 20 bytes of the keccak of its public key."""
    public = PublicKey.from_secret(key).format(compressed=False)[1:]
    return checksum_address(keccak(public)[-20:])


class Wallet:
    """A private key and its address, signing as x402's `ClientEvmSigner` (what the SDK's EVM
    scheme calls). eth_account, which signs (about 0.6 s of CPU to import), is loaded at the
    first signature: most starts (`procure serve`, a worker with nothing to pay, `run cancel`)
    never sign anything. The address is derived at once, with libsecp256k1 (coincurve)."""

    def __init__(self, key: bytes, signer: LocalAccount | None = None) -> None:
        self._key = key
        self.address = signer.address if signer is not None else key_address(key)
        self._account = signer
        self._lock = threading.Lock()
        self._signer: Any = None

    def __repr__(self) -> str:  # never the key
        return f"Wallet({self.address})"

    def account(self) -> LocalAccount:
        """eth_account's account for this key (loads eth_account)."""
        with self._lock:
            if self._account is None:
                from eth_account import Account

                self._account = Account.from_key(self._key)
            return self._account

    def sign_typed_data(
        self, domain: Any, types: dict[str, Any], primary_type: str, message: dict[str, Any]
    ) -> bytes:
        """EIP-712 signing, as the SDK's own eth_account signer does it (deterministic: a
        retried payment signs the same bytes)."""
        if self._signer is None:
            from x402.mechanisms.evm.signers import EthAccountSigner

            self._signer = EthAccountSigner(self.account())
        return bytes(self._signer.sign_typed_data(domain, types, primary_type, message))


def wallet_from_key(text: str) -> Wallet:
    """The wallet of a key in hex (0x optional). Any other form is left to eth_account, as it
    always was: it refuses a malformed key with the message it always gave, or accepts what
    it accepts."""
    if _KEY.fullmatch(text) and 0 < int(text, 16) < _ORDER:
        return Wallet(bytes.fromhex(text.removeprefix("0x")))
    from eth_account import Account

    account = Account.from_key(text)
    return Wallet(bytes(account.key), account)


def new_key() -> bytes:
    """A fresh private key, from the OS's randomness."""
    while True:
        key = secrets.token_bytes(32)
        if 0 < int.from_bytes(key, "big") < _ORDER:
            return key


def load_or_create_account(private_key: str | None, home: Path) -> Wallet:
    """The signing wallet. The key is never printed or logged; only its address is shown."""
    if private_key:
        return wallet_from_key(private_key)
    path = home / "wallet.key"
    if path.exists():
        return wallet_from_key(path.read_text().strip())
    # Whole or not at all: a second process starting on a new home read it empty and died.
    made = create_once(path, new_key().hex().encode())
    return wallet_from_key(made.decode().strip())
