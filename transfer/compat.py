"""Mooncake's Python ``TransferEngine`` API (``mooncake.engine.TransferEngine``), on our engine.

Same method names, arguments and return codes as mooncake-transfer-engine 0.3.x, so code
written for Mooncake runs unchanged: 0 means success and a negative number an error
(``-1`` invalid argument / transfer failed, ``-3`` address not registered, ``-7`` overlapping
registration, ...); ``transfer_check_status`` answers 1 completed, 0 pending, -1 failed. With
``P2PHANDSHAKE`` the segment name peers use is ``"<host>:<get_rpc_port()>"``.

A thin layer: every call runs the async :class:`transfer.engine.Engine` on a background loop.
Errors are logged and turned into codes rather than raised, as Mooncake does.
"""
from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from transfer.batch import Batch, RequestStatus, TransferRequest
from transfer.errors import AddressError, RegistrationError, SegmentNotFoundError, TransferError
from transfer.memory import memory_at
from transfer.rpc import BackgroundLoop, get_background_loop
from transfer.shm import SharedBuffer
from transfer.transports.base import Opcode

__all__ = ["ErrorCode", "TransferEngine", "TransferNotify", "TransferOpcode"]

logger = logging.getLogger(__name__)


class ErrorCode(enum.IntEnum):
    """Mooncake's ``error.h`` codes used by this API."""

    OK = 0
    INVALID_ARGUMENT = -1
    ADDRESS_NOT_REGISTERED = -3
    ADDRESS_OVERLAPPED = -7


class TransferOpcode(enum.IntEnum):
    Read = 0
    Write = 1


@dataclass
class TransferNotify:
    """A notification: ``name`` is the sender's segment, ``msg`` the text."""

    name: str = ""
    msg: str = ""


def _code_of(e: BaseException) -> int:
    if isinstance(e, RegistrationError) and ("overlap" in str(e) or "already registered" in str(e)):
        return ErrorCode.ADDRESS_OVERLAPPED
    if isinstance(e, (AddressError, RegistrationError)) and "no registered buffer" in str(e):
        return ErrorCode.ADDRESS_NOT_REGISTERED
    return ErrorCode.INVALID_ARGUMENT


