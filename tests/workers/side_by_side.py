"""Train a parallelized model and its plain one-process copy side by side (the workers' check)."""
import torch
from torch import nn


def side_by_side(rt, parallel, reference, *, vocab: int, steps: int, lr: float, logits=lambda out: out):
    """SGD on a fixed batch of 8 sequences of 9 tokens: ``parallel`` on this replica's slice,
    ``reference`` on all of it (every rank); returns both loss curves. ``logits`` reads the
    reference's output (``.logits`` of an HF model)."""
    optimizer = torch.optim.SGD(parallel.parameters(), lr=lr)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=lr)
    data = torch.randint(0, vocab, (8, 9), generator=torch.Generator().manual_seed(1))
    per_replica = 8 // rt.dp_size
    mine = data[rt.dp_rank * per_replica:(rt.dp_rank + 1) * per_replica]
    losses, ref_losses = [], []
    for _ in range(steps):
        local = parallel.train_step(mine[:, :-1], mine[:, 1:])
        optimizer.step()
        optimizer.zero_grad()
        losses.append(parallel.global_loss(local))
        loss = nn.functional.cross_entropy(logits(reference(data[:, :-1])).flatten(0, 1), data[:, 1:].flatten())
        loss.backward()
        ref_optimizer.step()
        ref_optimizer.zero_grad()
        ref_losses.append(loss.item())
    return losses, ref_losses
