"""
The law of GAST's draw (gast.py step 4): each sample's inclusion probability per layer.

The draw itself needs none of this: the tests of invariants I2-I6 and I10 hold the draws
to this law.
"""

import torch

from gast import select_samples, standardise


def inclusion_probabilities(scores, k, temperature=1.0, nodes=64):
    """P(sample i is among the k drawn) under gast.select_by_softmax's law, per row: (L, B) float64.

    With keys w_i + G_i (w = z / temperature, G Gumbel), i is drawn when fewer than k of
    the others' keys exceed its own. Given G_i, write t = exp(-G_i) (t ~ Exp(1)); then
    key_j exceeds key_i with probability q_j(t) = 1 - exp(-t exp(w_j - w_i)),
    independently over j, so
        P_i = integral over t of e^{-t} P(Poisson-binomial(q_j(t), j != i) <= k - 1) dt,
    the Poisson-binomial by the usual recursion over j, the integral by the trapezoid rule
    on a log grid of t (smooth there; 64 nodes agree with enumeration to about 1e-7).
    """
    w = standardise(scores).cpu() / temperature  # (L, B)
    L, B = w.shape
    s = torch.linspace(-20.0, 6.0, nodes, dtype=torch.float64)  # log t
    t = s.exp()
    weight = torch.exp(-t) * t * (s[1] - s[0])  # e^{-t} dt = e^{-t} t ds
    weight[0] /= 2
    weight[-1] /= 2
    c = torch.exp((w.unsqueeze(1) - w.unsqueeze(2)).clamp(max=700))  # (L, i, j): exp(w_j - w_i)
    q = 1 - torch.exp(-t * c.unsqueeze(-1))  # (L, i, j, nodes)
    q[:, torch.arange(B), torch.arange(B)] = 0  # i is not among its own others
    count = torch.zeros(L, B, k, nodes, dtype=torch.float64)  # P(m others above, m < k)
    count[:, :, 0] = 1
    for j in range(B):
        qj = q[:, :, j].unsqueeze(2)  # (L, i, 1, nodes)
        shifted = torch.nn.functional.pad(count[:, :, :-1], (0, 0, 1, 0))
        count = count * (1 - qj) + shifted * qj
    return (count.sum(dim=2) * weight).sum(dim=-1).clamp(0, 1)  # (L, B)


def law(scores, k, selection="softmax", temperature=1.0):
    """What gast.select_samples intended: each sample's inclusion probability per row (L, B),
    float64, given that the row is active (topk: the mask itself; random: k / B)."""
    L, B = scores.shape
    if selection == "topk":
        return select_samples(scores, k, "topk").double().cpu()
    if selection == "random":
        return torch.full((L, B), k / B, dtype=torch.float64)
    return inclusion_probabilities(scores, k, temperature)
