"""The Conductor's scheduling policies as a library: block ids, instances and a clock, nothing else.

The proxy drives it with real time and store block keys; the simulator (:mod:`scheduler.sim`)
with simulated time and trace block ids.
"""
from .conductor import Conductor, ConductorConfig
from .cost_model import DecodeModel, PrefillModel, TransferModel
from .index import BlockIndex, GlobalPool
from .policies import POLICIES, should_transfer
from .types import (
    EVICTION_POLICIES,
    POLICY_NAMES,
    REJECTION_MODES,
    BlockId,
    Clock,
    ConductorError,
    Decision,
    EvictionPolicy,
    InstanceInfo,
    ManualClock,
    PolicyName,
    RejectionMode,
    RequestInfo,
    Role,
    monotonic_clock,
)

__all__ = [
    "EVICTION_POLICIES",
    "POLICIES",
    "POLICY_NAMES",
    "REJECTION_MODES",
    "BlockId",
    "BlockIndex",
    "Clock",
    "Conductor",
    "ConductorConfig",
    "ConductorError",
    "Decision",
    "DecodeModel",
    "EvictionPolicy",
    "GlobalPool",
    "InstanceInfo",
    "ManualClock",
    "PolicyName",
    "PrefillModel",
    "RejectionMode",
    "RequestInfo",
    "Role",
    "TransferModel",
    "monotonic_clock",
    "should_transfer",
]
