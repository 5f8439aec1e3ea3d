"""Errors the transfer engine raises to its callers.

Why a small hierarchy: callers mostly ask one of three questions - "did I pass something
wrong?" (:class:`RegistrationError`, :class:`AddressError`, both ``ValueError``), "does that peer
exist?" (:class:`SegmentNotFoundError`), or "did the bytes move?" (:class:`TransferFailedError`,
carrying the cause of the last attempt).
"""
from __future__ import annotations

__all__ = [
    "AddressError",
    "DescriptorError",
    "RegistrationError",
    "SegmentNotFoundError",
    "TransferError",
    "TransferFailedError",
]


class TransferError(Exception):
    """Base of every transfer-engine error."""


class RegistrationError(TransferError, ValueError):
    """A buffer could not be registered or unregistered (overlap, bad length, unknown...)."""


class AddressError(TransferError, ValueError):
    """An address range is not inside one registered buffer (locally or at the peer)."""


class DescriptorError(TransferError, ValueError):
    """A segment descriptor is malformed or fails validation."""


class SegmentNotFoundError(TransferError, LookupError):
    """No descriptor is published for the segment name."""


class TransferFailedError(TransferError):
    """A request did not complete; ``str()`` names the cause of the last attempt."""
