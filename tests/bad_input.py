"""The bad-input suite: every op of tests/op_registry.py, and every module, fed wrong dtypes, devices (meta
too), shapes, strides, aliasing outputs, unwritable outputs, empty lists, NaN and out-of-range values.

For an op, each case runs on the native backend and on the reference. Its outcome is one of:
  same-result   both return, with equal outputs and written arguments;
  same-error    both raise the same exception class, and neither changed any argument (values, shapes,
                strides, version counters);
and every other outcome is a defect: wrong-result, error-mismatch (one raises, or the classes differ),
state-changed (raised after writing). A crash kills the process that runs the cases: tests/test_bad_input.py
runs each op family in a subprocess, so a crash is a failing test.

Run as a script: ``python tests/bad_input.py FAMILY...`` prints one JSON object per case.
"""
from __future__ import annotations

import json
import math
import os
import sys
import traceback
from typing import Callable, Iterator, List, Tuple

import torch
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from op_registry import OPS, assert_same, clone_args, snapshot, unchanged  # noqa: E402

import clfast  # noqa: E402

Case = Tuple[str, Callable[[tuple], tuple]]


def _tensor_slots(args) -> List[Tuple[int, int]]:
    """(argument, list index or -1) of every tensor argument; for a list, its first and last element."""
    out = []
    for i, a in enumerate(args):
        if isinstance(a, Tensor):
            out.append((i, -1))
        elif isinstance(a, list) and a and all(isinstance(t, Tensor) or t is None for t in a):
            out += [(i, 0)] + ([(i, len(a) - 1)] if len(a) > 1 else [])
    return out


def _get(args, i, k):
    return args[i] if k < 0 else args[i][k]


def _set(args, i, k, value):
    args = list(args)
    if k < 0:
        args[i] = value
    else:
        args[i] = list(args[i])
        args[i][k] = value
    return tuple(args)


def _other_tensor(args, i, k) -> Tensor:
    """Another argument's tensor of the same shape and dtype, to alias with (None if there is none)."""
    t = _get(args, i, k)
    for j, kk in _tensor_slots(args):
        if (j, kk) != (i, k):
            o = _get(args, j, kk)
            if isinstance(o, Tensor) and o.shape == t.shape and o.dtype == t.dtype and o.data_ptr() != t.data_ptr():
                return o
    return None


def _noncontig(t: Tensor) -> Tensor:
    if t.dim() >= 2:
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    wide = torch.empty(t.shape + (2,), dtype=t.dtype, device=t.device)
    wide[..., 0] = t
    return wide[..., 0]


def _with_nan(t: Tensor) -> Tensor:
    t = t.clone()
    if t.numel():
        t[(0,) * t.dim()] = math.nan  # clone keeps the strides: no flat view of a transposed tensor
    return t


