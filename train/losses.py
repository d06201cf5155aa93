"""Pairwise deep-hashing losses: HashNet and Deep Cauchy Hashing (DCH).

Contract shared by every loss in :data:`LOSSES`
------------------------------------------------
* Built from keyword hyper-parameters only (``LOSSES.get(name)(**hparams)`` or
  :func:`build_loss`); :meth:`HashLoss.hparams` returns them, plus ``"name"``, for
  the run manifest.
* Called as ``loss(h, S) -> scalar tensor`` where

  - ``h`` is float ``[B, K]``: the hash layer's **pre-activation** logits (the
    model never applies tanh itself while training; each loss applies its own
    activation, see :meth:`HashLoss.codes`), ``K`` = number of bits;
  - ``S`` is float ``[B, B]`` with entries in {0, 1}: ``S[i, j] = 1`` when item
    ``i`` and item ``j`` are similar. Build it with :func:`similarity`.

* Pairs are the off-diagonal entries ``i != j`` of the batch against itself. The
  diagonal is **excluded**: a code compared with itself carries no supervision
  (it is always "similar" and always at distance 0), and keeping it would only
  dilute the similar-pair weight. A batch with a single item therefore has no
  pairs and the pairwise term is 0.
* Similar and dissimilar pairs are re-weighted so that each group contributes
  half of the pairwise term (HashNet's weighted maximum likelihood, reused by
  DCH)::

      w_ij = |P| / |P_1|  if s_ij = 1        |P|   all pairs (i != j)
      w_ij = |P| / |P_0|  if s_ij = 0        |P_1| similar pairs, |P_0| dissimilar

      L = sum_ij w_ij l_ij / sum_ij w_ij

  When a batch has no similar (or no dissimilar) pairs the empty group simply
  gets no weight (the counts are clamped to 1, never divided by 0), so ``L`` is
  then the plain mean over the group that exists.
* Schedules are counted in training iterations. The training loop calls
  :meth:`HashLoss.advance` once per optimizer step (or :meth:`HashLoss.step`
  with an absolute iteration, e.g. on resume). The iteration counter is part of
  ``state_dict()`` (via ``get_extra_state``), so checkpoints resume schedules.
* At export / retrieval time the model uses plain ``tanh(h)`` (then ``sign``),
  whatever loss trained it.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hashret.errors import BadInput
from hashret.registry import Registry

__all__ = ["LOSSES", "HashLoss", "HashNetLoss", "DCHLoss", "similarity", "build_loss"]

LOSSES: Registry[type["HashLoss"]] = Registry("loss")


# --------------------------------------------------------------------------- helpers
def similarity(labels_a: torch.Tensor, labels_b: torch.Tensor | None = None) -> torch.Tensor:
    """Pairwise similarity matrix ``S`` (float, values in {0, 1}).

    * int class ids ``[B]`` / ``[M]``: ``S[i, j] = 1`` iff ``a_i == b_j``;
    * multi-hot ``[B, C]`` / ``[M, C]``: ``S[i, j] = 1`` iff ``a_i`` and ``b_j``
      share at least one label (``<a_i, b_j> > 0``).

    ``labels_b`` defaults to ``labels_a`` (a batch against itself, ``[B, B]``).
    """
    if labels_b is None:
        labels_b = labels_a
    if labels_a.dim() != labels_b.dim() or labels_a.dim() not in (1, 2):
        raise BadInput(
            f"labels | shapes {tuple(labels_a.shape)} and {tuple(labels_b.shape)} differ in kind: "
            "pass int class ids [B] or multi-hot [B, C] for both"
        )
    if labels_a.dim() == 1:
        return (labels_a[:, None] == labels_b[None, :]).float()
    if labels_a.shape[1] != labels_b.shape[1]:
        raise BadInput(
            f"labels | multi-hot widths {labels_a.shape[1]} and {labels_b.shape[1]} differ: "
            "use the same class list for both"
        )
    return ((labels_a.float() @ labels_b.float().t()) > 0).float()


def _check_inputs(h: torch.Tensor, S: torch.Tensor) -> None:
    if h.dim() != 2:
        raise BadInput(f"hash logits | expected [B, bits], got shape {tuple(h.shape)}: flatten the hash head output")
    b = h.shape[0]
    if tuple(S.shape) != (b, b):
        raise BadInput(
            f"similarity | expected [{b}, {b}] for a batch of {b}, got {tuple(S.shape)}: "
            "build it with similarity(labels)"
        )


def _pair_weights(S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced weights ``w_ij`` over off-diagonal pairs and the pair mask.

    Returns ``(w, mask)``; ``w`` is 0 on the diagonal.
    """
    b = S.shape[0]
    mask = ~torch.eye(b, dtype=torch.bool, device=S.device)
    s = S.to(torch.float32)
    maskf = mask.to(s.dtype)
    n_all = maskf.sum()
    n_sim = (s * maskf).sum()
    n_dis = n_all - n_sim
    w_sim = n_all / n_sim.clamp(min=1.0)
    w_dis = n_all / n_dis.clamp(min=1.0)
    w = (s * w_sim + (1.0 - s) * w_dis) * maskf
    return w, mask


