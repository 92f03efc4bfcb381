"""Drift ``‖W_l − W0_l‖_F`` of each edited layer against the number of live edits, one point
per weight version, recorded as edits and undos are published (in memory: a restarted server
starts again from its current point)."""

from __future__ import annotations

import logging
import threading
import time

import torch

from ...model.weights import get_W

log = logging.getLogger(__name__)

MAX_POINTS = 10_000  # beyond this the oldest half is thinned to every other point


class DriftHistory:
    def __init__(self, live, W0: dict[int, torch.Tensor], live_edits) -> None:
        self._live = live
        self._W0 = W0
        self._live_edits = live_edits  # () -> number of live edits now
        self._lock = threading.Lock()
        self._points: list[dict] = []

    def record(self, version: int) -> None:
        """Add the point of ``version``; called on the thread that just published it (the only
        writer of the served weights), so the weights read are those of ``version``."""
        try:
            drift = {str(l): float(torch.linalg.norm(get_W(self._live.lm, l) - W0.to(torch.float32)))
                     for l, W0 in self._W0.items()}
            point = {"weight_version": version, "live_edits": int(self._live_edits()), "drift": drift,
                     "time": time.time()}
        except Exception:  # a console figure must never fail an edit that is already durable
            log.exception("drift of weight version %d could not be recorded", version)
            return
        with self._lock:
            self._points = [p for p in self._points if p["weight_version"] != version] + [point]
            if len(self._points) > MAX_POINTS:
                half = len(self._points) // 2
                self._points = self._points[:half:2] + self._points[half:]

    def points(self) -> list[dict]:
        with self._lock:
            return [dict(p) for p in self._points]
