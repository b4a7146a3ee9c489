"""The faults the mock clouds inject, as far as they are the same on all three: the switches that
distort an instance (unknown status, never booting, wrong address) and the answers that replace
an endpoint's own (a hang, an error, garbage, a huge body), served `count` times or until reset.
Each mock adds its own errors, in its provider's shape."""

from __future__ import annotations

from typing import ClassVar, Self

from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field

GARBAGE = "<html><body>502 Bad Gateway</body></html>"  # a proxy's error page, status 200


class AnswerFaults(BaseModel):
    """What `POST /admin/faults` sets (the whole set at once; `{}` clears it). `endpoints` limits
    the answer faults to some of the mock's endpoints (empty: all). `count`: the answer faults
    are served that many times, then cleared (None: until changed)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # taken from outside
    ANSWERS: ClassVar[tuple[str, ...]] = ("status", "hang_s", "garbage", "huge")
    """The fields that replace or delay an answer, cleared once `count` answers are served."""
    CLEARED_TOO: ClassVar[tuple[str, ...]] = ()
    """Fields cleared with them that answer nothing by themselves."""

    endpoints: list[str] = Field(default_factory=list, max_length=10)
    status: int | None = Field(None, ge=400, le=599)  # this status, in the provider's shape
    count: int | None = Field(None, ge=1, le=10_000)
    hang_s: float = Field(0.0, ge=0, le=600)
    garbage: bool = False  # 200 with an HTML page
    huge: bool = False  # 200 with a body past every client's cap
    unknown_status: bool = False  # instances read with a status the provider never documented
    never_boot: bool = False  # instances created from now on never finish booting
    wrong_ip: bool = False  # running instances' address is not where their node is

    def applies(self, endpoint: str) -> bool:
        return not self.endpoints or endpoint in self.endpoints

    def answering(self) -> bool:
        """Whether a fault replaces or delays the endpoint's own answer."""
        return any(getattr(self, key) for key in self.ANSWERS)

    def serve(self) -> Self:
        """One answer fault served: what it serves (a copy); after `count` of them, the answer
        faults end here."""
        served = self.model_copy()
        if self.count is not None:
            self.count -= 1
            if self.count <= 0:
                self.count = None
                for key in self.ANSWERS + self.CLEARED_TOO:
                    setattr(self, key, type(self).model_fields[key].default)
        return served

    def replace(self, body: AnswerFaults) -> None:
        """Set every fault as `body` says."""
        for key, value in body.model_dump().items():
            setattr(self, key, value)


def garbage() -> Response:
    return PlainTextResponse(GARBAGE, 200)


def huge(key: str, size: int, media_type: str = "text/plain") -> Response:
    """200 with `{"<key>": "xxx…"}`, `size` bytes of padding: past what a client should read."""
    return PlainTextResponse('{"' + key + '": "' + "x" * size + '"}', 200, media_type=media_type)
