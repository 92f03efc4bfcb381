"""Limits and batching knobs of a server; runtime only, never saved."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeConfig:
    """How the server batches and what it refuses.

    Attributes:
        max_body_bytes: request bodies larger than this are refused with 413.
        max_tokens_limit: the largest ``max_tokens`` a query may ask for.
        max_n: the largest ``n`` (choices per prompt) a query may ask for.
        max_batch_rows: rows (prompts × n) decoded together in one wave of forward passes.
        batch_wait_s: how long the scheduler waits after the first query for others to join.
        edit_batch_size: edits written as one batch (one journal entry) at most.
        edit_wait_s: how long the edit worker waits after the first edit for others to join.
        max_edits_per_request: the most edit records one POST /v1/edits may carry.
    """

    max_body_bytes: int = 4 * 1024 * 1024
    max_tokens_limit: int = 512
    max_n: int = 8
    max_batch_rows: int = 32
    batch_wait_s: float = 0.005
    edit_batch_size: int = 16
    edit_wait_s: float = 0.05
    max_edits_per_request: int = 1000

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_tokens_limit", "max_n", "max_batch_rows", "edit_batch_size",
                     "max_edits_per_request"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ServeConfig.{name} must be a positive integer, got {value!r}")
        for name in ("batch_wait_s", "edit_wait_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"ServeConfig.{name} must be a non-negative number of seconds, got {value!r}")
