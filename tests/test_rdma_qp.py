"""QP attribute builders, MTU/GID/PSN choice and the handshake wire format (pure functions)."""
from __future__ import annotations

import random

import pytest
from hypothesis import given, strategies as st

from transfer.transports.rdma.handshake import (
    HANDSHAKE_VERSION,
    Handshake,
    HandshakeError,
    NicInfo,
    QpInfo,
    parse_handshake,
    parse_nic_info,
    parse_peer_entry,
)
from transfer.transports.rdma.qp import (
    GidEntry,
    RemoteQp,
    choose_gid_index,
    choose_mtu,
    init_transition,
    mtu_from_enum,
    mtu_to_enum,
    new_psn,
    rtr_transition,
    rts_transition,
)

ROCE_GID = "0000:0000:0000:0000:0000:ffff:c0a8:0102"
LINK_LOCAL = "fe80:0000:0000:0000:0202:c9ff:fe00:0001"


def test_init_transition() -> None:
    t = init_transition(port_num=2)
    assert t.state == "IBV_QPS_INIT"
    assert t.attrs["port_num"] == 2 and t.attrs["pkey_index"] == 0
    assert set(t.attrs["qp_access_flags"]) == {"IBV_ACCESS_LOCAL_WRITE", "IBV_ACCESS_REMOTE_READ",
                                               "IBV_ACCESS_REMOTE_WRITE"}
    assert t.mask == {"IBV_QP_STATE", "IBV_QP_PKEY_INDEX", "IBV_QP_PORT", "IBV_QP_ACCESS_FLAGS"}


def test_rtr_roce_is_global_and_uses_smallest_mtu() -> None:
    t = rtr_transition(RemoteQp(qp_num=0x1234, psn=77, lid=0, gid=ROCE_GID, mtu=1024),
                       port_num=1, sgid_index=3, local_mtu=4096, link_layer="Ethernet")
    assert t.state == "IBV_QPS_RTR"
    assert t.attrs["dest_qp_num"] == 0x1234 and t.attrs["rq_psn"] == 77
    assert t.attrs["path_mtu"] == mtu_to_enum(1024) == 3
    assert t.ah == {"dlid": 0, "sl": 0, "port_num": 1, "is_global": 1, "dgid": ROCE_GID,
                    "sgid_index": 3, "hop_limit": 64, "traffic_class": 0, "flow_label": 0}
    assert {"IBV_QP_AV", "IBV_QP_PATH_MTU", "IBV_QP_DEST_QPN", "IBV_QP_RQ_PSN",
            "IBV_QP_MAX_DEST_RD_ATOMIC", "IBV_QP_MIN_RNR_TIMER", "IBV_QP_STATE"} == t.mask


def test_rtr_infiniband_uses_lid() -> None:
    zero = "0000:0000:0000:0000:0000:0000:0000:0000"
    t = rtr_transition(RemoteQp(5, 0, lid=17, gid=zero, mtu=4096), port_num=1, sgid_index=0,
                       local_mtu=2048, link_layer="InfiniBand", mtu_cap=4096)
    assert t.ah == {"dlid": 17, "sl": 0, "port_num": 1, "is_global": 0}
    assert t.attrs["path_mtu"] == mtu_to_enum(2048)
    t = rtr_transition(RemoteQp(5, 0, lid=17, gid=LINK_LOCAL, mtu=4096), port_num=1,
                       sgid_index=0, local_mtu=4096, link_layer="InfiniBand")
    assert t.ah is not None and t.ah["is_global"] == 1 and t.ah["dlid"] == 17


@pytest.mark.parametrize("remote, link", [
    (RemoteQp(0, 0, 0, ROCE_GID, 1024), "Ethernet"),              # qp_num 0 is reserved
    (RemoteQp(1 << 24, 0, 0, ROCE_GID, 1024), "Ethernet"),
    (RemoteQp(1, 1 << 24, 0, ROCE_GID, 1024), "Ethernet"),
    (RemoteQp(1, 0, 0, "not-a-gid", 1024), "Ethernet"),
    (RemoteQp(1, 0, 0, "::", 1024), "Ethernet"),                  # RoCE needs a GID
    (RemoteQp(1, 0, 0, "::", 1024), "InfiniBand"),                # IB needs a LID or GID
    (RemoteQp(1, 0, 0, ROCE_GID, 1500), "Ethernet"),              # not an IB MTU
])
def test_rtr_rejects_bad_remote(remote: RemoteQp, link: str) -> None:
    with pytest.raises(ValueError):
        rtr_transition(remote, port_num=1, sgid_index=0, local_mtu=4096, link_layer=link)