def _weighted_mean(l: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # total is 0 (a batch of one: no pairs, result 0 with the graph kept) or >= 2.
    total = w.sum().clamp(min=1.0)
    return (l * w.to(l.dtype)).sum() / total.to(l.dtype)


def _hamming(zi: torch.Tensor, zj: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Normalized (continuous) Hamming distance ``d = K/2 * (1 - cos(z_i, z_j))``, ``[B, M]``.

    For ±1 codes ``<b_i, b_j> = K cos`` and Hamming = ``(K - <b_i, b_j>)/2``, so
    ``d`` equals the Hamming distance exactly on binary codes.
    """
    k = zi.shape[1]
    cos = F.normalize(zi, dim=1, eps=eps) @ F.normalize(zj, dim=1, eps=eps).t()
    return (0.5 * k * (1.0 - cos)).clamp(min=0.0)


# --------------------------------------------------------------------------- base
class HashLoss(nn.Module):
    """Base of the hashing losses: iteration counter, hparams, training activation."""

    name = "base"

    def __init__(self) -> None:
        super().__init__()
        self._iteration = 0

    # -- schedule state
    @property
    def iteration(self) -> int:
        return self._iteration

    def advance(self, n: int = 1) -> None:
        """Advance the schedule by ``n`` iterations (call once per optimizer step)."""
        if n < 0:
            raise BadInput(f"loss schedule | advance({n}) is negative: pass n >= 0")
        self._iteration += int(n)

    def step(self, iteration: int) -> None:
        """Set the schedule to an absolute iteration (e.g. when resuming)."""
        if iteration < 0:
            raise BadInput(f"loss schedule | iteration {iteration} is negative: pass a count >= 0")
        self._iteration = int(iteration)

    def get_extra_state(self) -> dict[str, Any]:
        return {"iteration": self._iteration}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._iteration = int(state.get("iteration", 0))

    # -- description
    def hparams(self) -> dict[str, Any]:
        raise NotImplementedError

    def codes(self, h: torch.Tensor) -> torch.Tensor:
        """The continuous codes this loss trains at the current schedule point."""
        return torch.tanh(h)


# --------------------------------------------------------------------------- HashNet
@LOSSES.register("hashnet")
class HashNetLoss(HashLoss):
    r"""HashNet: weighted pairwise log-likelihood with tanh continuation.

    Cao, Long, Wang, Yu, "HashNet: Deep Learning to Hash by Continuation",
    ICCV 2017 (arXiv:1702.00758).

    Codes (continuation)::

        z_i = tanh(beta_t * h_i)
        beta_t = beta_init * (1 + beta_gamma * t')^beta_power,
        t' = beta_step * floor(t / beta_step)

    ``t`` is the iteration counter (:meth:`advance` once per step). ``beta`` is
    piecewise constant over blocks of ``beta_step`` iterations and grows without
    bound, so ``tanh(beta h) -> sign(h)`` as training proceeds. Defaults
    (``beta_init=1, beta_gamma=0.005, beta_power=0.5, beta_step=1``) give
    ``beta = sqrt(1 + 0.005 t)``: 1 at start, ~3.2 after 2k steps, ~7.1 after 10k.

    Pairwise term, with inner product ``ip_ij = <z_i, z_j>`` and sigmoid slope
    ``alpha`` (``p(s_ij=1) = sigmoid(alpha * ip_ij)``)::

        l_ij = log(1 + exp(alpha ip_ij)) - alpha s_ij ip_ij      (= -log-likelihood)
        L    = sum_{i != j} w_ij l_ij / sum_{i != j} w_ij

    with the balanced weights of the module docstring. ``log(1 + exp(x))`` is
    computed with a stable softplus (no overflow, no linear cut-off needed).

    ``alpha`` defaults to ``10 / K`` (K = bits, read from ``h``): ``|ip| <= K``, so
    ``alpha * ip`` spans [-10, 10] for every code length, which keeps the sigmoid
    neither flat nor saturated for K = 16..64.

    Parameters
    ----------
    alpha: float | None = None
        Sigmoid slope; ``None`` means ``10 / bits``.
    beta_init: float = 1.0
    beta_gamma: float = 0.005
    beta_power: float = 0.5
    beta_step: int = 1
        Iterations per beta update.
    """

    name = "hashnet"

    def __init__(
        self,
        alpha: float | None = None,
        beta_init: float = 1.0,
        beta_gamma: float = 0.005,
        beta_power: float = 0.5,
        beta_step: int = 1,
    ) -> None:
        super().__init__()
        if alpha is not None and not alpha > 0:
            raise BadInput(f"hashnet alpha | {alpha} is not positive: pass alpha > 0 or None for 10/bits")
        if not beta_init > 0:
            raise BadInput(f"hashnet beta_init | {beta_init} is not positive: pass beta_init > 0")
        if beta_gamma < 0 or beta_power < 0:
            raise BadInput(
                f"hashnet schedule | beta_gamma={beta_gamma}, beta_power={beta_power}: both must be >= 0"
            )
        if int(beta_step) != beta_step or beta_step < 1:
            raise BadInput(f"hashnet beta_step | {beta_step} is not a positive integer: pass beta_step >= 1")
        self.alpha = None if alpha is None else float(alpha)
        self.beta_init = float(beta_init)
        self.beta_gamma = float(beta_gamma)
        self.beta_power = float(beta_power)
        self.beta_step = int(beta_step)

    @property
    def beta(self) -> float:
        t = self.beta_step * (self._iteration // self.beta_step)
        return self.beta_init * (1.0 + self.beta_gamma * t) ** self.beta_power

    def hparams(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "alpha": self.alpha,  # None = 10/bits
            "beta_init": self.beta_init,
            "beta_gamma": self.beta_gamma,
            "beta_power": self.beta_power,
            "beta_step": self.beta_step,
        }

    def codes(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.beta * h)

    def forward(self, h: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
        _check_inputs(h, S)
        k = h.shape[1]
        alpha = self.alpha if self.alpha is not None else 10.0 / k
        z = self.codes(h)
        ip = alpha * (z @ z.t())
        s = S.to(ip.dtype)
        l = F.softplus(ip) - s * ip
        w, _ = _pair_weights(S)
        return _weighted_mean(l, w)


# --------------------------------------------------------------------------- DCH
@LOSSES.register("dch")
class DCHLoss(HashLoss):
    r"""Deep Cauchy Hashing: Cauchy cross-entropy + Cauchy quantization loss.

    Cao, Long, Liu, Wang, "Deep Cauchy Hashing for Hamming Space Retrieval",
    CVPR 2018.

    Codes ``z_i = tanh(h_i)`` (no continuation; :meth:`advance` only counts).
    Distance: the normalized Hamming distance
    ``d_ij = K/2 * (1 - cos(z_i, z_j))`` (exact Hamming distance on ±1 codes).

    Cauchy probability ``p(s_ij = 1) = gamma / (gamma + d_ij)``; the Cauchy
    cross-entropy ``-[s log p + (1 - s) log(1 - p)]`` simplifies to::

        l_ij = s_ij log(d_ij / gamma) + log(1 + gamma / d_ij)
             = s_ij log(1 + d_ij / gamma) + (1 - s_ij) log(1 + gamma / d_ij)

    (the second, equal form is what is computed: a similar pair never takes
    ``log(d)``). For dissimilar pairs ``d_ij`` is replaced by ``d_ij + eps`` so
    identical codes (``d = 0``) give a large but finite loss and gradient.
    ``L = sum_{i != j} w_ij l_ij / sum_{i != j} w_ij`` with balanced weights.

    Cauchy quantization, pulling ``|z_i|`` towards the all-ones vector::

        q_i = log(1 + d(|z_i|, 1) / gamma),   d(|z_i|, 1) = K/2 (1 - cos(|z_i|, 1))
        Q   = mean_i q_i

    Total: ``L + quant_weight * Q``.

    ``gamma`` is the Cauchy scale: ``p`` drops to 1/2 at Hamming distance
    ``gamma``, so a smaller ``gamma`` concentrates similar pairs within a
    smaller Hamming radius (sharper, more Hamming-ball-friendly codes) at the
    cost of harder optimization. The default 20 is the paper's value.

    Parameters
    ----------
    gamma: float = 20.0
    quant_weight: float = 0.1
        ``lambda`` of the paper.
    eps: float = 1e-4
        Added to ``d`` in the dissimilar-pair term.
    """

    name = "dch"

    def __init__(self, gamma: float = 20.0, quant_weight: float = 0.1, eps: float = 1e-4) -> None:
        super().__init__()
        if not gamma > 0:
            raise BadInput(f"dch gamma | {gamma} is not positive: pass gamma > 0 (paper: 20)")
        if quant_weight < 0:
            raise BadInput(f"dch quant_weight | {quant_weight} is negative: pass quant_weight >= 0")
        if not eps > 0:
            raise BadInput(f"dch eps | {eps} is not positive: pass a small eps > 0 such as 1e-4")
        self.gamma = float(gamma)
        self.quant_weight = float(quant_weight)
        self.eps = float(eps)

    def hparams(self) -> dict[str, Any]:
        return {"name": self.name, "gamma": self.gamma, "quant_weight": self.quant_weight, "eps": self.eps}

    def forward(self, h: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
        _check_inputs(h, S)
        z = self.codes(h)
        g = self.gamma
        d = _hamming(z, z)
        s = S.to(d.dtype)
        l_sim = torch.log1p(d / g)
        l_dis = torch.log1p(g / (d + self.eps))
        l = s * l_sim + (1.0 - s) * l_dis
        w, _ = _pair_weights(S)
        pair = _weighted_mean(l, w)
        if self.quant_weight == 0.0:
            return pair
        ones = torch.ones(1, z.shape[1], dtype=z.dtype, device=z.device)
        dq = _hamming(z.abs(), ones).squeeze(1)
        quant = torch.log1p(dq / g).mean()
        return pair + self.quant_weight * quant


def build_loss(name: str, **hparams: Any) -> HashLoss:
    """``LOSSES.get(name)(**hparams)``, turning an unknown hyper-parameter into BadInput."""
    cls = LOSSES.get(name)
    try:
        return cls(**hparams)
    except TypeError as e:
        raise BadInput(f"loss {name!r} | bad hyper-parameters {sorted(hparams)}: {e}") from None
