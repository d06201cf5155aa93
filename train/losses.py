"""Deep-hashing losses: HashNet and Deep Cauchy Hashing (DCH), pairwise; CSQ, with hash centers.

Contract shared by every loss in :data:`LOSSES`
------------------------------------------------
* Built from keyword hyper-parameters only (``LOSSES.get(name)(**hparams)`` or
  :func:`build_loss`), each kept as an attribute of the same name, so that
  :meth:`HashLoss.hparams` returns them, plus ``"name"``, for the run manifest.
* Everything `hashret train` needs to know about a loss lives on its class:
  ``summary`` (its line in ``--method`` help), ``flags`` (the hyper-parameters
  it exposes as command-line flags, :class:`HParamFlag`) and ``train_defaults``
  (the training options it tunes, e.g. ``epochs`` and ``lr``). Adding a loss is
  one subclass plus ``@LOSSES.register(name)``; the CLI is derived from these.
* Called as ``loss(h, S) -> scalar tensor`` where

  - ``h`` is float ``[B, K]``: the hash layer's **pre-activation** logits (the
    model never applies tanh itself while training; each loss applies its own
    activation, see :meth:`HashLoss.codes`), ``K`` = number of bits;
  - ``S`` is float ``[B, B]`` with entries in {0, 1}: ``S[i, j] = 1`` when item
    ``i`` and item ``j`` are similar. Build it with :func:`similarity`.

  A loss that needs each sample's own classes rather than pairs (CSQ: one target
  code per class) sets ``wants_labels = True`` and is called as
  ``loss(h, labels)`` instead, ``labels`` being int class ids ``[B]`` or
  multi-hot ``[B, C]``. The training loop calls :meth:`HashLoss.batch_loss`
  ``(h, labels)``, which passes whichever of the two the loss asked for, so it
  never needs to know which kind of loss it runs.
* Before the first step the training loop calls :meth:`HashLoss.setup` once with
  every training label, the code length and the run's seed: a loss that builds
  something from them (CSQ's centers) does it there, deterministically, so every
  DDP rank builds the same thing. ``setup`` returns what it decided, which the run
  manifest keeps under ``method``; arrays the run folder should keep come from
  :meth:`HashLoss.run_files`. Pairwise losses inherit the no-op defaults.
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

import inspect
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hashret.errors import BadInput
from hashret.registry import Registry

__all__ = [
    "LOSSES",
    "CSQLoss",
    "DCHLoss",
    "HParamFlag",
    "HashLoss",
    "HashNetLoss",
    "build_loss",
    "hadamard",
    "hash_centers",
    "similarity",
]

LOSSES: Registry[type[HashLoss]] = Registry("loss")
log = logging.getLogger("hashret.train")


@dataclass(frozen=True)
class HParamFlag:
    """A loss hyper-parameter offered on `hashret train` as ``--name-with-dashes``.

    ``name`` is the loss's keyword argument and the argparse dest. ``default`` is what
    `hashret train` passes when the flag is left out; ``None`` passes nothing, so the
    loss's own keyword default applies (a CLI default may differ from the paper's value
    the class keeps, as HashNet's ``beta_gamma`` does). ``default_text`` is how the help
    shows the default, ``{}`` standing for the value in effect.
    """

    name: str
    type: Callable[[str], Any]
    help: str
    default: Any = None
    default_text: str = "{}"

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


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


def _weighted_mean(loss: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # total is 0 (a batch of one: no pairs, result 0 with the graph kept) or >= 2.
    total = w.sum().clamp(min=1.0)
    return (loss * w.to(loss.dtype)).sum() / total.to(loss.dtype)


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
    """Base of the hashing losses: iteration counter, hparams, training activation, CLI description."""

    name: ClassVar[str] = "base"
    # what `hashret train` derives its --method help, hyper-parameter flags and defaults from
    summary: ClassVar[str] = ""
    flags: ClassVar[tuple[HParamFlag, ...]] = ()
    train_defaults: ClassVar[Mapping[str, Any]] = {}
    # True: forward takes (h, labels) instead of (h, S); see batch_loss
    wants_labels: ClassVar[bool] = False

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
        """``name`` plus every constructor keyword, read back from the attribute of the same name."""
        return {"name": self.name, **{k: getattr(self, k) for k in keyword_names(type(self))}}

    def codes(self, h: torch.Tensor) -> torch.Tensor:
        """The continuous codes this loss trains at the current schedule point."""
        return torch.tanh(h)

    # -- training-loop hooks
    def setup(self, labels: torch.Tensor, bits: int, seed: int) -> dict[str, Any]:
        """Prepare from the whole training set's labels before the first step (once per run).

        ``labels`` are int class ids ``[N]`` or multi-hot ``[N, C]``. Returns what was
        decided, as JSON values, for the run manifest's ``method`` (no key may repeat a
        hyper-parameter's). Pairwise losses have nothing to prepare.
        """
        return {}

    def run_files(self) -> dict[str, np.ndarray]:
        """Arrays the run folder keeps (file name -> array, written with ``np.save``)."""
        return {}

    def batch_loss(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss of one batch given its labels, in the form this loss takes (labels or ``S``)."""
        return self(h, labels) if self.wants_labels else self(h, similarity(labels))


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
    summary = "weighted pairwise likelihood with tanh(beta z) continuation"
    flags = (
        HParamFlag("alpha", float, "HashNet sigmoid slope", default_text="10/bits"),
        # The paper's continuation assumes end-to-end fine-tuning for many more steps; on a frozen
        # backbone with ~1,200 steps beta has to grow faster (to ~19 instead of ~2.8 by the end).
        HParamFlag("beta_gamma", float, "HashNet continuation growth rate", default=0.3),
        HParamFlag("beta_power", float, "HashNet continuation power"),
    )
    # tuned on Grocery frozen features (README, "Quality")
    train_defaults: ClassVar[Mapping[str, Any]] = {"epochs": 100, "lr": 3e-4}

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

    def codes(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.beta * h)

    def forward(self, h: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
        _check_inputs(h, S)
        k = h.shape[1]
        alpha = self.alpha if self.alpha is not None else 10.0 / k
        z = self.codes(h)
        ip = alpha * (z @ z.t())
        s = S.to(ip.dtype)
        loss = F.softplus(ip) - s * ip
        w, _ = _pair_weights(S)
        return _weighted_mean(loss, w)


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
    summary = "Deep Cauchy Hashing"
    flags = (
        HParamFlag("gamma", float, "DCH Cauchy scale", default_text="the loss's, {}"),
        HParamFlag("quant_weight", float, "DCH quantization loss weight lambda"),
    )
    train_defaults: ClassVar[Mapping[str, Any]] = {"epochs": 60, "lr": 1e-3}

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

    def forward(self, h: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
        _check_inputs(h, S)
        z = self.codes(h)
        g = self.gamma
        d = _hamming(z, z)
        s = S.to(d.dtype)
        l_sim = torch.log1p(d / g)
        l_dis = torch.log1p(g / (d + self.eps))
        loss = s * l_sim + (1.0 - s) * l_dis
        w, _ = _pair_weights(S)
        pair = _weighted_mean(loss, w)
        if self.quant_weight == 0.0:
            return pair
        ones = torch.ones(1, z.shape[1], dtype=z.dtype, device=z.device)
        dq = _hamming(z.abs(), ones).squeeze(1)
        quant = torch.log1p(dq / g).mean()
        return pair + self.quant_weight * quant


# --------------------------------------------------------------------------- CSQ
CENTER_DRAWS = 1024  # random candidates tried per center before giving up on a code length
_DRAW_BLOCK = 256  # most candidates checked together (one matrix product per block)


def hadamard(n: int) -> np.ndarray:
    """Sylvester's Hadamard matrix of order ``n`` (a power of 2), int8 ±1, with ``H H^T = n I``.

    Built by doubling, ``H_2m = [[H_m, H_m], [H_m, -H_m]]``, so that scipy is not needed; orders
    that are not powers of 2 (48, 96) have Hadamard matrices too, but not this construction.
    """
    if n < 1 or n & (n - 1):
        raise BadInput(f"hadamard order | {n} is not a power of 2: pass 1, 2, 4, 8, ...")
    H = np.ones((1, 1), dtype=np.int8)
    while len(H) < n:
        H = np.block([[H, H], [H, -H]])
    return H


def _pairwise_hamming(C: np.ndarray) -> np.ndarray:
    """Hamming distances between the rows of a ±1 matrix, ``(K - <c_i, c_j>) / 2``, ``[n, n]``."""
    c = C.astype(np.float32)  # BLAS speed; sums of ±1 stay exact in float32 far beyond any code length
    return ((C.shape[1] - c @ c.T) / 2).astype(np.int64)


def min_distance(C: np.ndarray) -> int | None:
    """Smallest Hamming distance between two different rows (None for fewer than two rows)."""
    if len(C) < 2:
        return None
    d = _pairwise_hamming(C)
    return int(d[~np.eye(len(C), dtype=bool)].min())


def max_codes(bits: int, d: int) -> int:
    """An upper bound on how many ``bits``-bit codes can be pairwise at Hamming distance ``>= d``.

    The sphere-packing (Hamming) bound ``2^K / sum_{i <= t} C(K, i)``, ``t = (d - 1) // 2``;
    for even ``d`` applied to ``A(K, d) = A(K - 1, d - 1)`` (drop one bit), which is exact
    for ``d = 2`` (``2^(K-1)``, the even-weight codes) and ``K = 16, d = 4`` (2048).
    """
    if d <= 1:
        return 2 ** bits
    if d % 2 == 0:
        bits, d = bits - 1, d - 1
    return 2 ** bits // sum(math.comb(bits, i) for i in range((d - 1) // 2 + 1))


def _hadamard_bits(n_classes: int, bits: int) -> int:
    """The shortest length ``p > bits``, a power of 2 (at least 8), with ``2 p >= n_classes``: Hadamard centers."""
    p = 8
    while 2 * p < n_classes or p <= bits:
        p *= 2
    return p


def _fix(n_classes: int, bits: int, seed: int, draws: int) -> str:
    """What to choose instead: the shortest longer length whose random centers fit, and the Hadamard one.

    A length is taken when ``n`` balls of radius ``d - 1`` cover at most half the code space (then
    every draw fits with probability >= 1/2: the Gilbert-Varshamov argument), or, for up to 2,000
    classes, when drawing the centers there succeeds; more classes would make that trial slow.
    """
    hadamard_bits = _hadamard_bits(n_classes, bits)
    for b in range(bits + 8, min(hadamard_bits, bits + 8 * 8), 8):  # a few lengths, no long search
        if n_classes > max_codes(b, b // 4):
            continue
        ball = sum(math.comb(b, i) for i in range(b // 4))
        fits = 2 * n_classes * ball <= 2 ** b
        if not fits and n_classes <= 2000:
            try:
                hash_centers(n_classes, b, seed, draws)
                fits = True
            except BadInput:
                pass
        if fits:
            return (f"choose --bits {b} (random centers fit) or --bits {hadamard_bits} "
                    "(Hadamard centers, distance bits/2)")
    return f"choose --bits {hadamard_bits} (Hadamard centers, distance bits/2)"


def hash_centers(n_classes: int, bits: int, seed: int = 0, draws: int = CENTER_DRAWS) -> tuple[np.ndarray, dict]:
    """One ±1 hash center per class, int8 ``[n_classes, bits]``, and how they were made.

    * ``2 * bits >= n_classes`` and ``bits`` a power of 2: the rows of the ``bits x bits``
      Hadamard matrix, then their negations (``[H; -H]``, first ``n_classes`` rows). Any two
      rows of ``H`` are orthogonal, so at Hamming distance exactly ``bits / 2``; a row and its
      negation are at ``bits``. This is the most separated set the CSQ paper uses.
    * Otherwise (too many classes, or a length such as 48 with no Sylvester matrix): random
      ±1 centers from ``seed``, each re-drawn (up to ``draws`` times) until it lies at Hamming
      distance ``>= bits / 4`` from every center drawn before it. Re-drawing one center at a
      time, not the whole set, is what makes many classes fit: for 81 classes in 16 bits a
      whole fresh set meets the bound with probability about ``e^-34``, while center by center
      it takes a few draws.

    The record says which construction ran and why, and the minimum pairwise distance got.
    Raises BadInput, naming a code length that works, when a center cannot be placed.
    """
    bits = int(bits)
    if n_classes < 1:
        raise BadInput(f"csq centers | {n_classes} classes: the training labels name no class")
    power_of_2 = bits & (bits - 1) == 0
    if power_of_2 and 2 * bits >= n_classes:
        H = hadamard(bits)
        C = np.concatenate([H, -H])[:n_classes]
        # known, not measured: rows of H are orthogonal (bits/2 apart), a row and its negation bits apart
        record = {"kind": "hadamard", "why": f"2 x {bits} bits >= {n_classes} classes",
                  "min_distance": bits // 2 if n_classes > 1 else None}
    else:
        need = bits // 4
        what = f"csq centers | {n_classes} classes in {bits} bits, pairwise Hamming distance >= {need} (bits/4)"
        bound = max_codes(bits, need)
        if n_classes > bound:  # no drawing can succeed: say so at once
            raise BadInput(f"{what}: impossible, at most {bound} codes are that far apart: "
                           f"{_fix(n_classes, bits, seed, draws)}")
        rng = np.random.default_rng(seed)
        C = np.empty((n_classes, bits), dtype=np.float32)  # float32 products of ±1 are exact here
        tried = 0
        for i in range(n_classes):
            # one candidate first (it usually fits), then doubling blocks: cheap for 10k classes
            left, block = draws, 1
            while left:
                block = min(block, left, _DRAW_BLOCK)
                cand = rng.integers(0, 2, size=(block, bits)).astype(np.float32) * 2 - 1
                far = ((bits - cand @ C[:i].T) / 2 >= need).all(axis=1) if i else np.ones(block, dtype=bool)
                if far.any():
                    first = int(far.argmax())
                    C[i] = cand[first]
                    tried += first + 1
                    break
                tried += block
                left -= block
                block *= 2
            else:
                raise BadInput(f"{what}: center {i + 1} found no place in {draws} random draws: "
                               f"{_fix(n_classes, bits, seed, draws)}")
        C = C.astype(np.int8)
        why = (f"{bits} bits is not a power of 2 (no Sylvester Hadamard matrix)" if not power_of_2
               else f"2 x {bits} bits < {n_classes} classes")
        record = {"kind": "random", "why": why, "seed": int(seed), "required_min_distance": need, "draws": tried}
        record["min_distance"] = min_distance(C)
    return C, {**record, "count": n_classes, "bits": bits}


@LOSSES.register("csq")
class CSQLoss(HashLoss):
    r"""Central Similarity Quantization: every class owns a fixed hash center; codes move to theirs.

    Yuan, Wang, Qiu, Li, Zhang, Li, Luo, Hu, Lin, Feng, "Central Similarity
    Quantization for Efficient Image and Video Retrieval", CVPR 2020
    (arXiv:1908.00347).

    :meth:`setup` builds the centers ``C`` (one ±1 row per class, :func:`hash_centers`)
    from the training labels before the first step. The target of sample ``i`` with
    label set ``Y_i`` (one class, or several for multi-hot labels) is::

        c_i = sign(sum_{y in Y_i} C_y),   sign(0) = +1

    Codes ``z_i = tanh(h_i)``. Central term: bitwise binary cross-entropy between the
    code and its center read as probabilities of a +1 bit::

        p_ik = (z_ik + 1) / 2,   t_ik = (c_ik + 1) / 2  in {0, 1}
        L_c  = -1/(B K) sum_ik [ t_ik log p_ik + (1 - t_ik) log(1 - p_ik) ]

    ``(tanh(x) + 1) / 2 = sigmoid(2x)``, so ``L_c`` is computed as a cross-entropy on the
    logits ``2 h``: saturated codes give a finite loss and gradient, never ``log 0``.
    Quantization, pulling every activation to ±1::

        Q = 1/(B K) sum_ik (|z_ik| - 1)^2

    Total: ``L_c + quant_weight * Q``.

    The loss is pointwise (``wants_labels``): each sample is pulled to its own center, so
    it needs no similar pair inside the batch, and two classes end as far apart as their
    centers, ``K/2`` bits for Hadamard centers.

    ``quant_weight`` defaults to 1e-4, DeepHash-pytorch's value for CSQ. It matters little
    here: ``L_c`` alone already drives ``|z|`` to 1 on every bit whose sign agrees with
    the center, so ``Q`` only adds pressure on the bits still on the wrong side. On Grocery
    (efficientnet-lite0, 64 bits, seed 0) 0, 1e-4, 1e-3, 1e-2 and 0.1 all gave mAP@all
    0.816-0.818 and mAP@10 0.781-0.782; the small default keeps ``Q`` from fighting ``L_c``
    on harder data, where a wrong bit should still be free to flip.

    Parameters
    ----------
    quant_weight: float = 1e-4
        ``lambda``, the weight of the quantization term.
    """

    name = "csq"
    summary = "Central Similarity Quantization, codes pulled to fixed per-class hash centers"
    flags = (
        HParamFlag("quant_weight", float, "quantization loss weight lambda (DCH: Cauchy term; CSQ: (|z|-1)^2 term)"),
    )
    # the trial in issue 10: Adam 1e-3 for 60 epochs on cached Grocery features, the same head
    train_defaults: ClassVar[Mapping[str, Any]] = {"epochs": 60, "lr": 1e-3}
    wants_labels = True

    def __init__(self, quant_weight: float = 1e-4) -> None:
        super().__init__()
        if not quant_weight >= 0:  # NaN too
            raise BadInput(f"csq quant_weight | {quant_weight} is not >= 0: pass a weight such as 1e-4")
        self.quant_weight = float(quant_weight)
        # rebuilt by setup from the labels and the seed, so not part of the state dict
        self.register_buffer("centers", None, persistent=False)
        self.register_buffer("classes", None, persistent=False)  # class id of each center row (int labels)
        self._multi_hot = False

    def setup(self, labels: torch.Tensor, bits: int, seed: int) -> dict[str, Any]:
        """Centers for the training labels: one per distinct class id, or per multi-hot column."""
        labels = torch.as_tensor(labels)
        if labels.dim() == 2:
            self._multi_hot = True
            self.classes = None
            n = labels.shape[1]
        elif labels.dim() == 1:
            self._multi_hot = False
            self.classes = torch.unique(labels.long())  # sorted: forward finds rows by binary search
            n = len(self.classes)
        else:
            raise BadInput(f"csq labels | shape {tuple(labels.shape)}: pass int class ids [N] or multi-hot [N, C]")
        C, record = hash_centers(n, bits, seed)
        self.centers = torch.from_numpy(C).float()
        shown = f"rows of H_{bits} and their negations" if record["kind"] == "hadamard" else \
            f"random, seed {seed}, {record['draws']} draws ({record['why']})"
        log.info("csq centers: %s for %d classes; min Hamming distance %s of %d bits", shown, n,
                 record["min_distance"], bits)
        record = {**record, "file": "centers.npy"}
        ids = [] if self._multi_hot else [int(c) for c in self.classes]
        if ids != list(range(len(ids))):  # row r of centers.npy is class r, unless listed here
            record["classes"] = ids
        return {"centers": record}

    def run_files(self) -> dict[str, np.ndarray]:
        return {} if self.centers is None else {"centers.npy": self.centers.numpy().astype(np.int8)}

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Each sample's center ``c_i`` (float ±1, ``[B, K]``) for its class id or multi-hot row."""
        if self.centers is None:
            raise BadInput("csq | no hash centers yet: call setup(train labels, bits, seed) before the first step")
        centers = self.centers
        if self._multi_hot:
            if labels.dim() != 2 or labels.shape[1] != len(centers):
                raise BadInput(f"csq labels | expected multi-hot [B, {len(centers)}] like the training labels, "
                               f"got shape {tuple(labels.shape)}: use the same class list")
            y = labels.to(centers.device, centers.dtype)
            if bool((y.sum(1) == 0).any()):
                raise BadInput("csq labels | a sample has no class, so no center: drop unlabelled samples")
            total = y @ centers
            return torch.where(total >= 0, 1.0, -1.0).to(centers.dtype)
        if labels.dim() != 1:
            raise BadInput(f"csq labels | expected class ids [B] like the training labels, "
                           f"got shape {tuple(labels.shape)}: use the same kind of labels")
        ids = labels.to(self.classes.device).long()
        row = torch.searchsorted(self.classes, ids).clamp(max=len(self.classes) - 1)
        missing = self.classes[row] != ids
        if bool(missing.any()):
            raise BadInput(f"csq labels | class {int(ids[missing][0])} has no hash center: the centers were "
                           "built for the training labels only; train on data that includes it")
        return centers[row]

    def forward(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if h.dim() != 2:
            raise BadInput(f"hash logits | expected [B, bits], got shape {tuple(h.shape)}: flatten the hash head output")
        if len(labels) != len(h):
            raise BadInput(f"csq labels | {len(labels)} labels for a batch of {len(h)}: pass one per sample")
        c = self.targets(labels).to(h.device, h.dtype)
        if c.shape[1] != h.shape[1]:
            raise BadInput(f"csq | centers have {c.shape[1]} bits, the codes {h.shape[1]}: "
                           "call setup with the head's --bits")
        central = F.binary_cross_entropy_with_logits(2.0 * h, (c + 1.0) / 2.0)
        if self.quant_weight == 0.0:
            return central
        quant = (self.codes(h).abs() - 1.0).pow(2).mean()
        return central + self.quant_weight * quant


def keyword_names(cls: type[HashLoss]) -> list[str]:
    """The loss's constructor keywords, in signature order (the manifest keeps that order)."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [n for n, p in inspect.signature(cls.__init__).parameters.items() if n != "self" and p.kind in kinds]


def keyword_default(cls: type[HashLoss], name: str) -> Any:
    """The constructor's own default for keyword ``name`` (None when it has none)."""
    p = inspect.signature(cls.__init__).parameters.get(name)
    return None if p is None or p.default is inspect.Parameter.empty else p.default


def build_loss(name: str, **hparams: Any) -> HashLoss:
    """``LOSSES.get(name)(**hparams)``, turning an unknown hyper-parameter into BadInput."""
    cls = LOSSES.get(name)
    try:
        return cls(**hparams)
    except TypeError as e:
        raise BadInput(f"loss {name!r} | bad hyper-parameters {sorted(hparams)}: {e}") from None