def test_rts_transition() -> None:
    t = rts_transition(0xABCDEF, max_rd_atomic=8)
    assert t.attrs == {"sq_psn": 0xABCDEF, "timeout": 14, "retry_cnt": 7, "rnr_retry": 7,
                       "max_rd_atomic": 8}
    assert "IBV_QP_SQ_PSN" in t.mask and "IBV_QP_MAX_QP_RD_ATOMIC" in t.mask
    for kwargs in ({"timeout": 32}, {"retry_cnt": 8}, {"rnr_retry": -1}):
        with pytest.raises(ValueError):
            rts_transition(1, **kwargs)
    with pytest.raises(ValueError):
        rts_transition(1 << 24)


def test_mtu_helpers() -> None:
    assert [mtu_from_enum(i) for i in range(1, 6)] == [256, 512, 1024, 2048, 4096]
    assert choose_mtu(4096, 2048) == 2048 and choose_mtu(4096, 4096, cap=1024) == 1024
    for bad in (0, 1500, 9000):
        with pytest.raises(ValueError):
            mtu_to_enum(bad)
    with pytest.raises(ValueError):
        mtu_from_enum(6)


def test_psn_is_24_bit_and_random() -> None:
    rng = random.Random(1)
    psns = {new_psn(rng) for _ in range(200)}
    assert all(0 <= p < 1 << 24 for p in psns) and len(psns) > 190
    assert 0 <= new_psn() < 1 << 24


def test_gid_index_choice() -> None:
    table = [
        GidEntry(0, LINK_LOCAL, "RoCE v1"),
        GidEntry(1, LINK_LOCAL, "RoCE v2"),
        GidEntry(2, "0000:0000:0000:0000:0000:ffff:c0a8:0102", "RoCE v1"),
        GidEntry(3, "0000:0000:0000:0000:0000:ffff:c0a8:0102", "RoCE v2"),
        GidEntry(4, "::", "RoCE v2"),
    ]
    assert choose_gid_index(table, "Ethernet") == 3
    assert choose_gid_index(table[:3], "Ethernet") == 1  # v2 link-local beats v1 mapped
    assert choose_gid_index(table[:1], "Ethernet") == 0
    global_v6 = GidEntry(7, "2001:0db8:0000:0000:0000:0000:0000:0001", "RoCE v2")
    assert choose_gid_index(table[:2] + [global_v6], "Ethernet") == 7
    assert choose_gid_index([GidEntry(0, LINK_LOCAL, "IB")], "InfiniBand") == 0
    assert choose_gid_index(table, "Ethernet", configured=2) == 2
    with pytest.raises(ValueError, match="configured GID index 4"):
        choose_gid_index(table, "Ethernet", configured=4)  # a zero GID
    with pytest.raises(ValueError, match="no usable GID"):
        choose_gid_index([GidEntry(0, "::", "IB"), GidEntry(1, "zz", "IB")], "InfiniBand")


def nic_dict(name: str = "mlx5_0") -> dict:
    return NicInfo(name, 1, 0, ROCE_GID, 3, 4096, "Ethernet").to_dict()


def test_nic_info_round_trip_and_validation() -> None:
    assert parse_nic_info(nic_dict()) == NicInfo("mlx5_0", 1, 0, ROCE_GID, 3, 4096, "Ethernet")
    bad_values = {"port": 0, "lid": 1 << 16, "gid": "1.2.3.4", "mtu": 1500, "gid_index": True,
                  "link_layer": "Wifi", "name": ""}
    for key, value in bad_values.items():
        entry = nic_dict() | {key: value}
        with pytest.raises(HandshakeError, match=key):
            parse_nic_info(entry)
    entry = nic_dict()
    del entry["gid"]
    with pytest.raises(HandshakeError, match="missing field 'gid'"):
        parse_nic_info(entry)


def test_peer_entry() -> None:
    entry = {"nics": [nic_dict("a"), nic_dict("b")],
             "topology": {"cpu:0": [["b", "ghost"], ["a", "b"]], "cuda:0": [[], ["a"]]}}
    nics, order = parse_peer_entry(entry)
    assert list(nics) == ["a", "b"]
    assert order == {"cpu:0": [["b"], ["a"]], "cuda:0": [["a"]]}
    with pytest.raises(HandshakeError, match="duplicate"):
        parse_peer_entry({"nics": [nic_dict("a"), nic_dict("a")]})
    with pytest.raises(HandshakeError, match="at most"):
        parse_peer_entry({"nics": [nic_dict(f"n{i}") for i in range(65)]})
    with pytest.raises(HandshakeError):
        parse_peer_entry({"nics": "mlx5_0"})
    with pytest.raises(HandshakeError):
        parse_peer_entry([])


