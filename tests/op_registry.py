"""One entry per clfast op: sample inputs per device and dtype, which arguments the op writes, which are
differentiable, and the pure-torch oracle. The op matrix (test_ops.py) and the bad-input suite (bad_input.py) are
both generated from it, in the style of pytorch/extension-cpp's ``sample_inputs``."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import Tensor

import clfast
from clfast import reference


@dataclass
class Op:
    name: str
    samples: Callable[[str, torch.dtype, torch.Generator], List[tuple]]
    writes: Tuple[int, ...] = ()        # positional arguments written in place (a tensor or a list of tensors)
    grad: Tuple[int, ...] = ()          # float arguments gradcheck differentiates (the op's autograd)
    dtypes: Tuple[torch.dtype, ...] = (torch.float32, torch.float64)
    reference: Callable = None          # default: clfast.reference.<name>
    native: Callable = None             # default: torch.ops.clfast.<name>
    family: str = ""
    writes_when: Callable[[tuple], bool] = None  # for an op that writes only in some modes
    float32_tol: Tuple[float, float] = (1e-5, 1e-5)  # (rtol, atol); float64 compares at 1e-10

    def written(self, args) -> Tuple[int, ...]:
        return self.writes if self.writes_when is None or self.writes_when(args) else ()

    def ref(self):
        return self.reference or getattr(reference, self.name)

    def nat(self):
        return self.native or getattr(torch.ops.clfast, self.name)


def _r(g, shape, dtype, device, positive=False):
    t = torch.rand(shape, generator=g, dtype=dtype) + 0.1 if positive else torch.randn(shape, generator=g,
                                                                                      dtype=dtype)
    return t.to(device)


SHAPES = [(7, 5), (13,), (3, 4, 5), (1,)]


def _lists(g, k, dtype, device, shapes=SHAPES, positive=()):
    return [[_r(g, s, dtype, device, i in positive) for s in shapes] for i in range(k)]


def _si_accumulate(device, dtype, g):
    omega, params, ref, grads = _lists(g, 4, dtype, device)
    return [(omega, params, ref, grads, False), copy.deepcopy((omega, params, ref, grads, True))]


def _si_consolidate(device, dtype, g):
    imp, prev, omega, params = _lists(g, 4, dtype, device, positive=(0,))
    return [(imp, prev, omega, params, 1e-3)]


def _si_penalty(device, dtype, g):
    imp, prev, params = _lists(g, 3, dtype, device, positive=(0,))
    return [(imp, prev, params)]


def _si_penalty_backward(device, dtype, g):
    imp, prev, params = _lists(g, 3, dtype, device, positive=(0,))
    return [(_r(g, (), dtype, device), imp, prev, params)]


def _si_penalty_grad(device, dtype, g):
    grads, imp, prev, params = _lists(g, 4, dtype, device, positive=(1,))
    return [(grads, imp, prev, params, 0.7)]


def _sgd(device, dtype, g):
    params, grads, bufs, omega = _lists(g, 4, dtype, device)
    out = [(params, grads, bufs, omega, 0.1, 0.9, 0.1, 0.01, False, True)]
    p2, g2, b2, o2 = _lists(g, 4, dtype, device)
    out.append((p2, g2, b2, o2, 0.05, 0.9, 0.0, 0.0, True, False))
    p3, g3 = _lists(g, 2, dtype, device)
    out.append((p3, g3, [], [], 0.1, 0.0, 0.0, 0.0, False, False))
    return out


def _adam(device, dtype, g):
    params, grads, m, v, omega = _lists(g, 5, dtype, device, positive=(3,))
    out = [(params, grads, m, v, omega, 1e-2, 0.9, 0.999, 1e-8, 0.01, 1 - 0.9 ** 3, 1 - 0.999 ** 3)]
    p2, g2, m2, v2 = _lists(g, 4, dtype, device, positive=(3,))
    out.append((p2, g2, m2, v2, [], 1e-3, 0.6, 0.99, 1e-6, 0.0, 0.4, 0.01))
    return out


def _cbp_update(device, dtype, g):
    out = []
    for kind in ("contribution", "zero_contribution", "adaptable_contribution"):
        n1, n2 = 6, 3
        utility = [_r(g, (n1,), dtype, device, True), _r(g, (n2,), dtype, device, True)]
        mean = [_r(g, (n1,), dtype, device), _r(g, (n2,), dtype, device)]
        age = [torch.arange(n1, dtype=dtype, device=device) * 3, torch.arange(n2, dtype=dtype, device=device) + 1]
        features = [_r(g, (8, n1), dtype, device), _r(g, (4, n2, 5, 5), dtype, device)]
        w_next = [_r(g, (4, n1), dtype, device), _r(g, (2, n2, 3, 3), dtype, device)]
        w_cur = [_r(g, (n1, 5), dtype, device), _r(g, (n2, 2, 3, 3), dtype, device)]
        out.append((utility, mean, age, features, w_next, w_cur, 0.9, kind))
    return out


def _cbp_replace(device, dtype, g):
    n = 6
    age = torch.tensor([12., 3., 20., 15., 30., 11.], dtype=dtype, device=device)
    sample = (_r(g, (n, 5), dtype, device), _r(g, (n,), dtype, device), _r(g, (4, n), dtype, device),
              _r(g, (4,), dtype, device), _r(g, (n,), dtype, device, True), _r(g, (n,), dtype, device), age,
              _r(g, (2, 5), dtype, device), 0.9, 10)
    conv = (_r(g, (3, 2, 3, 3), dtype, device), None, _r(g, (2, 3, 3, 3), dtype, device), None,
            _r(g, (3,), dtype, device, True), _r(g, (3,), dtype, device),
            torch.tensor([40., 50., 60.], dtype=dtype, device=device), _r(g, (1, 18), dtype, device), 0.99, 5)
    return [sample, conv]


def _reservoir(device, dtype, g):
    storage = [torch.zeros(5, 3, dtype=dtype, device=device), torch.zeros(5, dtype=torch.long, device=device)]
    batch = [_r(g, (4, 3), dtype, device), torch.arange(4, device=device)]
    draws = torch.rand(4, generator=g, dtype=torch.float64).to(device)
    full = [torch.zeros(3, 2, dtype=dtype, device=device)]
    many = [_r(g, (16, 2), dtype, device)]  # many items land on few slots: the last one wins
    return [(storage, batch, draws, 3), (full, many, torch.rand(16, generator=g, dtype=torch.float64).to(device),
                                         10)]


def _spd(g, n, dtype, device):
    m = torch.randn(n, n, generator=g, dtype=dtype)
    m = m @ m.T + n * torch.eye(n, dtype=dtype)
    return ((m + m.T) / 2).to(device)


def _kron_quadratic(device, dtype, g):
    a = [_spd(g, 3, dtype, device), _spd(g, 4, dtype, device)]
    gg = [_spd(g, 2, dtype, device), _spd(g, 5, dtype, device)]
    v = [_r(g, (2, 3), dtype, device), _r(g, (5, 4), dtype, device)]
    return [(a, gg, v)]


def _kron_mv(device, dtype, g):
    a, gg, v = _kron_quadratic(device, dtype, g)[0]
    return [(torch.tensor(1.5, dtype=dtype, device=device), a, gg, v)]


def _fisher_diag(device, dtype, g):
    out = []
    for b, k, o, i, bias in ((6, 3, 4, 5, True), (9, 1, 7, 3, False), (33, 9, 20, 140, True), (0, 2, 3, 4, True),
                             (5, 0, 3, 4, True)):  # no examples; no outputs
        gy = _r(g, (k, b, o), dtype, device).transpose(0, 1)  # [B, K, out] as the batched backward gives it
        out.append((_r(g, (o * i + (o if bias else 0),), dtype, device, True), _r(g, (b, i), dtype, device), gy,
                    bias))
    return out


def _fisher_factor(device, dtype, g):
    out = []
    for rows, n, bias, transposed in ((7, 5, True, False), (6, 4, False, True), (40, 150, True, False),
                                      (30, 140, False, True)):
        x = _r(g, (n, rows), dtype, device).t() if transposed else _r(g, (rows, n), dtype, device)
        out.append((_spd(g, n + bias, dtype, device), x, 0.25, bias))
    out.append((_r(g, (4, 4), dtype, device), _r(g, (9, 3), dtype, device), -1.5, True))  # not symmetric: mirrored
    out.append((_r(g, (4, 4), dtype, device), _r(g, (0, 3), dtype, device), 2.0, True))  # no rows: only mirrored
    out.append((_r(g, (1, 1), dtype, device), _r(g, (5, 0), dtype, device), 2.0, True))  # no columns: the corner
    return out


N, NI, NF, NO, B = 3, 4, 5, 2, 6


def _dan_params(g, dtype, device, bias=True):
    return [_r(g, (N, NI), dtype, device), _r(g, (N, NI), dtype, device), _r(g, (N, NF, NI), dtype, device) * 0.5,
            _r(g, (N, NF), dtype, device) if bias else None, _r(g, (N, NF), dtype, device),
            _r(g, (N, NF), dtype, device), _r(g, (N, NF, NF), dtype, device) * 0.5,
            _r(g, (N, NF), dtype, device) if bias else None, _r(g, (N, NO, NF), dtype, device) * 0.5,
            _r(g, (N, NO), dtype, device) if bias else None]


def _dan_stats(g, dtype, device):
    return [_r(g, (N, NI), dtype, device), _r(g, (N, NI), dtype, device, True),
            torch.zeros(N, dtype=torch.long, device=device), _r(g, (N, NF), dtype, device),
            _r(g, (N, NF), dtype, device, True), torch.zeros(N, dtype=torch.long, device=device)]


def _dan_layer(device, dtype, g):
    out = []
    for training, act, per_neuron, bias in ((True, "tanh", False, True), (False, "relu", False, True),
                                            (True, "gelu", True, False), (False, "sigmoid", True, True)):
        x = _r(g, (N, B, NI) if per_neuron else (B, NI), dtype, device)
        out.append((x, *_dan_params(g, dtype, device, bias), *_dan_stats(g, dtype, device), training, 0.1, 1e-5,
                    act))
    return out


def _dan_bn_update(device, dtype, g):
    rm1, rv1, nb1, rm2, rv2, nb2 = _dan_stats(g, dtype, device)
    return [(rm1, rv1, nb1, rm2, rv2, nb2, _r(g, (NI,), dtype, device), _r(g, (NI,), dtype, device, True),
             _r(g, (N * NF,), dtype, device), _r(g, (N * NF,), dtype, device, True), 0.1, 8)]


OPS: List[Op] = [
    Op("si_accumulate_", _si_accumulate, writes=(0,), family="si"),
    Op("si_consolidate_", _si_consolidate, writes=(0, 1, 2), family="si"),
    Op("si_penalty", _si_penalty, grad=(0, 1, 2), family="si"),
    Op("si_penalty_backward", _si_penalty_backward, family="si"),
    Op("si_penalty_grad_", _si_penalty_grad, writes=(0,), family="si"),
    Op("sgd_si_step_", _sgd, writes=(0, 2, 3), family="optim"),
    Op("adam_si_step_", _adam, writes=(0, 2, 3, 4), family="optim"),
    Op("cbp_update_", _cbp_update, writes=(0, 1, 2), family="cbp"),
    Op("cbp_replace_", _cbp_replace, writes=(0, 1, 2, 3, 4, 5, 6), family="cbp"),
    Op("reservoir_add_", _reservoir, writes=(0,), family="reservoir"),
    Op("kron_quadratic", _kron_quadratic, grad=(0, 1, 2), family="kron"),
    Op("kron_mv", _kron_mv, family="kron"),
    Op("dan_layer", _dan_layer, writes=(11, 12, 13, 14, 15, 16), grad=(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10),
       family="dan", writes_when=lambda args: args[17],  # the running statistics, in train mode
       float32_tol=(1e-4, 1e-4)),  # a chain of three GEMMs and two BatchNorms, summed in another order
    Op("dan_bn_update_", _dan_bn_update, writes=(0, 1, 2, 3, 4, 5), family="dan"),
    Op("fisher_diag_", _fisher_diag, writes=(0,), family="fisher"),
    Op("fisher_factor_", _fisher_factor, writes=(0,), family="fisher"),
]
BY_NAME: Dict[str, Op] = {op.name: op for op in OPS}


def tensors_of(args) -> List[Tensor]:
    out = []
    for a in args:
        if isinstance(a, Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out += [t for t in a if isinstance(t, Tensor)]
    return out


def clone_args(args):
    """A deep copy that keeps what the op may depend on: each tensor's storage offset and strides, which tensors
    share a storage (so aliasing survives the copy), inference tensors, and requires_grad."""
    storages = {}

    def one(a):
        if isinstance(a, list):
            return [one(t) for t in a]
        if not isinstance(a, Tensor):
            return a
        if a.device.type == "meta":
            return a.detach().clone().requires_grad_(a.requires_grad)
        key = a.untyped_storage().data_ptr()
        with torch.inference_mode(a.is_inference()):
            if key not in storages:
                storages[key] = a.untyped_storage().clone()
            t = torch.empty(0, dtype=a.dtype, device=a.device).set_(storages[key], a.storage_offset(), a.shape,
                                                                    a.stride())
        return t.requires_grad_(a.requires_grad) if a.requires_grad else t
    return tuple(one(a) for a in args)


def snapshot(args):
    """Everything a call may change: values (NaN-aware), shapes, strides and version counters."""
    return [(t.shape, t.stride(), _version(t), t.detach().clone()) for t in tensors_of(args)]


def _version(t: Tensor) -> int:
    return -1 if t.is_inference() else t._version  # inference tensors keep no version counter


def unchanged(args, snap) -> bool:
    for t, (shape, stride, version, value) in zip(tensors_of(args), snap):
        if t.shape != shape or t.stride() != stride or _version(t) != version:
            return False
        if t.device.type != "meta" and not torch.equal(t.detach().nan_to_num(1234.5), value.nan_to_num(1234.5)):
            return False
    return True


def assert_same(native_out, ref_out, native_args, ref_args, writes, dtype, float32_tol=(1e-5, 1e-5)):
    """Outputs and written arguments of the two backends agree (NaN where the other has NaN)."""
    rtol, atol = float32_tol if dtype == torch.float32 else (1e-10, 1e-10)
    tol = dict(rtol=rtol, atol=atol)

    def close(x, y):
        if isinstance(x, Tensor) or isinstance(y, Tensor):
            assert isinstance(x, Tensor) and isinstance(y, Tensor), (type(x), type(y))
            if x.dtype.is_floating_point:
                torch.testing.assert_close(x.detach(), y.detach().to(x.dtype), equal_nan=True, **tol)
            else:
                assert torch.equal(x, y), (x, y)
        elif isinstance(x, (list, tuple)):
            assert isinstance(y, (list, tuple)) and len(x) == len(y)
            for a, b in zip(x, y):
                close(a, b)
        else:
            assert x == y, (x, y)

    if isinstance(native_out, tuple) and len(native_out) == 2 and isinstance(native_out[1], list):
        native_out, ref_out = native_out[0], ref_out[0]  # kron_quadratic: the products are an implementation detail
    close(native_out, ref_out)
    for i in writes:
        close(native_args[i], ref_args[i])