def op_cases(op) -> Iterator[Tuple[str, tuple]]:
    """Mutations of the op's first sample (float32, CPU)."""
    base = op.samples("cpu", torch.float32, torch.Generator().manual_seed(0))[0]
    writes = op.written(base)
    for i, k in _tensor_slots(base):
        t = _get(base, i, k)
        if t is None:
            continue
        where = f"arg{i}" + (f"[{k}]" if k >= 0 else "")
        floating = t.dtype.is_floating_point
        if floating:
            yield f"{where}:int64", _set(base, i, k, t.to(torch.int64))
            yield f"{where}:float64", _set(base, i, k, t.double())
            yield f"{where}:float16", _set(base, i, k, t.half())
            yield f"{where}:nan", _set(base, i, k, _with_nan(t))
            yield f"{where}:huge", _set(base, i, k, torch.full_like(t, 1e30))
            yield f"{where}:negative", _set(base, i, k, -t.abs() - 1)
        else:
            yield f"{where}:float", _set(base, i, k, t.float())
        yield f"{where}:meta", _set(base, i, k, t.to("meta"))
        yield f"{where}:shape", _set(base, i, k, torch.zeros((t.shape[0] + 1,) + t.shape[1:] if t.dim() else (2,),
                                                             dtype=t.dtype))
        yield f"{where}:0-dim", _set(base, i, k, torch.zeros((), dtype=t.dtype))
        yield f"{where}:noncontiguous", _set(base, i, k, _noncontig(t))
        if i in writes:
            if t.numel() > 1:
                yield f"{where}:expanded", _set(base, i, k, t.view(-1)[:1].expand(t.shape) if t.dim() else t)
            other = _other_tensor(base, i, k)
            if other is not None:
                yield f"{where}:aliases-input", _set(base, i, k, other)
            if t.dim() >= 2 and t.numel() > 1:  # every stride 1: rows overlap each other
                yield f"{where}:overlaps-itself", _set(base, i, k, torch.randn(t.numel()).as_strided(
                    t.shape, [1] * t.dim()))
            with torch.inference_mode():
                inf = t.clone()
            yield f"{where}:inference-tensor", _set(base, i, k, inf)
    # For the multi-tensor ops, a variant whose list elements all have one shape, so that aliasing within a list
    # reaches the memory checks instead of the shape checks.
    uniform = tuple([torch.randn_like(a[0]) for _ in a] if isinstance(a, list) and a and isinstance(a[0], Tensor)
                    else a for a in base) if op.family in ("si", "optim") else None
    for i, a in enumerate(base):
        if isinstance(a, list) and a and isinstance(a[0], Tensor):
            yield f"arg{i}:empty-list", _set(base, i, -1, [])
            if len(a) > 1:
                yield f"arg{i}:short-list", _set(base, i, -1, a[:-1])
                if uniform is not None:
                    yield f"arg{i}:same-tensor-twice", _set(uniform, i, -1, [uniform[i][0]] * len(a))
        elif isinstance(a, bool):
            yield f"arg{i}:flipped", _set(base, i, -1, not a)
        elif isinstance(a, float):
            for name, v in (("nan", math.nan), ("inf", math.inf), ("negative", -abs(a) - 1.0), ("zero", 0.0),
                            ("above-one", 1.5)):
                yield f"arg{i}:{name}", _set(base, i, -1, v)
        elif isinstance(a, int):
            for name, v in (("negative", -3), ("huge", 2 ** 63 - 2), ("zero", 0)):
                yield f"arg{i}:{name}", _set(base, i, -1, v)
        elif isinstance(a, str):
            yield f"arg{i}:unknown", _set(base, i, -1, "bogus")
    # Two outputs that are views of one buffer and overlap; two that interleave without overlapping (allowed).
    if uniform is not None:
        for i in writes:
            if isinstance(uniform[i], list) and len(uniform[i]) > 1:
                shape, n = uniform[i][0].shape, uniform[i][0].numel()
                buf = torch.randn(n + 1)
                yield f"arg{i}:overlapping-views", _set(_set(uniform, i, 0, buf[:n].view(shape)), i, 1,
                                                        buf[1:].view(shape))
                pair = torch.randn(n, 2)
                yield f"arg{i}:interleaved-views", _set(_set(uniform, i, 0, pair[:, 0].view(shape)), i, 1,
                                                        pair[:, 1].view(shape))
                # an output that aliases another list's input at another index
                others = [j for j in range(len(uniform)) if j != i and isinstance(uniform[j], list)
                          and len(uniform[j]) > 1]
                if others:
                    yield f"arg{i}:aliases-arg{others[0]}[1]", _set(uniform, i, 0, uniform[others[0]][1])


def _call(fn, args):
    try:
        return fn(*args), None
    except Exception as exc:  # noqa: BLE001 - the class is the result
        return None, exc


def run_op_case(op, name: str, args: tuple) -> dict:
    nat_args, ref_args = clone_args(args), clone_args(args)
    nat_snap, ref_snap = snapshot(nat_args), snapshot(ref_args)
    nat_out, nat_exc = _call(op.nat(), nat_args)
    ref_out, ref_exc = _call(op.ref(), ref_args)
    rec = {"kind": "op", "op": op.name, "family": op.family, "case": name,
           "native": type(nat_exc).__name__ if nat_exc else "ok",
           "reference": type(ref_exc).__name__ if ref_exc else "ok",
           "message": str(nat_exc or ref_exc or "").splitlines()[0][:200] if (nat_exc or ref_exc) else ""}
    if nat_exc is None and ref_exc is None:
        try:
            writes = op.written(args)
            assert_same(nat_out, ref_out, nat_args, ref_args, writes, torch.float32, op.float32_tol)
            rec["outcome"] = "same-result"
        except AssertionError as exc:
            rec["outcome"], rec["detail"] = "wrong-result", str(exc).splitlines()[0][:300]
    elif nat_exc is not None and ref_exc is not None:
        if type(nat_exc) is not type(ref_exc):
            rec["outcome"] = "error-mismatch"
            rec["detail"] = f"native: {str(nat_exc)[:150]} | reference: {str(ref_exc)[:150]}"
        elif not unchanged(nat_args, nat_snap) or not unchanged(ref_args, ref_snap):
            rec["outcome"] = "state-changed"
            rec["detail"] = ("native" if not unchanged(nat_args, nat_snap) else "reference") + " changed its arguments"
        else:
            rec["outcome"] = "same-error"
    else:
        rec["outcome"] = "error-mismatch"
        rec["detail"] = f"native: {nat_exc!s:.150} | reference: {ref_exc!s:.150}"
    return rec


