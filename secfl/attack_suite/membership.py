"""Membership inference against the model the server ends up with.

* **loss threshold** (Yeom et al. 2018): a record is called a member when the model's loss on
  it is low.
* **LiRA, offline** (Carlini et al., S&P 2022, "Membership inference attacks from first
  principles", Sec. VI-C): shadow models of the target's architecture are trained on random
  halves of a population drawn from the same distribution; for each candidate only the
  shadows that did *not* train on it (OUT) are used: the logit-scaled confidence
  ``phi = log(p_y / (1 - p_y))`` of the OUT shadows is fitted by a Gaussian (one variance
  shared by all candidates, as the paper recommends with few shadows) and the score is the
  one-sided likelihood ``(phi_target - mu_out) / sigma_out``.

Members are client training records, non-members the held-out test split (same
distribution: the test split is stratified). Reported: ROC AUC and the TPR at 1% FPR.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from secfl.client.trainer import train_locally
from secfl.config import ClientConfig
from secfl.data.datasets import Dataset
from secfl.randomness import Randomness


def roc_auc(scores: np.ndarray, member: np.ndarray) -> float:
    """Probability that a random member scores above a random non-member (ties: half)."""
    pos = np.asarray(scores, np.float64)[member]
    neg = np.asarray(scores, np.float64)[~member]
    if pos.size == 0 or neg.size == 0:
        return math.nan
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(order.size, dtype=np.float64)
    values = np.concatenate([pos, neg])[order]
    # average ranks over ties
    i = 0
    while i < values.size:
        j = i
        while j + 1 < values.size and values[j + 1] == values[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    rank_sum = ranks[: pos.size].sum()
    return float((rank_sum - pos.size * (pos.size + 1) / 2.0) / (pos.size * neg.size))


def tpr_at_fpr(scores: np.ndarray, member: np.ndarray, fpr: float = 0.01) -> float:
    """The largest TPR of a threshold test whose FPR does not exceed ``fpr``."""
    pos = np.sort(np.asarray(scores, np.float64)[member])
    neg = np.sort(np.asarray(scores, np.float64)[~member])
    if pos.size == 0 or neg.size == 0:
        return math.nan
    allowed = math.floor(fpr * neg.size)
    # threshold: strictly above the (allowed+1)-th largest non-member score
    threshold = neg[neg.size - allowed - 1]
    return float(np.mean(pos > threshold))


def per_record(model: nn.Module, data: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(cross-entropy loss, logit-scaled confidence of the true label) of every record."""
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(data.x)).double()
        y = torch.from_numpy(data.y)
        logp = torch.log_softmax(logits, dim=1)
        true = logp[torch.arange(len(y)), y]
        others = logp.clone()
        others[torch.arange(len(y)), y] = -math.inf
        rest = torch.logsumexp(others, dim=1)
    return (-true).numpy(), (true - rest).numpy()


@dataclass(frozen=True)
class MembershipResult:
    loss_auc: float
    loss_tpr_at_1pct: float
    lira_auc: float
    lira_tpr_at_1pct: float
    members: int
    non_members: int
    shadows: int

    def to_dict(self) -> dict[str, float | int]:
        return dict(self.__dict__)


def membership_inference(
    target: nn.Module,
    members: Dataset,
    non_members: Dataset,
    *,
    make_model: Callable[[], nn.Module],
    client: ClientConfig,
    shadows: int,
    shadow_epochs: int,
    randomness: Randomness,
    limit: int | None = None,
) -> tuple[MembershipResult, dict[str, np.ndarray]]:
    """Both attacks on ``target``; returns the result and the per-record scores."""
    count = min(len(members), len(non_members), limit or len(members))
    pick = randomness.stream("audit.mia_pick", party="auditor").numpy_generator()
    members = members.subset(np.sort(pick.choice(len(members), count, replace=False)))
    non_members = non_members.subset(np.sort(pick.choice(len(non_members), count, replace=False)))
    pool = Dataset(
        "candidates",
        np.concatenate([members.x, non_members.x]),
        np.concatenate([members.y, non_members.y]),
        members.num_classes,
    )
    is_member = np.concatenate([np.ones(count, bool), np.zeros(count, bool)])
    loss, phi = per_record(target, pool)
    loss_score = -loss

    # LiRA offline: each shadow trains on a random half of the pool; OUT statistics only
    out_phi = np.full((shadows, len(pool)), np.nan)
    shadow_config = client.model_copy(update={"epochs": shadow_epochs})
    for k in range(shadows):
        half = randomness.stream("audit.lira_half", attempt=k, party="auditor").bernoulli(
            0.5, len(pool)
        )
        seed = randomness.stream("audit.lira_init", attempt=k, party="auditor").seed_int()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            shadow = make_model()
        train_locally(
            shadow,
            pool.subset(np.flatnonzero(half)),
            shadow_config,
            randomness.stream("audit.lira_order", attempt=k, party="auditor"),
        )
        _, shadow_phi = per_record(shadow, pool)
        out_phi[k, ~half] = shadow_phi[~half]
    seen = ~np.isnan(out_phi)
    counts = seen.sum(axis=0)
    # a candidate no shadow left out (possible with few shadows) gets the pooled OUT mean
    pooled = float(np.nanmean(out_phi))
    mu = np.where(
        counts > 0, np.where(seen, out_phi, 0.0).sum(axis=0) / np.maximum(counts, 1), pooled
    )
    sigma = float(np.nanstd(out_phi - mu[None, :])) or 1.0
    lira_score = (phi - mu) / sigma
    result = MembershipResult(
        loss_auc=roc_auc(loss_score, is_member),
        loss_tpr_at_1pct=tpr_at_fpr(loss_score, is_member),
        lira_auc=roc_auc(lira_score, is_member),
        lira_tpr_at_1pct=tpr_at_fpr(lira_score, is_member),
        members=count,
        non_members=count,
        shadows=shadows,
    )
    return result, {"loss": loss_score, "lira": lira_score, "member": is_member}
