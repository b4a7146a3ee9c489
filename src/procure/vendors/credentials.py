"""Each vendor's own bearer credential, kept encrypted in the store (`vendors.credential`).

A credential is encrypted with Fernet (AES-128-CBC + HMAC-SHA256) under one key per
deployment: `PROCURE_SECRET_KEY` (a Fernet key, from the environment or `.env`) if set, else
the key file `<PROCURE_HOME>/secret.key`, created with mode 0600 on first use. Every process
that reads the same store (API, workers, CLI) must use the same key: with PostgreSQL and
several hosts, set `PROCURE_SECRET_KEY` everywhere. A credential that cannot be opened with
the key (another key, a damaged value) raises `CredentialError`; the vendor client then sends
no credential at all and logs a warning, never crashing and never falling back to another
vendor's credential.

Neither the key nor a credential is ever logged; errors name the vendor, not the value.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

KEY_ENV = "PROCURE_SECRET_KEY"
KEY_FILE = "secret.key"


class CredentialError(Exception):
    """A stored credential cannot be opened (wrong key, damaged value), or the key is bad."""


class _KeySettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    secret_key: SecretStr | None = Field(None, validation_alias=KEY_ENV)


class Keyring:
    """Encrypts and decrypts vendor credentials under one Fernet key."""

    def __init__(self, key: bytes | str) -> None:
        try:
            self._fernet = Fernet(key)
        except (ValueError, TypeError) as exc:
            raise CredentialError(
                f"not a Fernet key (32 url-safe base64-encoded bytes); make one with "
                f"`python -c 'from cryptography.fernet import Fernet; "
                f"print(Fernet.generate_key().decode())'` ({type(exc).__name__})"
            ) from None

    def __repr__(self) -> str:
        return "Keyring(<hidden>)"

    @classmethod
    def load(cls, home: Path | str, *, key: str | None = None) -> Keyring:
        """The deployment's keyring: `key`, else `PROCURE_SECRET_KEY`, else the key file in
        `home` (created, mode 0600, if missing; a key another process wrote first wins)."""
        if key:
            return cls(key.strip())
        key = _env_key()
        if key:
            try:
                return cls(key.strip())
            except CredentialError as exc:
                raise CredentialError(f"{KEY_ENV}: {exc}") from None
        home = Path(home)
        path = home / KEY_FILE
        if path.exists():
            return cls(path.read_bytes().strip())
        home.mkdir(parents=True, exist_ok=True)
        new = Fernet.generate_key()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it first: use theirs
            return cls(path.read_bytes().strip())
        with os.fdopen(fd, "wb") as f:
            f.write(new)
        return cls(new)

    def encrypt(self, credential: str) -> str:
        """The ciphertext to store for `credential` (a fresh IV each time)."""
        return self._fernet.encrypt(credential.encode("utf-8")).decode("ascii")

    def decrypt(self, token: str) -> str:
        """The credential in `token`; `CredentialError` if this key cannot open it."""
        try:
            return self._fernet.decrypt(token.encode("utf-8")).decode("utf-8")
        except (InvalidToken, UnicodeError, ValueError, TypeError):
            raise CredentialError(
                "the stored vendor credential cannot be decrypted with this process's key "
                f"(every process sharing the store needs the same {KEY_ENV} or "
                f"{KEY_FILE}); register the vendor's credential again"
            ) from None


def _env_key() -> str | None:
    value = os.environ.get(KEY_ENV)
    if value:
        return value
    secret = _KeySettings().secret_key  # honours `.env`, like the rest of the settings
    return secret.get_secret_value() if secret else None