# ---- modules ------------------------------------------------------------------------------------------------------


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def _state(obj) -> list:
    """A comparable picture of a module's (or helper's) state: every tensor it reaches, with versions."""
    out = []

    def visit(x):
        if isinstance(x, Tensor):
            value = x.detach().clone() if x.device.type != "meta" else torch.zeros(())
            out.append((tuple(x.shape), x.dtype, x._version, value))
        elif isinstance(x, dict):
            for key in sorted(x, key=str):
                out.append(("key", str(key)))
                visit(x[key])
        elif isinstance(x, (list, tuple)):
            for y in x:
                visit(y)
        elif isinstance(x, (int, float, str, bool)) or x is None:
            out.append(x)
    visit(obj)
    return out


def _same_state(a, b) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, tuple) and len(x) == 4 and isinstance(x[3], Tensor):
            if x[:3] != y[:3] or not torch.equal(x[3].nan_to_num(1234.5), y[3].nan_to_num(1234.5)):
                return False
        elif x != y and not (isinstance(x, float) and math.isnan(x) and math.isnan(y)):
            return False
    return True


def module_cases() -> Iterator[Tuple[str, Callable[[], Tuple[Callable, Callable]], type]]:
    """(name, setup, expected exception): setup() returns (the call, a function that returns the state it may
    not change)."""
    def si_grad_dtype():
        net = _mlp()
        si = clfast.SI(net)
        for p in net.parameters():
            p.grad = torch.ones_like(p)
        net[0].weight.grad.data = net[0].weight.grad.data.double()
        si.before_step()
        return si.after_step, lambda: [si.omega, si.importance, si.prev]

    def si_after_without_before():
        net = _mlp()
        si = clfast.SI(net)
        for p in net.parameters():
            p.grad = torch.ones_like(p)
        return si.after_step, lambda: [si.omega]

    def si_nan_consolidate():
        net = _mlp()
        si = clfast.SI(net)
        with torch.no_grad():
            si.omega[0][0, 0] = math.nan
        return si.consolidate, lambda: [si.omega, si.importance, si.prev]

    def si_load_bad_shape():
        net = _mlp()
        si = clfast.SI(net)
        bad = si.state_dict()
        bad[next(iter(bad))] = torch.zeros(2)
        return (lambda: si.load_state_dict(bad)), lambda: [si.omega, si.importance, si.prev]

    def si_epsilon():
        return (lambda: clfast.SI(_mlp(), epsilon=-1.0)), lambda: []

    def optimizer(kind, mutate):
        def setup():
            net = _mlp()
            si = clfast.SI(net)
            opt = (clfast.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, si=si) if kind == "sgd"
                   else clfast.optim.Adam(net.parameters(), lr=0.1, si=si))
            for p in net.parameters():
                p.grad = torch.ones_like(p)
            mutate(net, si)
            return opt.step, lambda: [list(net.parameters()), opt.state_dict(), si.omega]
        return setup

    def grad_dtype(net, si):
        net[2].bias.grad.data = net[2].bias.grad.data.double()

    def omega_device(net, si):
        si.omega[1] = si.omega[1].to("meta")

    def grad_alias(net, si):
        net[2].weight.grad = si.omega[2]

    def reservoir_bad_field():
        buf = clfast.ReservoirBuffer(4)
        buf.add(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
        return (lambda: buf.add(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))), lambda: [buf.state_dict()]

    def reservoir_bad_load(num_seen):
        def setup():
            buf = clfast.ReservoirBuffer(4)
            buf.add(torch.zeros(2, 3))
            state = buf.state_dict()
            state["num_seen"] = num_seen
            return (lambda: buf.load_state_dict(state)), lambda: [buf.state_dict()]
        return setup

    def reservoir_overflow():
        buf = clfast.ReservoirBuffer(4)
        buf.add(torch.zeros(4, 3))
        buf.num_seen = 2 ** 63 - 2
        return (lambda: buf.add(torch.ones(3, 3))), lambda: [buf.state_dict()]

    def reservoir_capacity():
        return (lambda: clfast.ReservoirBuffer(0)), lambda: []

    def databuffer_bad():
        buf = clfast.DataBuffer(3)
        buf.update_buffer([(torch.zeros(2), torch.tensor(0))] * 4)
        return (lambda: buf.update_buffer([(torch.zeros(5), torch.tensor(1))])), lambda: [buf.buffer,
                                                                                          buf.num_seen_examples]

    def cbp_setup(mutate):
        def setup():
            torch.manual_seed(0)
            net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
            cbp = clfast.CBP(net, replacement_rate=0.5, maturity_threshold=1)
            for _ in range(3):
                net(torch.randn(8, 4))
                cbp.step()
            net(torch.randn(8, 4))
            acts = mutate(cbp)
            return (lambda: cbp.step(acts)), lambda: [cbp.state_dict(), list(net.parameters())]
        return setup

    def dan_setup(x_fn, **kw):
        def setup():
            torch.manual_seed(0)
            layer = clfast.nn.DANLayer(3, 4, 5, 2, **kw)
            return (lambda: layer(x_fn())), lambda: [layer.state_dict()]
        return setup

    def ewc_dtype():
        from torch.utils.data import DataLoader, TensorDataset
        net = _mlp()
        ewc = clfast.EWC(net, "diag")
        ewc.consolidate(DataLoader(TensorDataset(torch.randn(16, 4), torch.randint(0, 3, (16,))), batch_size=8))
        net.double()
        return ewc.penalty, lambda: [ewc.state_dict()]

    yield "SI.after_step: gradient of another dtype", si_grad_dtype, RuntimeError
    yield "SI.after_step: no before_step", si_after_without_before, ValueError
    yield "SI.consolidate: NaN running estimate", si_nan_consolidate, ValueError
    yield "SI.load_state_dict: wrong shape", si_load_bad_shape, ValueError
    yield "SI: negative epsilon", si_epsilon, ValueError
    for kind in ("sgd", "adam"):
        yield f"optim.{kind}: gradient of another dtype", optimizer(kind, grad_dtype), RuntimeError
        yield f"optim.{kind}: SI state on another device", optimizer(kind, omega_device), RuntimeError
        yield f"optim.{kind}: gradient aliasing SI's omega", optimizer(kind, grad_alias), RuntimeError
    yield "ReservoirBuffer.add: wrong item shape", reservoir_bad_field, ValueError
    yield "ReservoirBuffer.load_state_dict: num_seen -1", reservoir_bad_load(-1), ValueError
    yield "ReservoirBuffer.load_state_dict: num_seen 2^63", reservoir_bad_load(2 ** 63), ValueError
    yield "ReservoirBuffer.load_state_dict: num_seen 1.5", reservoir_bad_load(1.5), ValueError
    yield "ReservoirBuffer.add: stream index overflow", reservoir_overflow, OverflowError
    yield "ReservoirBuffer: capacity 0", reservoir_capacity, ValueError
    yield "DataBuffer.update_buffer: wrong item shape", databuffer_bad, ValueError
    yield "CBP.step: activations of the wrong width", cbp_setup(
        lambda cbp: {cbp.layer_names[0]: torch.randn(8, 5)}), RuntimeError
    yield "CBP.step: missing activations", cbp_setup(lambda cbp: {}), RuntimeError
    yield "CBP.step: empty batch", cbp_setup(lambda cbp: {cbp.layer_names[0]: torch.randn(0, 6)}), RuntimeError
    yield "DANLayer: wrong input width", dan_setup(lambda: torch.randn(8, 7)), ValueError
    yield "DANLayer: int input", dan_setup(lambda: torch.ones(8, 4, dtype=torch.long)), TypeError
    yield "DANLayer: negative eps", dan_setup(lambda: torch.randn(8, 4), eps=-1.0), ValueError
    yield "DANLayer: batch of one in train mode", dan_setup(lambda: torch.randn(1, 4)), ValueError
    yield "EWC.penalty: model converted after consolidate", ewc_dtype, RuntimeError

    def ocar_setup(mutate, **kw):
        def setup():
            net = _mlp()
            buf = clfast.ReservoirBuffer(8, generator=torch.Generator().manual_seed(0))
            opt = torch.optim.SGD(net.parameters(), lr=0.1)
            ocar = clfast.OCAR(net, buf, opt, **kw)
            x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
            ocar.step(x, y)
            x2, y2 = mutate(x, y)
            return (lambda: ocar.step(x2, y2)), lambda: [list(net.parameters()), buf.state_dict()]
        return setup

    yield "OCAR.step: wrong input width", ocar_setup(lambda x, y: (torch.randn(8, 5), y)), ValueError
    yield "OCAR.step: labels out of range", ocar_setup(lambda x, y: (x, y + 7)), IndexError
    yield "OCAR.step: batch sizes differ", ocar_setup(lambda x, y: (x, y[:5])), ValueError
    yield "OCAR: damping 0", ocar_setup(lambda x, y: (x, y), damping=0.0), ValueError

    def si_functional_no_grad():
        net = _mlp()
        params = list(net.parameters())
        clfast.si.si_pre_optim_step(net, params)
        return (lambda: clfast.si.si_post_optim_step(net, params)), lambda: [dict(net.named_buffers())]

    def si_functional_no_pre():
        net = _mlp()
        params = list(net.parameters())
        clfast.si.si_pre_optim_step(net, params, no_pre_step_ckpt=True)
        for p in params:
            p.grad = torch.ones_like(p)
        return (lambda: clfast.si.si_post_optim_step(net, params)), lambda: [dict(net.named_buffers())]

    def si_functional_epsilon():
        net = _mlp()
        params = list(net.parameters())
        clfast.si.si_pre_optim_step(net, params)
        for p in params:
            p.grad = torch.ones_like(p)
        clfast.si.si_post_optim_step(net, params)
        return (lambda: clfast.si.si_compute_importance(net, params, epsilon=0.0)), lambda: [dict(net.named_buffers())]

    yield "si.si_post_optim_step: no gradients", si_functional_no_grad, ValueError
    yield "si.si_post_optim_step: no pre-step checkpoint", si_functional_no_pre, ValueError
    yield "si.si_compute_importance: epsilon 0", si_functional_epsilon, ValueError

    def dan_model(x_fn):
        def setup():
            torch.manual_seed(0)
            model = clfast.nn.DAN(6, 3)
            return (lambda: model(x_fn())), lambda: [model.state_dict()]
        return setup

    yield "DAN: wrong input width", dan_model(lambda: torch.randn(8, 5)), ValueError
    yield "DAN: float64 input to a float32 model", dan_model(lambda: torch.randn(8, 6).double()), TypeError

    def vecdan(x_fn):
        def setup():
            torch.manual_seed(0)
            model = clfast.nn.VECDAN(6, 3)
            return (lambda: model(x_fn())), lambda: [model.state_dict()]
        return setup

    yield "VECDAN: wrong input width", vecdan(lambda: torch.randn(8, 5)), ValueError

    def cbp_tied():
        net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(),
                            nn.Linear(6, 3))
        net[4].weight = net[2].weight
        return (lambda: clfast.CBP(net)), lambda: [list(net.parameters())]

    def optim_bf16(kind):
        def setup():
            p = [nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2, dtype=torch.bfloat16))]
            opt = clfast.optim.SGD(p, lr=0.1) if kind == "sgd" else clfast.optim.Adam(p, lr=0.1)
            for t in p:
                t.grad = torch.ones_like(t)
            return opt.step, lambda: [p, opt.state_dict()]
        return setup

    def ocar_int32_labels():
        net = _mlp()
        buf = clfast.ReservoirBuffer(8, generator=torch.Generator().manual_seed(0))
        ocar = clfast.OCAR(net, buf, torch.optim.SGD(net.parameters(), lr=0.1))
        ocar.step(torch.randn(8, 4), torch.randint(0, 3, (8,)))
        x, y = torch.randn(8, 4), torch.randint(0, 3, (8,), dtype=torch.int32)
        return (lambda: ocar.step(x, y)), lambda: [list(net.parameters()), buf.state_dict(), ocar.steps]

    def reservoir_bad_dtype_keeps_generator():
        buf = clfast.ReservoirBuffer(4, generator=torch.Generator().manual_seed(0))
        buf.add(torch.zeros(6, 3), torch.zeros(6, dtype=torch.long))
        return (lambda: buf.add(torch.zeros(2, 3), torch.zeros(2, dtype=torch.int32))), lambda: [buf.state_dict()]

    yield "CBP: tied weights", cbp_tied, ValueError
    yield "optim.sgd: a bfloat16 parameter", optim_bf16("sgd"), TypeError
    yield "optim.adam: a bfloat16 parameter", optim_bf16("adam"), TypeError
    yield "OCAR.step: int32 labels for an int64 buffer", ocar_int32_labels, ValueError
    yield "ReservoirBuffer.add: wrong dtype", reservoir_bad_dtype_keeps_generator, ValueError


