"""Arm selection: uniform sampling and the SL-SAM EXP3 bandit (numpy; knows nothing of Trainer)."""

import numpy as np


def project_to_budget(weights: np.ndarray, total: float, min_prob: float) -> np.ndarray:
    """Project weights onto {sum(p) = total, min_prob <= p <= 1}: p_i = clip(c * w_i, min_prob, 1).

    f(c) = sum_i clip(c * w_i, min_prob, 1) is piecewise linear in c with kinks at min_prob / w_i and 1 / w_i;
    c is read off exactly on the segment where f crosses `total`. With min_prob -> 0 this is SL-SAM's rule
    (cap the largest weights at 1, rescale the rest to the remaining budget). With w sorted and W its prefix sums,
    f at every kink c is min_prob * L + (N - H) + c * (W_H - W_L), L = #{w_i <= min_prob / c}, H = #{w_i < 1 / c}:
    O(N log N).
    """
    w = np.asarray(weights, dtype=np.float64)
    n = len(w)
    if not n * min_prob <= total <= n:
        raise ValueError(f"cannot spread a budget of {total} over {n} arms with probabilities in [{min_prob}, 1]")
    if not w.max() > 0:
        return np.full(n, total / n)
    w = np.maximum(w / w.max(), 1e-300)  # scale-free; keeps 1 / w finite
    kinks = np.unique(np.concatenate([min_prob / w, 1.0 / w]))
    ws = np.sort(w)
    prefix = np.concatenate([[0.0], np.cumsum(ws)])
    low = np.searchsorted(ws, min_prob / kinks, side="right")  # these arms sit at the floor min_prob
    high = np.searchsorted(ws, 1.0 / kinks, side="left")  # from here on the arms are capped at 1
    f = min_prob * low + (n - high) + kinks * (prefix[high] - prefix[low])
    k = min(np.searchsorted(f, total), len(kinks) - 1)
    lo = max(k - 1, 0)
    # f at the segment's two ends summed element by element: c is then independent of the prefix sums' rounding.
    f_lo, f_k = np.clip(kinks[[lo, k]][:, None] * w[None, :], min_prob, 1.0).sum(axis=1)
    if k == 0 or f_k == f_lo:
        c = kinks[k]
    else:
        c = kinks[lo] + (total - f_lo) * (kinks[k] - kinks[lo]) / (f_k - f_lo)
    return np.clip(c * w, min_prob, 1.0)


class UniformSelector:
    """Uniform selection: arm i joins S_t independently with probability p_i = s (S_t redrawn if empty).

    The draw for step t uses a generator seeded with (seed, t), so every process, and a run resumed at step t,
    draws the same S_t.
    """

    def __init__(self, num_arms: int, budget: float, seed: int = 0):
        if num_arms < 1:
            raise ValueError("layer selection needs at least one arm (trainable parameter tensor)")
        if not 0 < budget <= 1:
            raise ValueError(f"selection_budget must be in (0, 1], got {budget!r}")
        self.num_arms = num_arms
        self.budget = float(budget)
        self.seed = int(seed)
        self.probabilities = np.full(num_arms, self.budget)

    def select(self, step: int) -> np.ndarray:
        """Indices of the arms selected at optimizer step `step`."""
        rng = np.random.default_rng([self.seed, step])
        while True:
            chosen = np.flatnonzero(rng.random(self.num_arms) < self.probabilities)
            if chosen.size:
                return chosen

    def update(self, selected: np.ndarray, rewards: np.ndarray) -> bool:
        """Uniform selection learns nothing; returns whether the probabilities changed."""
        return False

    def entropy(self) -> float:
        """Entropy (nats) of q = p / sum(p); log(N) when uniform."""
        q = self.probabilities / self.probabilities.sum()
        return float(-(q * np.log(q)).sum())

    def state_dict(self) -> dict:
        return {"num_arms": self.num_arms, "budget": self.budget, "probabilities": self.probabilities.tolist()}

    def load_state_dict(self, state: dict) -> None:
        probs = np.asarray(state["probabilities"], dtype=np.float64)
        if probs.shape != (self.num_arms,):
            raise ValueError(f"selector state has {probs.size} arm probabilities, this model has {self.num_arms} arms")
        if not (np.all(np.isfinite(probs)) and np.all(probs > 0) and np.all(probs <= 1)):
            raise ValueError("selector state has arm probabilities outside (0, 1]")
        self.probabilities = probs


class LayerBandit(UniformSelector):
    """SL-SAM's EXP3 bandit over arms, driven by gradient norms (AdamBS-style update).

    For the selected arms i in S_t with rewards a_i (gradient norms):
        loss_i = max_{j in S_t} (a_j / p_j)^2 - (a_i / p_i)^2,   w_i = p_i * exp(-lr * loss_i / p_i),
    w_i = p_i for the others; then p = project_to_budget(w, s * N, min_prob).
    `reward="normalized"` divides a by max_{j in S_t} a_j first (scale-invariant); `"per_parameter"` divides each a_i
    by sqrt(n_i) (`arm_sizes`: elements per arm; the RMS gradient, which does not favour big tensors) and then by the
    largest; `"raw"` is the released rule.
    """

    def __init__(
        self,
        num_arms: int,
        budget: float,
        lr: float = 1e-3,
        reward: str = "normalized",
        min_prob: float = 1e-3,
        seed: int = 0,
        arm_sizes: list[int] | None = None,
    ):
        super().__init__(num_arms, budget, seed)
        if reward not in ("normalized", "raw", "per_parameter"):
            raise ValueError(f"bandit_reward must be one of ['normalized', 'raw', 'per_parameter'], got {reward!r}")
        if reward == "per_parameter" and (arm_sizes is None or len(arm_sizes) != num_arms or min(arm_sizes) < 1):
            raise ValueError("bandit_reward='per_parameter' needs arm_sizes: a positive element count per arm")
        if not 0 < min_prob < budget or min_prob > 1:
            raise ValueError(f"bandit_min_prob must be in (0, selection_budget={budget}), got {min_prob!r}")
        self.lr = float(lr)
        self.reward = reward
        self.min_prob = float(min_prob)
        self.arm_sizes = None if arm_sizes is None else np.asarray(arm_sizes, dtype=np.float64)

    def update(self, selected: np.ndarray, rewards: np.ndarray) -> bool:
        """Apply one EXP3 update; non-finite rewards leave the probabilities untouched (returns False)."""
        a = np.asarray(rewards, dtype=np.float64)
        if a.size == 0 or not np.all(np.isfinite(a)):
            return False
        if self.reward == "per_parameter":
            a = a / np.sqrt(self.arm_sizes[selected])
        if self.reward != "raw" and a.max() > 0:
            a = a / a.max()
        p = self.probabilities[selected]
        scaled = (a / p) ** 2
        weights = self.probabilities.copy()
        weights[selected] = p * np.exp(-self.lr * (scaled.max() - scaled) / p)
        self.probabilities = project_to_budget(weights, self.budget * self.num_arms, self.min_prob)
        return True
