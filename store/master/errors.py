"""Application error codes of the master, mirroring Mooncake's ``ErrorCode`` names.

Why ``1000 + |mooncake code|``: Mooncake's codes are negative and the RPC layer reserves codes
below :data:`~transfer.rpc.APPLICATION_CODE_BASE`, so ``OBJECT_NOT_FOUND`` (Mooncake -704) is
1704 here and a reader who knows Mooncake can still map every number back. ``OK`` (0) only ever
appears as a per-item code in batch responses; single calls raise :class:`MasterError`, which
travels as an RPC application error and arrives at the client as an ``RpcError`` with this code.
"""
from __future__ import annotations

import enum

from transfer.rpc import APPLICATION_CODE_BASE, RpcError

__all__ = ["MasterError", "MasterErrorCode", "check_code"]


class MasterErrorCode(enum.IntEnum):
    """Why a master operation failed (per-item in batch replies, or the RPC error code)."""

    OK = 0
    INTERNAL_ERROR = APPLICATION_CODE_BASE + 1
    SEGMENT_NOT_FOUND = APPLICATION_CODE_BASE + 101
    SEGMENT_ALREADY_EXISTS = APPLICATION_CODE_BASE + 102
    NO_AVAILABLE_HANDLE = APPLICATION_CODE_BASE + 200
    """No space: no set of ``replica_num`` segments could hold the object, even after eviction."""
    INVALID_KEY = APPLICATION_CODE_BASE + 400
    """Empty key, or longer than 256 bytes of UTF-8."""
    INVALID_PARAMS = APPLICATION_CODE_BASE + 600
    """A size of 0 or beyond any segment, a bad replica count, a bad segment descriptor..."""
    REPLICA_IS_NOT_READY = APPLICATION_CODE_BASE + 703
    """The object exists but its put has not ended: it has no complete replica yet."""
    OBJECT_NOT_FOUND = APPLICATION_CODE_BASE + 704
    OBJECT_ALREADY_EXISTS = APPLICATION_CODE_BASE + 705
    OBJECT_HAS_LEASE = APPLICATION_CODE_BASE + 706
    """Remove refused: a reader holds a lease on the object (or it is hard-pinned)."""
    OBJECT_PUT_IN_PROGRESS = APPLICATION_CODE_BASE + 707
    """A concurrent put of the same key has started and not yet ended or been revoked."""
    CLIENT_NOT_FOUND = APPLICATION_CODE_BASE + 708
    """The client id is unknown: never mounted, or declared dead; remount."""
    UNAVAILABLE_IN_CURRENT_STATUS = APPLICATION_CODE_BASE + 1010
    """This master is not the leader (or is shutting down)."""
    QUOTA_EXCEEDED = APPLICATION_CODE_BASE + 1900
    """Ours (no Mooncake code): the put would take the tenant over its byte quota."""
    PERMISSION_DENIED = APPLICATION_CODE_BASE + 1901
    """Ours: a tenant called an operation reserved to the cluster's infrastructure."""


class MasterError(RpcError):
    """Raised by the store and the handlers; the RPC server sends it as an error reply."""

    def __init__(self, code: MasterErrorCode, message: str) -> None:
        super().__init__(int(code), message)
        self.code = code

    def __new__(cls, code: MasterErrorCode, message: str) -> MasterError:
        return super().__new__(cls, int(code), message)  # type: ignore[return-value]

    def __str__(self) -> str:
        return f"{self.message} [{self.code.name}]"


def check_code(code: int) -> MasterErrorCode | int:
    """The enum member for a wire code (or the plain int, for codes from a newer master)."""
    try:
        return MasterErrorCode(code)
    except ValueError:
        return code
