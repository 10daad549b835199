"""Label-free summaries and starting points for the mixture's means."""

from __future__ import annotations

import torch


def sorted_means(mu: torch.Tensor) -> torch.Tensor:
    """Means ``(..., K, d)`` reordered by their first coordinate (a label-invariant summary)."""
    order = mu[..., 0].argsort(dim=-1)
    return torch.gather(mu, -2, order.unsqueeze(-1).expand(mu.shape))


def spread_means(x: torch.Tensor, K: int, generator: torch.Generator) -> torch.Tensor:
    """K data points by k-means++ seeding (Arthur & Vassilvitskii 2007): the first uniformly,
    each next one with probability proportional to its squared distance D(x_i)^2 to the nearest
    point already chosen. Shape ``(K, d)`` on x's device and dtype.

    D^2 is kept as a running minimum (O(n K d) in all) and computed in float64 on data divided by
    their largest absolute value (the weights are scale-free, so values near 1e300 cannot
    overflow). Once every distinct point is chosen (K larger than their number), the remaining
    picks are uniform."""
    n = x.shape[0]
    z = x.detach().to("cpu", torch.float64)
    top = float(z.abs().max())
    if top > 0:
        z = z / top
    idx = [int(torch.randint(n, (1,), generator=generator))]
    d2 = ((z - z[idx[0]]) ** 2).sum(-1)
    while len(idx) < K:
        if not float(d2.sum()) > 0:  # fewer distinct points than K: the rest uniformly
            rest = torch.randint(n, (K - len(idx),), generator=generator)
            idx.extend(rest.tolist())
            break
        i = int(torch.multinomial(d2, 1, generator=generator))
        idx.append(i)
        d2 = torch.minimum(d2, ((z - z[i]) ** 2).sum(-1))
    return x[torch.tensor(idx, device=x.device)].clone()