def run_module_case(name, setup, expected) -> dict:
    rec = {"kind": "module", "op": name.split(":")[0], "family": "modules", "case": name, "expected": expected.__name__}
    try:
        call, state = setup()
    except expected as exc:  # the constructor refused
        rec.update(outcome="same-error", native=type(exc).__name__, message=str(exc).splitlines()[0][:200])
        return rec
    before = _state(state())
    try:
        call()
        rec.update(outcome="not-refused", native="ok")
    except Exception as exc:  # noqa: BLE001
        rec["native"], rec["message"] = type(exc).__name__, str(exc).splitlines()[0][:200]
        if not isinstance(exc, expected):
            rec["outcome"] = "error-mismatch"
        elif not _same_state(before, _state(state())):
            rec["outcome"] = "state-changed"
        else:
            rec["outcome"] = "same-error"
    return rec


DEFECTS = ("wrong-result", "error-mismatch", "state-changed", "not-refused", "harness-error")


def main(families: List[str]) -> None:
    for op in OPS:
        if op.family not in families:
            continue
        for name, args in op_cases(op):
            try:
                rec = run_op_case(op, name, args)
            except Exception:  # noqa: BLE001 - a broken case is reported, not hidden
                rec = {"kind": "op", "op": op.name, "family": op.family, "case": name, "outcome": "harness-error",
                       "detail": traceback.format_exc(limit=3)[-300:]}
            print(json.dumps(rec), flush=True)
    if "modules" in families:
        for name, setup, expected in module_cases():
            try:
                rec = run_module_case(name, setup, expected)
            except Exception:  # noqa: BLE001
                rec = {"kind": "module", "op": name, "family": "modules", "case": name, "outcome": "harness-error",
                       "detail": traceback.format_exc(limit=3)[-300:]}
            print(json.dumps(rec), flush=True)


