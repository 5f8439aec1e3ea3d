"""The distribution is what users install: one wheel, four packages, light imports, no pickle."""
from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("transfer", "store", "scheduler", "mooncake_connector")
HEAVY = ("vllm", "torch", "cupy", "pyverbs", "sglang")
OPTIONAL = ("vllm", "cupy", "pyverbs", "sglang", "aetcd", "matplotlib", "psutil", "httpx",
            "openai", "hypothesis")
"""Extras and test-only packages: nothing but their own features may need them (the vLLM and
SGLang integrations need their engine and torch, and are left out of the check)."""


def test_importing_packages_does_not_import_heavy_dependencies():
    """Users without a GPU stack (or with their own vLLM) must be able to import us cheaply."""
    modules = list(PACKAGES) + ["transfer.config", "transfer.rpc", "transfer.metadata",
                                "transfer.testing", "mooncake_connector.testing"]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"print(sorted(h for h in {HEAVY!r} if h in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_everything_but_the_extras_imports_without_them():
    """``pip install .`` without extras and without vLLM: the store, its master and node, the
    proxy and the simulator still import (optional packages are loaded only when
    used). Found on the GPU test host, which has no aetcd: ``store.client`` pulled it in."""
    modules = ["store.client", "store.master.__main__", "store.node", "store.p2p.cli",
               "scheduler.proxy.cli", "scheduler.sim.__main__", "mooncake_connector.store_backend",
               "mooncake_connector.vllm.layout", "transfer.metadata.__main__"]
    code = (
        "import importlib, sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.partition('.')[0] in {OPTIONAL!r}:\n"
        "            raise ImportError(f'{name} is not installed (blocked by the test)')\n"
        "sys.meta_path.insert(0, Block())\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(ROOT)],
        check=True, capture_output=True,
    )
    (path,) = out.glob("mooncake_connector-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_holds_the_four_packages_and_license(wheel: zipfile.ZipFile):
    names = wheel.namelist()
    for pkg in PACKAGES:
        assert f"{pkg}/__init__.py" in names, pkg
    assert not any(n.startswith("tests/") for n in names)
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = wheel.read(metadata).decode()
    assert "Name: mooncake-connector" in text
    assert "Apache-2.0" in text
    for extra in ("vllm", "gpu", "rdma", "etcd", "sim", "test"):
        assert f"Provides-Extra: {extra}" in text, extra
    # Core dependencies stay small: nothing heavy is required by default.
    required = [line for line in text.splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert not any(h in line for line in required for h in HEAVY), required


def test_no_pickle_or_eval_in_product_code():
    """Network data is never unpickled or evaluated: scan every shipped module."""
    pattern = re.compile(r"\b(c?pickle|cloudpickle|dill)\.loads?\(|(^|[^.\w])eval\(|\bexec\(")
    offenders = []
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            for lineno, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line) and not line.lstrip().startswith("#"):
                    offenders.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert offenders == []