def test_handshake_round_trip() -> None:
    hs = Handshake("host:1234", (QpInfo("a", "b", 10, 20, 0, ROCE_GID, 4096),
                                 QpInfo("a", "c", 11, 21, 0, ROCE_GID, 1024)))
    wire = hs.to_dict()
    assert wire["version"] == HANDSHAKE_VERSION
    assert parse_handshake(wire) == hs


@pytest.mark.parametrize("mutate, match", [
    (lambda m: m.update(version=2), "version"),
    (lambda m: m.update(peer=7), "peer"),
    (lambda m: m.update(qps={}), "list"),
    (lambda m: m["qps"].append(dict(m["qps"][0])), "duplicate"),
    (lambda m: m["qps"][0].update(qp_num=0), "qp_num"),
    (lambda m: m["qps"][0].update(psn=-1), "psn"),
    (lambda m: m["qps"][0].update(local_nic="x\n"), "local_nic"),
    (lambda m: m["qps"][0].pop("remote_nic"), "remote_nic"),
    (lambda m: m.update(qps=[{"local_nic": "a"}] * 5000), "at most"),
])
def test_handshake_rejects(mutate, match: str) -> None:
    msg = Handshake("p", (QpInfo("a", "b", 10, 20, 0, ROCE_GID, 4096),)).to_dict()
    mutate(msg)
    with pytest.raises(HandshakeError, match=match):
        parse_handshake(msg)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=4),
    max_leaves=20)


@given(st.dictionaries(st.sampled_from(["version", "peer", "qps", "x"]), json_values))
def test_handshake_fuzz_only_raises_handshake_error(msg: dict) -> None:
    try:
        parse_handshake(msg)
    except HandshakeError:
        pass


@given(json_values)
def test_peer_entry_fuzz_only_raises_handshake_error(entry: object) -> None:
    try:
        parse_peer_entry(entry)
    except HandshakeError:
        pass


def _python_with_pyverbs() -> str | None:
    import shutil
    import subprocess
    import sys

    for exe in (sys.executable, shutil.which("python3"), "/usr/bin/python3"):
        if exe and subprocess.run([exe, "-c", "import pyverbs.qp"], capture_output=True,
                                  timeout=30).returncode == 0:
            return exe
    return None


def test_transitions_translate_to_real_pyverbs_objects() -> None:
    """The builders' names must exist in pyverbs and give the verbs masks (no NIC needed:
    QPAttr/AHAttr/GlobalRoute/SendWR are plain structs; only modify/post_send are recorded)."""
    import subprocess
    from pathlib import Path

    exe = _python_with_pyverbs()
    if exe is None:
        pytest.skip("no Python with pyverbs (apt-get install python3-pyverbs)")
    code = f"""
import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from transfer.transports.rdma import verbs, qp as Q
from transfer.transports.base import Opcode
v = verbs.load_pyverbs()
seen = []
class Recorder:
    def modify(self, attr, mask): seen.append((int(attr.qp_state), mask, attr))
    def post_send(self, wr, bad): seen.append(("post", int(wr.opcode), wr.wr_id))
q = verbs.PyverbsQueuePair.__new__(verbs.PyverbsQueuePair)
q._v, q._qp, q.qp_num = v, Recorder(), 5
q._apply(Q.init_transition(1))
gid = "0000:0000:0000:0000:0000:ffff:0a00:0001"
q.connect(Q.rtr_transition(Q.RemoteQp(9, 10, 0, gid, 4096), port_num=1, sgid_index=3,
                           local_mtu=1024, link_layer="Ethernet"), Q.rts_transition(77))
q.post(1, Opcode.WRITE, 0x1000, 64, 3, 0x2000, 4)
q.post(2, Opcode.READ, 0x1000, 64, 3, 0x2000, 4)
(s1, m1, a1), (s2, m2, a2), (s3, m3, a3) = seen[:3]
assert (s1, m1, a1.port_num, a1.qp_access_flags) == (1, 0x39, 1, 7), (s1, hex(m1))
assert (s2, m2, a2.path_mtu, a2.dest_qp_num, a2.rq_psn) == (2, 0x129181, 3, 9, 10), hex(m2)
assert (a2.ah_attr.dgid, a2.ah_attr.sgid_index, a2.ah_attr.is_global) == (gid, 3, 1)
assert (s3, m3, a3.sq_psn, a3.timeout) == (3, 0x12e01, 77, 14), hex(m3)
assert seen[3:] == [("post", int(v.e.IBV_WR_RDMA_WRITE), 1), ("post", int(v.e.IBV_WR_RDMA_READ), 2)]
print("ok")
"""
    out = subprocess.run([exe, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
