"""Property-based fuzzing of RPC reply decoding: BlockingRpcClient and RpcClient against a
hostile server (garbage hellos and replies, wrong request ids, endless wrong-id answers, bodies of
the wrong type, malformed errors, oversized length prefixes, truncated frames, answers dripped
byte by byte, stalls). Every call ends with its answer or an RpcError within its timeouts."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from _fuzz_rpc_replies import Piece, ReplyCase, _good_hello, _encode, reply_cases, reply_harness

pytestmark = pytest.mark.timeout(90)
CI = settings(max_examples=100, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def harness():
    with reply_harness() as h:
        yield h


def test_clients_survive_hostile_replies(harness):
    harness.healthy()

    @CI
    @given(case=reply_cases)
    def attack(case):
        harness.check(case)

    attack()
    harness.healthy()


_ok = Piece("frame", frame_kind=1, body={"seq": 1, "payload": b"ok"})


@pytest.mark.parametrize("client", ["blocking", "async"])
@pytest.mark.parametrize("case", [
    ReplyCase([_good_hello], [Piece("drip", _encode(_ok, 1))], "close", ""),
    ReplyCase([Piece("drip", _encode(_good_hello, 0))], [], "stall", ""),
    ReplyCase([_good_hello], [Piece("frame", frame_kind=1, id_delta=1, repeat=2000)], "stall",
              ""),
    ReplyCase([_good_hello], [Piece("prefix", b"x", n=(1 << 32) - 1)], "stall", ""),
    ReplyCase([Piece("prefix", b"x", n=1 << 31)], [], "stall", ""),
], ids=["drip-reply", "drip-hello", "wrong-ids", "huge-reply-prefix", "huge-hello-prefix"])
def test_known_hostile_servers(harness, client, case):
    """A server dripping a valid answer, flooding wrong ids or announcing a 4 GiB frame must
    not stretch a call past its timeout (a dripped answer or hello used to, for the blocking
    client: its timeout applied to each receive, not to the call)."""
    case.client = client
    case.good_hello = case.hello == [_good_hello]
    harness.check(case)
