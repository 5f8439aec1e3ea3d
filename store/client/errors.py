"""Errors of the store client: one exception type carrying a Mooncake-style code.

Why one type with a code instead of a class per failure: the Mooncake-compatible facade must turn
every failure into Mooncake's negative return code, and callers of the native API mostly branch on
"not found" versus "anything else". Codes are :class:`~store.master.MasterErrorCode` members
(``1000 + |mooncake code|``) so master replies pass through unchanged; :func:`mooncake_code` maps
them back to Mooncake's numbers.
"""
from __future__ import annotations

from store.master import MasterErrorCode
from transfer.rpc import APPLICATION_CODE_BASE, RpcError

__all__ = ["StoreError", "MasterErrorCode", "mooncake_code", "as_store_error"]

TRANSFER_FAIL = APPLICATION_CODE_BASE + 800
"""Mooncake's TRANSFER_FAIL (-800): moving bytes to or from a replica failed."""
CHECKSUM_MISMATCH = APPLICATION_CODE_BASE + 801
"""A replica's bytes do not match the checksum stored with them (Mooncake has no such code; we
report it as -801, next to TRANSFER_FAIL, because it is a failed read)."""
BUFFER_NOT_REGISTERED = APPLICATION_CODE_BASE + 601
"""A zero-copy call named memory that is not registered (Mooncake answers INVALID_PARAMS)."""
RPC_FAIL = APPLICATION_CODE_BASE + 900
"""The master could not be reached (Mooncake's RPC_FAIL, -900)."""


class StoreError(Exception):
    """A store operation failed; ``code`` says why (see the module docstring)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = int(code)
        self.message = message

    @property
    def not_found(self) -> bool:
        return self.code == MasterErrorCode.OBJECT_NOT_FOUND

    def __str__(self) -> str:
        try:
            name = MasterErrorCode(self.code).name
        except ValueError:
            name = {TRANSFER_FAIL: "TRANSFER_FAIL", CHECKSUM_MISMATCH: "CHECKSUM_MISMATCH",
                    BUFFER_NOT_REGISTERED: "BUFFER_NOT_REGISTERED",
                    RPC_FAIL: "RPC_FAIL"}.get(self.code, str(self.code))
        return f"{self.message} [{name}]"


def as_store_error(e: BaseException) -> StoreError:
    """Wrap an RPC/master/transport failure so callers see one exception type."""
    if isinstance(e, StoreError):
        return e
    if isinstance(e, RpcError):
        code = e.code if e.code >= APPLICATION_CODE_BASE else RPC_FAIL
        return StoreError(code, getattr(e, "message", str(e)))
    if isinstance(e, (TimeoutError, OSError)):
        return StoreError(RPC_FAIL, f"master unreachable: {e}")
    return StoreError(MasterErrorCode.INTERNAL_ERROR, f"{type(e).__name__}: {e}")


def mooncake_code(code: int) -> int:
    """Mooncake's negative error number for one of our codes (0 stays 0)."""
    if code == 0:
        return 0
    if code == BUFFER_NOT_REGISTERED:
        return -600
    if code >= APPLICATION_CODE_BASE:
        return -(code - APPLICATION_CODE_BASE)
    return -1
