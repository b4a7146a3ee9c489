"""Each vendor's own bearer credential, kept encrypted in the store (`vendors.credential`).

A credential is encrypted with Fernet (AES-128-CBC + HMAC-SHA256) under one key per
deployment: `PROCURE_SECRET_KEY` (a Fernet key, from the environment or `.env`) if set, else
the key file `<PROCURE_HOME>/secret.key`, created with mode 0600 on first use. Every process
that reads the same store (API, workers, CLI) must use the same key: with PostgreSQL and
several hosts, set `PROCURE_SECRET_KEY` everywhere (values sealed under the key file before
still open; to rotate, list the old key after the new one: `NEW,OLD`). A credential that
cannot be opened with the key (another key, a damaged value) raises `CredentialError`; the
vendor client then sends no credential at all and logs a warning, never crashing and never
falling back to another vendor's credential.

Neither the key nor a credential is ever logged; errors name the vendor, not the value.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from procure.keyfiles import create_once

KEY_ENV = "PROCURE_SECRET_KEY"
KEY_FILE = "secret.key"


class CredentialError(Exception):
    """A stored credential cannot be opened (wrong key, damaged value), or the key is bad."""


class _KeySettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    secret_key: SecretStr | None = Field(None, validation_alias=KEY_ENV)


class Keyring:
    """Encrypts vendor credentials under one Fernet key; decrypts under it or an older one."""

    def __init__(self, key: bytes | str, *, older: Sequence[bytes | str] = ()) -> None:
        self._fernet = _fernet(key)
        # Values sealed under an older key (a rotation, or the key file used before
        # PROCURE_SECRET_KEY was set) must still open: else every stored credential and every
        # running instance's node token is lost at once.
        self._opener = MultiFernet([self._fernet, *(_fernet(k) for k in older)])

    def __repr__(self) -> str:
        return "Keyring(<hidden>)"

    @classmethod
    def load(cls, home: Path | str, *, key: str | None = None) -> Keyring:
        """The deployment's keyring: `key`, else `PROCURE_SECRET_KEY`, else the key file in
        `home` (created, mode 0600, if missing; a key another process wrote first wins).

        `PROCURE_SECRET_KEY` may list older keys after the current one, comma-separated
        (`NEW,OLD`): credentials stored under them still open. With it set, an existing key
        file in `home` opens old values too, so switching to the variable loses nothing."""
        if key:
            return cls(key.strip())
        key = _env_key()
        home = Path(home)
        if key:
            current, *older = [k.strip() for k in key.split(",") if k.strip()] or [""]
            try:
                return cls(current, older=[*older, *_old_file_key(home / KEY_FILE)])
            except CredentialError as exc:
                raise CredentialError(f"{KEY_ENV}: {exc}") from None
        path = home / KEY_FILE
        if not path.exists():
            _create_key_file(home, path)
        try:
            return cls(path.read_bytes().strip())
        except CredentialError as exc:
            raise CredentialError(f"{path}: {exc}") from None

    def encrypt(self, credential: str) -> str:
        """The ciphertext to store for `credential` (a fresh IV each time)."""
        return self._fernet.encrypt(credential.encode("utf-8")).decode("ascii")

    def decrypt(self, token: str) -> str:
        """The credential in `token`; `CredentialError` if this key cannot open it."""
        try:
            return self._opener.decrypt(token.encode("utf-8")).decode("utf-8")
        except (InvalidToken, UnicodeError, ValueError, TypeError):
            raise CredentialError(
                "the stored vendor credential cannot be decrypted with this process's key "
                f"(every process sharing the store needs the same {KEY_ENV} or "
                f"{KEY_FILE}); register the vendor's credential again"
            ) from None


def _fernet(key: bytes | str) -> Fernet:
    try:
        return Fernet(key)
    except (ValueError, TypeError) as exc:
        raise CredentialError(
            f"not a Fernet key (32 url-safe base64-encoded bytes); make one with "
            f"`python -c 'from cryptography.fernet import Fernet; "
            f"print(Fernet.generate_key().decode())'` ({type(exc).__name__})"
        ) from None


def _old_file_key(path: Path) -> list[bytes]:
    """The key file's key, if there is a valid one: what values stored before
    `PROCURE_SECRET_KEY` was set are sealed with. Never created here."""
    try:
        key = path.read_bytes().strip()
        _fernet(key)
    except (OSError, CredentialError):
        return []
    return [key]


def _create_key_file(home: Path, path: Path) -> None:
    """A new key at `path`, whole or not at all; when another process made one first, theirs
    stays."""
    create_once(path, Fernet.generate_key())


def _env_key() -> str | None:
    value = os.environ.get(KEY_ENV)
    if value:
        return value
    secret = _KeySettings().secret_key  # honours `.env`, like the rest of the settings
    return secret.get_secret_value() if secret else None