class TransferEngine:
    """Drop-in for ``mooncake.engine.TransferEngine``."""

    TransferOpcode = TransferOpcode

    def __init__(self, loop: BackgroundLoop | None = None, timeout: float = 300.0) -> None:
        self._loop = loop
        self._engine: Any = None
        self._managed: dict[int, SharedBuffer] = {}
        self._batches: dict[int, Batch] = {}
        self._timeout = timeout

    # -- setup --------------------------------------------------------------------------------

    def initialize(self, local_hostname: str, metadata_server: str, protocol: str,
                   device_name: str) -> int:
        """Start the engine. Returns 0, or -1 (logged) on a bad argument or startup failure."""
        from transfer.config import ConfigError, load_config
        from transfer.engine import Engine

        if self._engine is not None:
            logger.error("initialize: already initialized")
            return ErrorCode.INVALID_ARGUMENT
        try:
            cfg = load_config(overrides={"local_hostname": local_hostname,
                                         "metadata_server": metadata_server,
                                         "protocol": protocol or "tcp",
                                         "device_name": device_name or ""})
            engine = Engine(cfg)
            engine.start_in(self._loop or get_background_loop(), timeout=60.0)
        except (ConfigError, ValueError, OSError, TransferError, ImportError) as e:
            logger.error("initialize failed: %s", e)
            return ErrorCode.INVALID_ARGUMENT
        self._engine = engine
        return ErrorCode.OK

    def get_rpc_port(self) -> int:
        return int(self._engine.rpc_port) if self._engine is not None else -1

    def get_engine(self) -> Any:
        """Our :class:`~transfer.engine.Engine` (Mooncake returns its C++ engine here)."""
        return self._engine

    def _run(self, coro: Any) -> Any:
        if self._engine is None:
            coro.close()
            raise RuntimeError("TransferEngine is not initialized")
        return self._engine.run(coro, self._timeout)

    def _guard(self, what: str, fn: Any, *args: Any) -> int:
        try:
            fn(*args)
            return ErrorCode.OK
        except (TransferError, ValueError, TypeError, RuntimeError, OSError, TimeoutError) as e:
            logger.error("%s failed: %s", what, e)
            return _code_of(e)

    # -- memory -------------------------------------------------------------------------------

    def register_memory(self, buffer_addr: int, capacity: int, location: str = "*") -> int:
        loc = None if location in ("*", "", None) else location
        return self._guard("register_memory", lambda: self._run(
            self._engine.register(buffer_addr, capacity, location=loc)))

    def unregister_memory(self, buffer_addr: int) -> int:
        return self._guard("unregister_memory",
                           lambda: self._run(self._engine.unregister(buffer_addr)))

    def batch_register_memory(self, buffer_addresses: Sequence[int], capacities: Sequence[int],
                              location: str = "*") -> int:
        if len(buffer_addresses) != len(capacities):
            return ErrorCode.INVALID_ARGUMENT
        loc = None if location in ("*", "", None) else location
        return self._guard("batch_register_memory", lambda: self._run(
            self._engine.register_many(list(zip(buffer_addresses, capacities)), location=loc)))

    def batch_unregister_memory(self, buffer_addresses: Sequence[int]) -> int:
        def go() -> None:
            for a in buffer_addresses:
                self._run(self._engine.unregister(a))
        return self._guard("batch_unregister_memory", go)

    def allocate_managed_buffer(self, length: int) -> int:
        """Registered, shared-memory-backed host memory; 0 on failure (as Mooncake)."""
        try:
            buf = self._run(self._engine.allocate_shared(length))
        except (TransferError, ValueError, OSError, RuntimeError) as e:
            logger.error("allocate_managed_buffer(%s) failed: %s", length, e)
            return 0
        self._managed[buf.address] = buf
        return buf.address

    def free_managed_buffer(self, buffer_addr: int, length: int) -> int:
        buf = self._managed.pop(buffer_addr, None)
        if buf is None:
            return ErrorCode.INVALID_ARGUMENT
        return self._guard("free_managed_buffer", lambda: self._run(self._engine.free_shared(buf)))

    def write_bytes_to_buffer(self, dest_address: int, src: bytes | str, length: int) -> int:
        data = src.encode() if isinstance(src, str) else bytes(src)
        if length < 0 or length > len(data):
            return ErrorCode.INVALID_ARGUMENT
        try:
            self._engine.registry.find(dest_address, length)
        except (AddressError, AttributeError) as e:
            logger.error("write_bytes_to_buffer: %s", e)
            return ErrorCode.INVALID_ARGUMENT
        memory_at(dest_address, length)[:] = data[:length]
        return ErrorCode.OK

    def read_bytes_from_buffer(self, source_address: int, length: int) -> bytes:
        try:
            self._engine.registry.find(source_address, length)
        except (AddressError, AttributeError) as e:
            logger.error("read_bytes_from_buffer: %s", e)
            return b""
        return bytes(memory_at(source_address, length))

    def get_first_buffer_address(self, segment_name: str) -> int:
        try:
            return int(self._run(self._engine.open_segment(segment_name)).first_address())
        except (TransferError, RuntimeError, TimeoutError) as e:
            logger.error("get_first_buffer_address(%s): %s", segment_name, e)
            return 0

    # -- transfers ----------------------------------------------------------------------------

    @staticmethod
    def _requests(target: str, buffers: Sequence[int], peers: Sequence[int],
                  lengths: Sequence[int], opcode: int) -> list[TransferRequest]:
        if not (len(buffers) == len(peers) == len(lengths)) or not buffers:
            raise ValueError("buffers, peer addresses and lengths must be equally long, non-empty")
        op = Opcode(int(opcode))
        return [TransferRequest(op, b, target, p, n) for b, p, n in zip(buffers, peers, lengths)]

    def _submit(self, target: str, buffers: Sequence[int], peers: Sequence[int],
                lengths: Sequence[int], opcode: int, notify: TransferNotify | None = None) -> Batch:
        reqs = self._requests(target, buffers, peers, lengths, opcode)
        message = None if notify is None else (notify.msg or "")
        return self._run(self._engine.submit(reqs, notify=message))

    def _sync(self, *args: Any, notify: TransferNotify | None = None) -> int:
        try:
            if notify is None:
                # Engine.transfer_blocking runs fast-path batches on this thread (no loop hop).
                reqs = self._requests(*args)
                if self._engine is None:
                    raise RuntimeError("TransferEngine is not initialized")
                self._engine.transfer_blocking(reqs, timeout=self._timeout)
                return ErrorCode.OK
            batch = self._submit(*args, notify=notify)
            self._run(batch.wait())
            batch.raise_for_status()
            return ErrorCode.OK
        except (TransferError, ValueError, TypeError, RuntimeError, TimeoutError) as e:
            logger.error("transfer to %s failed: %s", args[0], e)
            return ErrorCode.INVALID_ARGUMENT
        except SegmentNotFoundError as e:  # pragma: no cover - a TransferError, kept explicit
            logger.error("%s", e)
            return ErrorCode.INVALID_ARGUMENT

    def transfer_sync_write(self, target_hostname: str, buffer: int, peer_buffer_address: int,
                            length: int, transport_hint: str = "") -> int:
        return self._sync(target_hostname, [buffer], [peer_buffer_address], [length], Opcode.WRITE)

    def transfer_sync_read(self, target_hostname: str, buffer: int, peer_buffer_address: int,
                           length: int, transport_hint: str = "") -> int:
        return self._sync(target_hostname, [buffer], [peer_buffer_address], [length], Opcode.READ)

    def transfer_sync(self, target_hostname: str, buffer: int, peer_buffer_address: int,
                      length: int, opcode: int, notify: TransferNotify | None = None,
                      transport_hint: str = "") -> int:
        return self._sync(target_hostname, [buffer], [peer_buffer_address], [length], opcode,
                          notify=notify)

    def batch_transfer_sync_write(self, target_hostname: str, buffers: Sequence[int],
                                  peer_buffer_addresses: Sequence[int], lengths: Sequence[int],
                                  transport_hint: str = "") -> int:
        return self._sync(target_hostname, buffers, peer_buffer_addresses, lengths, Opcode.WRITE)

    def batch_transfer_sync_read(self, target_hostname: str, buffers: Sequence[int],
                                 peer_buffer_addresses: Sequence[int], lengths: Sequence[int],
                                 transport_hint: str = "") -> int:
        return self._sync(target_hostname, buffers, peer_buffer_addresses, lengths, Opcode.READ)

    def batch_transfer_sync(self, target_hostname: str, buffers: Sequence[int],
                            peer_buffer_addresses: Sequence[int], lengths: Sequence[int],
                            opcode: int, notify: TransferNotify | None = None,
                            transport_hint: str = "") -> int:
        return self._sync(target_hostname, buffers, peer_buffer_addresses, lengths, opcode,
                          notify=notify)

    def _async(self, *args: Any) -> int:
        try:
            batch = self._submit(*args)
        except (TransferError, ValueError, TypeError, RuntimeError, TimeoutError) as e:
            logger.error("transfer to %s failed: %s", args[0], e)
            return 0
        self._batches[batch.id] = batch
        return batch.id

    def batch_transfer_async_write(self, target_hostname: str, buffers: Sequence[int],
                                   peer_buffer_addresses: Sequence[int], lengths: Sequence[int],
                                   transport_hint: str = "") -> int:
        """Returns a batch id (0 on failure) for :meth:`get_batch_transfer_status`."""
        return self._async(target_hostname, buffers, peer_buffer_addresses, lengths, Opcode.WRITE)

    def batch_transfer_async_read(self, target_hostname: str, buffers: Sequence[int],
                                  peer_buffer_addresses: Sequence[int], lengths: Sequence[int],
                                  transport_hint: str = "") -> int:
        return self._async(target_hostname, buffers, peer_buffer_addresses, lengths, Opcode.READ)

    def batch_transfer_async(self, target_hostname: str, buffers: Sequence[int],
                             peer_buffer_addresses: Sequence[int], lengths: Sequence[int],
                             opcode: int, transport_hint: str = "") -> int:
        return self._async(target_hostname, buffers, peer_buffer_addresses, lengths, opcode)

    def transfer_submit_write(self, target_hostname: str, buffer: int, peer_buffer_address: int,
                              length: int, transport_hint: str = "") -> int:
        """One async WRITE; poll it with :meth:`transfer_check_status`. 0 (or <0) on failure."""
        return self._async(target_hostname, [buffer], [peer_buffer_address], [length], Opcode.WRITE)

    def get_batch_transfer_status(self, batch_ids: Sequence[int]) -> int:
        """Wait for the batches; 0 if every request completed, -1 otherwise. Frees the ids."""
        code = ErrorCode.OK
        for bid in batch_ids:
            batch = self._batches.pop(bid, None)
            if batch is None:
                code = ErrorCode.INVALID_ARGUMENT
                continue
            try:
                self._run(batch.wait())
            except TimeoutError:
                code = ErrorCode.INVALID_ARGUMENT
                continue
            self._engine.release_batch(bid)
            if not batch.ok:
                logger.error("batch %d failed: %s", bid,
                             next(r.error for r in batch.results if r.error))
                code = ErrorCode.INVALID_ARGUMENT
        return code

    def transfer_check_status(self, batch_id: int) -> int:
        """1 completed, 0 still running, -1 failed or unknown (final answers free the id)."""
        batch = self._batches.get(batch_id)
        if batch is None:
            return -1
        if not batch.done:
            return 0
        del self._batches[batch_id]
        self._engine.release_batch(batch_id)
        return 1 if all(r.status is RequestStatus.COMPLETED for r in batch.results) else -1

    def get_notifies(self) -> list[TransferNotify]:
        return [TransferNotify(n.sender, n.message.decode("utf-8", "replace"))
                for n in self._engine.notifications()]

    def close(self) -> None:
        """Release the engine (Mooncake does this in its destructor)."""
        if self._engine is not None:
            for buf in self._managed.values():
                buf.free()
            self._managed.clear()
            self._engine.close_in()
            self._engine = None