FAMILIES = ("si", "optim", "cbp", "reservoir", "kron", "dan", "fisher", "modules")


def tally(path: str) -> None:
    """Runs every family in a child process each and writes the table of outcomes as markdown."""
    import collections
    import subprocess
    rows, crashes = [], []
    for family in FAMILIES:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), family], capture_output=True, text=True,
                              env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
        if proc.returncode:
            crashes.append(f"{family}: exit {proc.returncode}")
        rows += [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    by_op = collections.OrderedDict()
    for r in rows:
        by_op.setdefault((r["family"], r["op"]), collections.Counter())[r["outcome"]] += 1
    total = collections.Counter(r["outcome"] for r in rows)
    cols = ["same-result", "same-error"] + list(DEFECTS)
    lines = ["# Bad-input suite", "",
             "`python tests/bad_input.py --tally benchmarks/results/bad-input.md` (each family in its own process; "
             "`tests/test_bad_input.py` runs the same cases in CI). Cases per op: every tensor argument (for a list, "
             "its first and last element) as int64 / float64 / float16 / NaN / 1e30 / negative / meta / wrong shape / "
             "0-dim / non-contiguous, and, where the op writes it, as an expanded view, an alias of an input, an "
             "inference tensor; every list empty, short, or the same tensor twice; every scalar NaN / inf / negative "
             "/ 0 / 1.5 (ints: -3, 2^63 - 2, 0); two outputs that are overlapping views of one buffer. Module cases "
             "check that a refused call leaves the module's whole state (values and version counters) unchanged.",
             "", f"{len(rows)} cases; crashes: {', '.join(crashes) if crashes else 'none'}.", "",
             "| family | op / module | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for (family, op), c in by_op.items():
        lines.append(f"| {family} | {op} | " + " | ".join(str(c.get(k, 0)) for k in cols) + " |")
    lines.append("| **all** | | " + " | ".join(f"**{total.get(k, 0)}**" for k in cols) + " |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"{len(rows)} cases, {sum(total[k] for k in DEFECTS)} defects, {len(crashes)} crashes -> {path}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--tally"]:
        tally(sys.argv[2])
    else:
        main(sys.argv[1:])
