"""Waiting for a device's queued work, so that a wall clock reads finished work."""

from __future__ import annotations

import torch


def synchronize(device: torch.device | str) -> None:
    """Block until ``device``'s queued kernels have run (a no-op on the CPU).

    GPU kernels run asynchronously: without this a timer around a phase charges its work to
    whichever later call first waits for it.
    """
    device = torch.device(device)
    if device.type != "cpu":
        torch.accelerator.synchronize(device)
