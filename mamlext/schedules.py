r"""Schedules over meta-training iterations: MAML++'s multi-step loss weights, a cosine rate.

Both follow "How to train your MAML" (Antoniou, Edwards and Storkey, ICLR 2019,
arXiv:1810.09502), sections 4 and 5.
"""

from __future__ import annotations

import math


def multi_step_weights(
    num_steps: int, iteration: int, anneal_iterations: int, floor: float = 0.03
) -> list[float] | None:
    r"""The multi-step loss's weight of each inner step's query loss at ``iteration``.

    With :math:`K` steps and progress :math:`p = \text{iteration} / \text{anneal\_iterations}`
    the weights start uniform and move towards the last step, each earlier step keeping at
    least :math:`\text{floor} / K`; they always sum to 1:

    .. math::
        w_k = \max\Big(\frac{1 - p}{K}, \frac{\text{floor}}{K}\Big) \quad (k < K), \qquad
        w_K = \min\Big(\frac{1 + (K - 1) p}{K}, 1 - (K - 1) \frac{\text{floor}}{K}\Big)

    From ``anneal_iterations`` on the multi-step loss is off (``None``: the last step's loss
    alone), as in the paper's code. The paper moves :math:`p` once per epoch of 500
    iterations; here it moves every iteration.

    Returns:
        ``num_steps`` weights for ``MAML(...)(..., step_weights=...)``, or ``None``.
    """
    if num_steps < 1:
        raise ValueError(f"the multi-step loss needs at least one inner step, got {num_steps}")
    if anneal_iterations < 1:
        raise ValueError(f"the multi-step loss's iterations must be >= 1, got {anneal_iterations}")
    if not 0 <= floor <= 1:
        raise ValueError(f"the multi-step loss's floor must be in [0, 1], got {floor}")
    if iteration >= anneal_iterations:
        return None
    progress, k = iteration / anneal_iterations, num_steps
    earlier = max((1 - progress) / k, floor / k)
    last = min((1 + (k - 1) * progress) / k, 1 - (k - 1) * floor / k)
    return [earlier] * (k - 1) + [last]


def cosine(start: float, end: float, iteration: int, iterations: int) -> float:
    r"""Cosine annealing from ``start`` (iteration 0) to ``end`` (iteration ``iterations``):
    :math:`\text{end} + (\text{start} - \text{end}) (1 + \cos(\pi \, i / n)) / 2`."""
    fraction = min(iteration / iterations, 1.0)
    return end + (start - end) * (1 + math.cos(math.pi * fraction)) / 2
