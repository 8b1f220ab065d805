"""The OCAR step on nngeometry's solve (Urettini & Carta 2025: replay + gradient replaced by ``F.solve(g, regul)``
with F the Fisher of buffer + current data), on nngeometry 0.4: the baseline clfast.OCAR is measured against."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def seed_ours_step(model: nn.Module, optimizer: torch.optim.Optimizer, buffer, x: Tensor, y: Tensor,
                   representation, regul: float = 1e-2) -> Tensor:
    """One nngeometry OCAR step: sample the buffer, compute three Fishers (buffer, current, union; only
    the union one is used), solve, step, add the batch to the list-based buffer one pair at a time."""
    from nngeometry.metrics import FIM
    from nngeometry.object import PVector

    xb, yb = buffer.sample(x.shape[0])
    if xb.numel():
        xs, ys = torch.cat([x, xb.to(x.device)]), torch.cat([y, yb.to(y.device)]).long()
    else:
        xs, ys = x, y
    loader = lambda a, b: torch.utils.data.DataLoader(torch.utils.data.TensorDataset(a, b),  # noqa: E731
                                                      batch_size=256, shuffle=True)
    fisher = None
    if xb.numel():
        FIM(model, loader(xb.to(x.device), yb.to(y.device)), representation, variant="classif_logits",
            device=x.device)
        FIM(model, loader(x, y), representation, variant="classif_logits", device=x.device)
        fisher = FIM(model, loader(xs, ys), representation, variant="classif_logits", device=x.device)
    optimizer.zero_grad()
    loss = F.cross_entropy(model(xs), ys)
    loss.backward()
    if fisher is not None:
        _copy_to_grads(model, fisher.solve(PVector.from_model_grad(model), regul=regul))
    optimizer.step()
    buffer.update_buffer(list(zip(x.cpu().detach(), y.cpu().detach())))
    return loss.detach()


def _copy_to_grads(model: nn.Module, vector) -> None:
    """Copies ``vector`` into the parameters' ``.grad`` (a ``PVector.to_model_grad``, which nngeometry lacks)."""
    modules = vector.layer_collection.get_layerid_module_maps(model)[0]
    for lid, values in vector.to_dict().items():
        mod = modules[lid]
        mod.weight.grad.copy_(values[0])
        if len(values) > 1:
            mod.bias.grad.copy_(values[1])
