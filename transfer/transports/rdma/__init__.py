"""The RDMA transport: one-sided READ/WRITE through pyverbs (imported only when a NIC is opened).

Modules: :mod:`.topology` (sysfs NIC/GPU/NUMA discovery and NIC preference), :mod:`.qp` (pure QP
state-transition builders), :mod:`.handshake` (descriptor entry and QP handshake messages),
:mod:`.verbs` (the pyverbs wrapper), :mod:`.completion` (CQ polling), :mod:`.loopback` (a
software NIC for tests) and :mod:`.transport` (:class:`RdmaTransport`; wiring documented there).
"""
from transfer.transports.rdma.transport import HandshakeSender, RdmaTransport

__all__ = ["HandshakeSender", "RdmaTransport"]
