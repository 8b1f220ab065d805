"""The op matrix, generated from tests/op_registry.py: for every op, device and dtype, native equals the
reference on fresh random inputs (outputs and every written argument), each written argument's version counter
moves by exactly one and every other argument is untouched, opcheck passes, and gradcheck passes where the op is
differentiable."""
import pytest
import torch

from op_registry import OPS, assert_same, clone_args, snapshot, tensors_of, unchanged

from clfast_testing import device_params, needs_native

DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.float64, id="float64")]
OP_PARAMS = [pytest.param(op, id=op.name) for op in OPS]


def _samples(op, device, dtype, seed=0):
    return op.samples(device, dtype, torch.Generator().manual_seed(seed))


@needs_native
@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OP_PARAMS)
def test_native_matches_reference(op, dtype, device):
    for seed in (0, 1):
        for args in _samples(op, device, dtype, seed):
            nat_args, ref_args = clone_args(args), clone_args(args)
            assert_same(op.nat()(*nat_args), op.ref()(*ref_args), nat_args, ref_args, op.written(args), dtype,
                        op.float32_tol)


@needs_native
@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("op", OP_PARAMS)
def test_version_counters(op, device):
    """As ATen's in-place ops: one bump per written tensor, none for what the op only reads."""
    for args in _samples(op, device, torch.float32):
        args = clone_args(args)
        written = {id(t) for i in op.written(args) for t in tensors_of([args[i]])}
        before = {id(t): t._version for t in tensors_of(args)}
        op.nat()(*args)
        for t in tensors_of(args):
            assert t._version - before[id(t)] == (1 if id(t) in written else 0), op.name


@needs_native
@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("op", OP_PARAMS)
def test_reference_writes_only_what_the_op_writes(op, device):
    for args in _samples(op, device, torch.float64):
        args = clone_args(args)
        read = [i for i in range(len(args)) if i not in op.writes]
        snap = snapshot([args[i] for i in read])
        op.ref()(*args)
        assert unchanged([args[i] for i in read], snap), op.name


@needs_native
@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("op", OP_PARAMS)
def test_opcheck(op, device):
    for args in _samples(op, device, torch.float64)[:2]:
        args = clone_args(args)
        for i in op.grad:
            for t in tensors_of([args[i]]):
                t.requires_grad_(True)
        torch.library.opcheck(op.nat(), args)


@needs_native
@pytest.mark.parametrize("op", [p for p in OP_PARAMS if p.values[0].grad])
def test_gradcheck(op):
    """The op's autograd against finite differences, for every differentiable input, in float64."""
    for args in _samples(op, "cpu", torch.float64)[:2]:
        args = clone_args(args)
        inputs = [t for i in op.grad for t in tensors_of([args[i]])]
        positions = [(i, k) for i in op.grad for k, t in enumerate(args[i] if isinstance(args[i], list)
                                                                    else [args[i]]) if t is not None]

        def fn(*flat):
            call = list(clone_args(args)) if op.writes else list(args)
            for (i, k), t in zip(positions, flat):
                if isinstance(call[i], list):
                    call[i] = list(call[i])
                    call[i][k] = t
                else:
                    call[i] = t
            out = op.nat()(*call)
            return out[0] if isinstance(out, tuple) else out

        torch.autograd.gradcheck(fn, [t.detach().requires_grad_(True) for t in inputs], eps=1e-6, atol=1e-5)
