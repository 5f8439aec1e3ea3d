"""Time models the Conductor predicts with: prefill, KV transfer, decode step.

Defaults are the paper's dummy LLaMA3-70B on 8xA800 (arXiv 2407.00079 v3, Fig. 14 fit):
``T(n, p) = 1.16e-4 (n - p) + 7.1e-10 (n^2 - p^2)`` seconds to prefill ``n`` tokens of which ``p``
are cached, and 320 KB of KV cache per token. The prefill model is refitted online from observed
prefills (ridge least squares pulled toward the prior), because the proxy's engines are never
exactly the paper's: the prior makes the first decisions sensible, observations make later ones
right.
"""
from __future__ import annotations

from dataclasses import dataclass

from .types import ConductorError

# Feature scales keep the 2x2 normal equations well conditioned (n ~ 1e4 tokens).
_S1 = 1e4
_S2 = 1e8


class PrefillModel:
    """Prefill seconds as ``a (n - p) + b (n^2 - p^2)``, fitted online with a prior.

    Minimises ``sum_i f^i (y_i - x_i.w)^2 + prior_weight * |w - w0|^2`` in scaled feature space,
    where ``f`` is the forgetting factor (1.0 keeps every observation forever; below 1.0 lets the
    model follow an engine whose speed drifts). ``prior_weight`` is in units of observations of
    a ~10k-token prefill, so 8.0 means "the prior is worth about eight such prefills".
    """

    def __init__(
        self,
        linear: float = 1.16e-4,
        quadratic: float = 7.1e-10,
        prior_weight: float = 8.0,
        forgetting: float = 1.0,
    ) -> None:
        if linear < 0 or quadratic < 0:
            raise ConductorError("prefill model coefficients must be >= 0")
        if prior_weight <= 0:
            raise ConductorError("prior_weight must be > 0 (it keeps the fit well posed)")
        if not 0 < forgetting <= 1:
            raise ConductorError("forgetting must be in (0, 1]")
        self.prior = (linear * _S1, quadratic * _S2)
        self.prior_weight = prior_weight
        self.forgetting = forgetting
        self._xx = [0.0, 0.0, 0.0]  # sums of x1*x1, x1*x2, x2*x2
        self._xy = [0.0, 0.0]
        self.observations = 0
        self._w = self.prior

    @property
    def coefficients(self) -> tuple[float, float]:
        """The current (linear, quadratic) coefficients in seconds per token / token^2."""
        return self._w[0] / _S1, self._w[1] / _S2

    def predict(self, n: int, p: int = 0) -> float:
        """Seconds to prefill ``n`` tokens when the first ``p`` are already cached."""
        p = min(max(p, 0), n)
        w1, w2 = self._w
        return max(0.0, w1 * (n - p) / _S1 + w2 * (n * n - p * p) / _S2)

    def observe(self, n: int, p: int, seconds: float) -> None:
        """Fold one measured prefill into the fit. Non-finite or negative times are ignored."""
        if not (seconds >= 0.0 and seconds < float("inf")) or n <= 0:
            return
        p = min(max(p, 0), n)
        x1 = (n - p) / _S1
        x2 = (n * n - p * p) / _S2
        if x1 == 0 and x2 == 0:
            return
        f = self.forgetting
        xx, xy = self._xx, self._xy
        xx[0] = f * xx[0] + x1 * x1
        xx[1] = f * xx[1] + x1 * x2
        xx[2] = f * xx[2] + x2 * x2
        xy[0] = f * xy[0] + x1 * seconds
        xy[1] = f * xy[1] + x2 * seconds
        self.observations += 1
        self._solve()

    def _solve(self) -> None:
        lam = self.prior_weight
        a11, a12, a22 = self._xx[0] + lam, self._xx[1], self._xx[2] + lam
        b1 = self._xy[0] + lam * self.prior[0]
        b2 = self._xy[1] + lam * self.prior[1]
        det = a11 * a22 - a12 * a12
        w1 = (a22 * b1 - a12 * b2) / det
        w2 = (a11 * b2 - a12 * b1) / det
        if w1 < 0 or w2 < 0:
            # A negative coefficient would predict negative time for some shapes; refit the other
            # coefficient alone (the constrained optimum lies on that boundary).
            if w1 < 0:
                w1, w2 = 0.0, max(0.0, b2 / a22)
            else:
                w1, w2 = max(0.0, b1 / a11), 0.0
        self._w = (w1, w2)


@dataclass(frozen=True, slots=True)
class TransferModel:
    """Seconds to move KV blocks between instances: size / (sender bandwidth / senders) + latency.

    Sender congestion: a holder serving ``k`` transfers already gives each new one ``1/(k+1)`` of its
    bandwidth. That is pessimistic for a transfer that outlives the others, and it is the paper's
    reason for hot-spot replication: a popular holder becomes slow to fetch from.
    """

    kv_bytes_per_token: int = 327_680
    block_tokens: int = 512
    latency_s: float = 0.001

    def seconds(self, blocks: int, bandwidth_bytes_per_s: float, concurrent_sends: int = 0) -> float:
        if blocks <= 0:
            return 0.0
        nbytes = blocks * self.block_tokens * self.kv_bytes_per_token
        return self.latency_s + nbytes * (concurrent_sends + 1) / bandwidth_bytes_per_s


@dataclass(frozen=True, slots=True)
class DecodeModel:
    """Seconds per decode step for a batch: ``base + per_seq * batch + per_token * context``.

    Defaults model LLaMA3-70B on 8xA800: ~20 ms to stream the weights, and 320 KB of KV read per
    context token at ~16 TB/s aggregate HBM bandwidth (2e-8 s per token).
    """

    base_s: float = 0.020
    per_seq_s: float = 1e-4
    per_token_s: float = 2e-8

    def step_seconds(self, batch: int, context_tokens: int) -> float:
        if batch <= 0:
            return 0.0
        return self.base_s + self.per_seq_s * batch + self.per_token_s * context_tokens
