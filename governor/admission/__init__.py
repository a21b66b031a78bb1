"""Admission: per-model concurrency slots behind a short, fair wait queue.

:class:`AdmissionMiddleware` is the ASGI layer; the slots live in a
:class:`~governor.admission.base.SlotBackend`: :class:`MemorySlots` in this process,
or :class:`~governor.admission.redis.RedisSlots` (leases in Redis) for a fleet.
"""

from __future__ import annotations

from governor.admission.base import (
    Lease,
    Pool,
    PoolStats,
    QueueLimits,
    Rejected,
    SlotBackend,
    Waiter,
)
from governor.admission.memory import MemorySlots
from governor.admission.middleware import AdmissionMiddleware, ModelBusy

__all__ = [
    "AdmissionMiddleware",
    "Lease",
    "MemorySlots",
    "ModelBusy",
    "Pool",
    "PoolStats",
    "QueueLimits",
    "Rejected",
    "SlotBackend",
    "Waiter",
]
