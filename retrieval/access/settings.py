"""The access layer's settings: what a caller without a key may do, and who sees a document
ingested without an ACL."""

from typing import Literal

from pydantic import BaseModel, Field


class AccessSettings(BaseModel):
    """Applied once any key carries principals (before that, every caller sees every document)."""

    anonymous: Literal["public", "deny"] = Field(
        "public", description="a request without a key: public sees the documents marked public (no "
        "search log); deny answers 401",
    )  # fmt: skip
    default: Literal["public", "private"] = Field(
        "private", description="a document ingested without an ACL: public is visible to everyone, "
        "private to admins alone (decided at search time: changing it needs no re-ingest)",
    )  # fmt: skip
