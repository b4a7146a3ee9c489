"""What a rented instance's node runs for procure (the agent's cloud runs and the gateway's paid
jobs): the job's command and the checkpoint store every node can reach, from the environment."""

from __future__ import annotations

import re
import shlex
from typing import Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from procure.settings import CHECKED, blank_is_unset

MAX_ARGS = 64
_UNSAFE = re.compile(r"[\x00-\x20\x7f]")  # whitespace and control characters


class CloudJobSettings(BaseSettings):
    """`PROCURE_CLOUD_COMMAND` and `PROCURE_CLOUD_CHECKPOINT_DIR`."""

    model_config = SettingsConfigDict(**CHECKED, hide_input_in_errors=True)

    command: str = Field(
        "python examples/train.py",
        max_length=4000,
        validation_alias="PROCURE_CLOUD_COMMAND",
        description="What the node runs for a job, split as a shell would (it must exist on "
        "the instance: in its image, or installed by its start-up); the job's parameters are "
        "in its environment as PROCURE_JOB_SPEC (JSON)",
    )
    checkpoint_dir: str | None = Field(
        None,
        max_length=2048,
        validation_alias="PROCURE_CLOUD_CHECKPOINT_DIR",
        description="Where jobs write checkpoints: an fsspec URL every instance can reach "
        "(s3://bucket/prefix, gs://...; the node needs that protocol's package). Unset: each "
        "node's own disk, so a job moved to another instance starts over",
    )

    @field_validator("checkpoint_dir", mode="before")
    @classmethod
    def _blank(cls, value: Any) -> Any:
        return blank_is_unset(value)

    @field_validator("command")
    @classmethod
    def _splits(cls, value: str) -> str:
        try:
            args = shlex.split(value)
        except ValueError:
            raise ValueError("PROCURE_CLOUD_COMMAND: unbalanced quotes") from None
        if not 1 <= len(args) <= MAX_ARGS or any("\0" in a for a in args):
            raise ValueError(f"PROCURE_CLOUD_COMMAND: 1 to {MAX_ARGS} arguments")
        return value

    @field_validator("checkpoint_dir")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and _UNSAFE.search(value):
            raise ValueError("PROCURE_CLOUD_CHECKPOINT_DIR: no spaces or control characters")
        return value

    @property
    def argv(self) -> tuple[str, ...]:
        return tuple(shlex.split(self.command))

    @property
    def shared(self) -> bool:
        """Whether checkpoints outlive the instance that wrote them."""
        return self.checkpoint_dir is not None and on_a_store(self.checkpoint_dir)


def on_a_store(url: str) -> bool:
    """Whether `url` names an object store (s3://, gs://, ...), not a path on a node's own
    disk (a plain path, file://, local://). As the node reads it (fsspec's protocols), without
    importing fsspec where only the answer is wanted."""
    protocol, sep, _ = url.partition("://")
    return bool(sep) and protocol not in ("file", "local")
