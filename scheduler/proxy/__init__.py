"""The Conductor's HTTP front: an OpenAI-compatible proxy over vLLM instances (``mooncake-proxy``)."""
from scheduler.proxy.app import Proxy, ProxySettings
from scheduler.proxy.instances import InstancePool, InstanceSpec

__all__ = ["InstancePool", "InstanceSpec", "Proxy", "ProxySettings"]
