"""The per-neuron DAN implementation: ``Neuron`` = ``nn.Sequential(BN, Linear, act, BN, Linear, act,
Linear)``, ``DANLayer`` = a Python loop of N neurons on the same input, ``DAN`` = three layers (3, 2, 1 neurons).
They are the parity baseline and the layout ``clfast.nn`` converts from and to."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["Neuron", "DANLayer", "DAN"]


class Neuron(nn.Module):
    """One neuron: ``BN(ni) -> Linear(ni, nf) -> act -> BN(nf) -> Linear(nf, nf) -> act -> Linear(nf, nout_ni)``."""

    def __init__(self, ni, nf, nout_ni, bias=True, act_fn=None):
        super().__init__()
        self._ni = ni
        act_fn = nn.Tanh() if act_fn is None else act_fn
        assert isinstance(act_fn, nn.Module), 'activation must be of nn.Module instance'
        lin1 = nn.Linear(ni, nf, bias=bias)
        lin2 = nn.Linear(nf, nf, bias=bias)
        lin3 = nn.Linear(nf, nout_ni, bias=bias)
        bn1 = nn.BatchNorm1d(ni)
        bn2 = nn.BatchNorm1d(nf)
        self.core = nn.Sequential(bn1, lin1, act_fn, bn2, lin2, act_fn, lin3)

    def forward(self, x):
        assert x.shape[1] == self._ni, \
            f'input to neuron ({x.shape[1]}) does not match input dimension size: ({self._ni})'
        return self.core(x)


class DANLayer(nn.Module):
    """``neurons`` Neurons reading the same input (``n_ni * p_neurons`` features); outputs concatenated."""

    def __init__(self, neurons, n_ni, n_nf, n_nout_ni, p_neurons=1, bias=True, act_fn=None):
        super().__init__()
        self._n = neurons
        self._ni = n_ni * p_neurons
        self.neurons = nn.ModuleList([Neuron(n_ni * p_neurons, n_nf, n_nout_ni, bias=bias, act_fn=act_fn)
                                      for _ in range(neurons)])

    def forward(self, x):
        b, f = x.size()
        assert f == self._ni, f'input dimension ({f}) do not match neuron input dimension ({self._ni})'
        outs = [self.neurons[i](x) for i in range(self._n)]
        return torch.cat(outs, dim=1)


class DAN(nn.Module):
    """The three-layer DAN: 3 neurons (50 hidden, 100 out), 2 neurons (50, 25), 1 neuron (10, classes)."""

    def __init__(self, ni, num_classes, act=None):
        super().__init__()
        self.dan1 = DANLayer(neurons=3, n_ni=ni, n_nf=50, n_nout_ni=100, p_neurons=1, act_fn=act)
        self.dan2 = DANLayer(neurons=2, n_ni=100, n_nf=50, n_nout_ni=25, p_neurons=3, act_fn=act)
        self.dan3 = DANLayer(neurons=1, n_ni=25, n_nf=10, n_nout_ni=num_classes, p_neurons=2, act_fn=act)

    def forward(self, x):
        return self.dan3(self.dan2(self.dan1(x)))
