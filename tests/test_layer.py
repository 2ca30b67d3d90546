"""FusedAdapter: the module contract users rely on."""

import copy
import gc
import re
import weakref

import pytest
import torch
from torch import nn

from adapter_fused import ACTIVATIONS, FusedAdapter, fused_adapter, reference_adapter
from tests.conftest import DEVICE
from tests.tolerances import assert_matches


def test_state_dict_keys_and_parameter_count() -> None:
    layer = FusedAdapter(200, 24)
    assert list(layer.state_dict()) == ["down.weight", "down.bias", "up.weight", "up.bias"]
    assert isinstance(layer.down, nn.Linear) and isinstance(layer.up, nn.Linear)
    assert sum(p.numel() for p in layer.parameters()) == 2 * 200 * 24 + 24 + 200
    assert layer.d_model == 200 and layer.bottleneck == 24


def test_mam_init_is_exactly_the_identity() -> None:
    layer = FusedAdapter(48, 16, activation="gelu", init="mam").to(DEVICE)
    x = torch.randn(3, 5, 48, device=DEVICE)
    assert torch.equal(layer(x), x)
    assert layer.down.weight.abs().sum() > 0


def test_bert_and_houlsby_inits() -> None:
    torch.manual_seed(0)
    bert = FusedAdapter(512, 64, init="bert")
    assert abs(bert.down.weight.std().item() - 0.02) < 1e-3
    assert abs(bert.up.weight.std().item() - 0.02) < 1e-3
    houlsby = FusedAdapter(512, 64, init="houlsby")
    assert houlsby.down.weight.abs().max().item() <= 2e-2
    assert 0.005 < houlsby.up.weight.std().item() < 0.01  # a normal(0, 1e-2) cut at 2 sigma has std 8.8e-3
    for layer in (bert, houlsby):
        assert torch.count_nonzero(layer.down.bias) == 0 and torch.count_nonzero(layer.up.bias) == 0


@pytest.mark.parametrize("activation", ["relu", "swish", "gelu_new"])
def test_loads_an_eager_sequential_adapter(activation: str) -> None:
    torch.manual_seed(1)
    d, r = 64, 16
    eager = nn.Sequential(nn.Linear(d, r), _Act(activation), nn.Linear(r, d)).to(DEVICE)
    layer = FusedAdapter(d, r, activation=activation).to(DEVICE)
    state = {k.replace("0.", "down.").replace("2.", "up."): v for k, v in eager.state_dict().items()}
    layer.load_state_dict(state)
    x = torch.randn(4, 9, d, device=DEVICE, dtype=torch.float64).float()
    with torch.no_grad():
        truth = x.double() + eager.double()(x.double())
        assert_matches(layer(x), truth, torch.float32, "FusedAdapter vs eager adapter")


class _Act(nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.fn = ACTIVATIONS[name]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fn(h)


def test_forward_matches_reference_and_trains() -> None:
    layer = FusedAdapter(40, 8, activation="tanh", scale=0.5).to(DEVICE)
    x = torch.randn(7, 40, device=DEVICE)
    want = reference_adapter(x, layer.down.weight, layer.down.bias, layer.up.weight, layer.up.bias, "tanh", 0.5)
    assert_matches(layer(x), want.double(), torch.float32, "layer")
    layer(x).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


def test_dtype_and_device_arguments() -> None:
    layer = FusedAdapter(32, 8, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in layer.parameters())
    assert "activation='relu'" in repr(layer)


@pytest.mark.parametrize("kwargs, error", [
    (dict(d_model=0, bottleneck=8), ValueError),
    (dict(d_model=32, bottleneck=8.0), ValueError),
    (dict(d_model=32, bottleneck=8, activation="mish"), ValueError),
    (dict(d_model=32, bottleneck=8, init="xavier"), ValueError),
    (dict(d_model=32, bottleneck=8, scale=float("nan")), ValueError),
])
def test_bad_arguments(kwargs: dict, error: type) -> None:  # type: ignore[type-arg]
    with pytest.raises(error):
        FusedAdapter(**kwargs)


@pytest.mark.parametrize("with_residual", [False, True])
def test_module_calls_skip_validation_and_the_dispatcher(monkeypatch: pytest.MonkeyPatch, with_residual: bool) -> None:
    """A module call with its own, unchanged parameters validates nothing per call and does not go
    through the registered operator, with or without a separate residual; outputs and gradients are
    those of the validated op path."""
    from adapter_fused import library, ops
    from tests.cases import make_problem

    layer = FusedAdapter(48, 16, activation="gelu", scale=0.7).to(DEVICE)
    with torch.no_grad():
        layer.up.weight.normal_(std=0.2)
    p = make_problem((3, 5), 48, 16, torch.float32, DEVICE, seed=31)
    residual = torch.randn(3, 5, 48, device=DEVICE) if with_residual else None
    params = (layer.down.weight, layer.down.bias, layer.up.weight, layer.up.bias)
    want = fused_adapter(p.x, *params, "gelu", 0.7, residual=residual)
    checks, dispatched = [], []
    real_check, real_op = ops.check_adapter_args, library.adapter_forward
    monkeypatch.setattr(ops, "check_adapter_args", lambda *a, **k: checks.append(1) or real_check(*a, **k))
    monkeypatch.setattr(ops, "adapter_forward", lambda *a: dispatched.append(1) or real_op(*a))
    with torch.no_grad():
        got = layer(p.x, residual=residual)
    assert torch.equal(got, want) and got.shape == p.x.shape
    assert dispatched == [] and checks == []

    x = p.x.clone().requires_grad_()
    res = residual.clone().requires_grad_() if residual is not None else None
    layer(x, residual=res).backward(p.grad)
    assert dispatched == [] and checks == []
    fast = [x.grad, *(t.grad for t in params), *([res.grad] if res is not None else [])]
    if not ops.kernels_available(DEVICE):
        return
    leaves = [t.detach().clone().requires_grad_() for t in (p.x, *params)]
    res_leaf = residual.detach().clone().requires_grad_().reshape(-1, 48) if residual is not None else None
    y, _ = real_op(leaves[0].reshape(-1, 48), *leaves[1:], "gelu", 0.7, True, False, None, 1, res_leaf)
    y.backward(p.grad.reshape(-1, 48))
    slow = [t.grad for t in leaves] + ([p.grad] if residual is not None else [])
    for a, b in zip(fast, slow):
        assert a is not None and b is not None and torch.equal(a.reshape(b.shape), b)


def _count_checks(monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], list[int], list[int]]:
    """(module parameter checks, argument checks, kernels-availability questions), appended to per call."""
    from adapter_fused import ops, reference

    counts: tuple[list[int], list[int], list[int]] = ([], [], [])
    for target, name, into in ((ops, "check_module_parameters", counts[0]),
                               (ops, "check_adapter_args", counts[1]), (reference, "check_adapter_args", counts[1]),
                               (ops, "kernels_available", counts[2])):
        real = getattr(target, name)
        monkeypatch.setattr(target, name, lambda *a, _real=real, _into=into, **k: _into.append(1) or _real(*a, **k))
    return counts


def test_a_failed_parameter_check_is_kept_until_the_parameters_change(monkeypatch: pytest.MonkeyPatch) -> None:
    """A module whose parameters do not pass the once-checks (here a removed bias) checks them once,
    then each call is validated once on the general path, until a parameter changes."""
    torch.manual_seed(3)
    layer = FusedAdapter(24, 8, activation="silu").to(DEVICE)
    layer.up.register_parameter("bias", None)
    with torch.no_grad():
        layer.up.weight.normal_(std=0.2)
    module_checks, checks, asked = _count_checks(monkeypatch)
    x = torch.randn(2, 24, device=DEVICE)
    for _ in range(3):
        with torch.no_grad():
            got = layer(x)
    assert (len(module_checks), len(checks), len(asked)) == (1, 3, 3)
    want = reference_adapter(x.double(), layer.down.weight.double(), layer.down.bias.double(),
                             layer.up.weight.double(), None, "silu", 1.0)
    assert_matches(got, want, torch.float32, "no up bias")
    checks.clear()
    layer.up.bias = nn.Parameter(torch.zeros(24, device=DEVICE))  # checkable now
    for _ in range(3):
        with torch.no_grad():
            layer(x)
    assert (len(module_checks), len(checks), len(asked)) == (2, 0, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_the_plain_path_runs_the_reference_math_once_checked(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
                                                             ) -> None:
    """Where the kernels do not run the parameters (no Triton, or float64), a module call checks nothing
    per call and gives the reference's numbers exactly, with or without a residual and under autocast;
    bad input raises what fused_adapter raises. New storage for a parameter other than the down weight
    is used as it is; the down weight's (as moving or casting the module gives it) is checked again."""
    from adapter_fused import ops

    if dtype == torch.float32:
        monkeypatch.setattr(ops, "kernels_available", lambda device: False)
    torch.manual_seed(4)
    layer = FusedAdapter(24, 8, activation="gelu", scale=0.5).to(DEVICE, dtype)
    with torch.no_grad():
        layer.up.weight.normal_(std=0.2)
    params = (layer.down.weight, layer.down.bias, layer.up.weight, layer.up.bias)
    x = torch.randn(2, 3, 24, device=DEVICE, dtype=dtype)
    residual = torch.randn(2, 3, 24, device=DEVICE, dtype=dtype)
    wants = []
    for res in (None, residual):
        leaf = x.clone().requires_grad_()
        want = reference_adapter(leaf, *params, "gelu", 0.5, residual=res)
        want.backward(torch.ones_like(want))
        wants.append((want.detach(), leaf.grad))
    layer(x)
    module_checks, checks, asked = _count_checks(monkeypatch)
    for res, (want, want_grad) in zip((None, residual), wants):
        with torch.no_grad():
            assert torch.equal(layer(x, residual=res), want)
        leaf = x.clone().requires_grad_()
        y = layer(leaf, residual=res)
        y.backward(torch.ones_like(y))
        assert torch.equal(y.detach(), want) and torch.equal(leaf.grad, want_grad)  # type: ignore[arg-type]
    assert (module_checks, checks, asked) == ([], [], [])
    with torch.no_grad():  # new storage for a bias: the reference's operators take it as it is, unchecked
        layer.up.bias.data = torch.randn(24, device=DEVICE, dtype=dtype)
        got = layer(x)
        assert len(module_checks) == 0
        layer.down.weight.data = layer.down.weight.data.clone()  # the down weight's storage: checked again
        layer(x)
    assert (len(module_checks), checks) == (1, [])
    assert torch.equal(got, reference_adapter(x, *params, "gelu", 0.5))
    module_checks.clear()
    if dtype == torch.float32:
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            got = layer(x, residual=residual)
            want = reference_adapter(x, *params, "gelu", 0.5, residual=residual)
        assert got.dtype == torch.float32 and torch.equal(got, want)
    for bad, error, words in ((x[..., :-1], ValueError, "x.shape[-1] must equal d = down_weight.shape[-1] = 24"),
                              (x.half(), TypeError, "has dtype torch.float16")):
        with pytest.raises(error, match=re.escape(words)):
            layer(bad)
        with pytest.raises(error, match="fused_adapter"):
            fused_adapter(bad, *params, "gelu", 0.5)
    with pytest.raises(ValueError, match="residual must have the shape of x"):
        layer(x, residual=residual[:1])
    with pytest.raises(TypeError, match="residual has dtype torch.float16"):
        layer(x, residual=residual.half())
    layer.up.bias.requires_grad_(False)
    with torch.no_grad():
        layer.up.bias.resize_(23)  # in place, refused by the reference's operators: the library's error
    with pytest.raises(ValueError, match="up_bias must have shape"):
        layer(x)


def test_module_attributes_are_checked_when_set() -> None:
    layer = FusedAdapter(16, 4)
    layer.activation = "swish"
    assert layer.activation == "silu"
    with pytest.raises(ValueError, match="unknown activation"):
        layer.activation = "softplus"
    with pytest.raises(ValueError, match="finite"):
        layer.scale = float("nan")
    layer.scale = 2
    assert layer.scale == 2.0 and isinstance(layer.scale, float)


def test_a_replaced_parameter_is_validated_again() -> None:
    layer = FusedAdapter(16, 4).to(DEVICE)
    x = torch.randn(3, 16, device=DEVICE)
    layer.up.weight = torch.nn.Parameter(torch.randn(16, 5, device=DEVICE))
    with pytest.raises(ValueError, match="up_weight must have shape"):
        layer(x)
    layer.up.weight = torch.nn.Parameter(torch.randn(16, 4, device=DEVICE, dtype=torch.float16))
    with pytest.raises(TypeError, match="up_weight has dtype torch.float16"):
        layer(x)


def _truth(layer: FusedAdapter, x: torch.Tensor) -> torch.Tensor:
    params = [t.detach().double() for t in (layer.down.weight, layer.down.bias, layer.up.weight, layer.up.bias)]
    return reference_adapter(x.detach().double(), *params, layer.activation, layer.scale)


@pytest.mark.parametrize("grad", [False, True])
def test_checked_parameters_follow_every_change(grad: bool) -> None:
    """The once-checked parameters are checked again whenever a call could see them differently:
    a parameter replaced, the module converted (.double() and back), a parameter resized in place,
    new values through ``.data`` or an optimizer step; every result matches float64 truth."""
    torch.manual_seed(0)
    layer = FusedAdapter(32, 8, activation="gelu", scale=0.5).to(DEVICE)
    with torch.no_grad():
        layer.up.weight.normal_(std=0.2)
    x = torch.randn(2, 3, 32, device=DEVICE)

    def check(what: str) -> None:
        with torch.set_grad_enabled(grad):
            got = layer(x.to(layer.down.weight.dtype))
        assert_matches(got, _truth(layer, x), layer.down.weight.dtype, what)

    check("first call")
    check("second call")
    layer.up.weight = nn.Parameter(torch.randn(32, 8, device=DEVICE) * 0.3)
    check("replaced parameter")
    layer.double()
    check("after .double()")
    layer.float()
    check("back to float")
    layer.down.weight.data = torch.randn(8, 32, device=DEVICE) * 0.2
    check("new .data")
    layer.up.bias.data = torch.randn(32, device=DEVICE)
    check("new .data of the up bias")
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer(x).pow(2).mean().backward()
    optimizer.step()
    check("after an optimizer step")
    bias = layer.up.bias
    bias.requires_grad_(False)
    with torch.no_grad():
        bias.resize_(31)
    with pytest.raises(ValueError, match="up_bias must have shape"):
        layer(x)
    with torch.no_grad():
        bias.resize_(32).normal_()
    check("resized back in place")
    layer.activation, layer.scale = "relu", 2.0
    check("activation and scale set")


def _plans(layer: FusedAdapter) -> dict:  # type: ignore[type-arg]
    """The module's bound launches by key."""
    assert layer._checked is not None
    return layer._checked.plans


class _InterpretedCompiled:
    """A compiled-kernel stand-in for the interpreter: its launcher runs the interpreted kernel with
    the argument list a bound launch passes (every parameter, in signature order)."""

    def __init__(self, fn: object, launches: list[tuple[int, ...]]) -> None:
        self.fn, self.launches = fn, launches
        self.function, self.packed_metadata = "function", "metadata"

    def run(self, g0: int, g1: int, g2: int, stream: object, function: object, packed: object, metadata: object,
            enter: object, leave: object, *args: object) -> None:
        assert (stream, function, packed, metadata) == (7, "function", "metadata", None)
        self.launches.append((g0, g1, g2))
        self.fn[(g0, g1, g2)](*args)  # type: ignore[index]

    def launch_metadata(self, *args: object) -> None:
        return None


@pytest.fixture
def interpreted_binding(monkeypatch: pytest.MonkeyPatch
                        ) -> tuple[list[tuple[int, ...]], list[dict]]:  # type: ignore[type-arg]
    """Bound launches through an interpreted stand-in for the compiled kernel: (grids launched, the
    configs bound with)."""
    from adapter_fused import ops
    from adapter_fused.kernels import binding

    if DEVICE.type != "cpu" or not ops.kernels_available(DEVICE):
        pytest.skip("binds an interpreted stand-in for the compiled kernel")
    launches: list[tuple[int, ...]] = []
    bound_with: list[dict] = []  # type: ignore[type-arg]

    def compiled(fn, grid, args, config):  # type: ignore[no-untyped-def]
        bound_with.append(config)
        return _InterpretedCompiled(fn, launches)

    monkeypatch.setattr(binding, "_compiled_kernel", compiled)
    monkeypatch.setattr(binding, "_driver_functions", lambda: ((lambda: 0), (lambda index: 7)))
    return launches, bound_with


def test_bound_launch_bookkeeping(interpreted_binding) -> None:  # type: ignore[no-untyped-def]
    """The first no-grad call of a class of row counts binds the kernel; later calls of the class, any
    row count in it, launch it with only x, the residual, y, the row count and the scale filled in;
    results match float64 truth. An activation, a class or a set of parameters of its own gets a
    binding of its own; an unaligned or non-contiguous x or residual takes Triton's launcher."""
    from adapter_fused.kernels import binding, records

    launches, bound_with = interpreted_binding
    torch.manual_seed(1)
    layer = FusedAdapter(48, 16, activation="gelu", scale=0.7)
    with torch.no_grad():
        layer.up.weight.normal_(std=0.2)
        x = torch.randn(1, 20, 48)
        assert_matches(layer(x), _truth(layer, x), torch.float32, "binding call")
        assert launches == [] and len(bound_with) == 1 and bound_with[0]["BLOCK_M"] == 16
        (plan,) = _plans(layer).values()
        assert isinstance(plan, binding.BoundForward) and plan.block_m == 16
        fields = records.FusedRowsArgs._fields
        assert {fields[i] for i in plan.x_slots} == {"src_ptr", "saved_h_ptr", "mid_ptr", "res_ptr", "idx_ptr"}
        assert fields[plan.out_slot] == "out_ptr" and fields[plan.rows_slot] == "M"
        params = [layer.down.weight, layer.down.bias, layer.up.weight, layer.up.bias]
        kept = [v for v in plan.args if isinstance(v, torch.Tensor)]
        assert kept and all(any(v is p for p in params) for v in kept), "a bound launch keeps parameters only"
        for scale in (0.7, -1.5):
            layer.scale = scale
            x = torch.randn(1, 20, 48)
            assert_matches(layer(x), _truth(layer, x), torch.float32, f"bound launch, scale {scale}")
        assert launches == [(2, 1, 1), (2, 1, 1)]
        for lead in ((3, 7), (29,)):  # other row counts of the class: the same binding
            x = torch.randn(*lead, 48)
            assert_matches(layer(x), _truth(layer, x), torch.float32, f"bound launch, x {lead}")
        assert launches[2:] == [(2, 1, 1), (2, 1, 1)] and len(bound_with) == 1
        residual = torch.randn(29, 48)
        want = _truth(layer, x) - x.double() + residual.double()
        assert_matches(layer(x, residual=residual), want, torch.float32, "bound launch with a residual")
        assert len(launches) == 5 and len(_plans(layer)) == 1
        layer.activation = "relu"  # a binding of its own
        layer(x)
        assert_matches(layer(x), _truth(layer, x), torch.float32, "relu, bound")
        assert len(_plans(layer)) == 2 and len(launches) == 6
        x1 = torch.randn(1, 1, 48)  # a class of its own: one row, one program
        layer(x1)
        assert_matches(layer(x1), _truth(layer, x1), torch.float32, "one row, bound")
        assert launches[-1] == (1, 1, 1) and len(launches) == 7 and len(_plans(layer)) == 3
        tf32 = torch.backends.cuda.matmul.allow_tf32
        try:  # fp32: the dots' precision is bound too, so allowing TF32 binds again
            torch.backends.cuda.matmul.allow_tf32 = not tf32
            layer(x1)
            assert len(launches) == 7 and len(_plans(layer)) == 4 and len(bound_with) == 4
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        layer(x1)
        assert len(launches) == 8 and len(_plans(layer)) == 4
        buffer = torch.randn(29 * 48 + 1)
        unaligned = buffer[1:].view(29, 48)
        assert_matches(layer(unaligned), _truth(layer, unaligned), torch.float32, "unaligned x")
        strided = torch.randn(48, 29).t()
        assert_matches(layer(strided), _truth(layer, strided), torch.float32, "non-contiguous x")
        want = _truth(layer, x) - x.double() + strided.double()
        assert_matches(layer(x, residual=strided), want, torch.float32, "non-contiguous residual")
        assert len(launches) == 8  # all three went through Triton's launcher
        layer.down.weight = nn.Parameter(torch.randn(16, 48) * 0.2)
        layer(x)
        assert_matches(layer(x), _truth(layer, x), torch.float32, "replaced parameter, bound again")
        assert len(launches) == 9 and len(_plans(layer)) == 1
    y = layer(x.requires_grad_())  # autograd recording: never the bound launch
    assert len(launches) == 9 and y.grad_fn is not None
    duplicate = copy.deepcopy(layer)
    assert duplicate._checked is None and layer._checked is not None


def _tensors_held(obj: object, seen: set[int] | None = None) -> list[torch.Tensor]:
    """Every tensor reachable from ``obj`` through containers and the slots of a module's checked state
    and its bound launches."""
    from adapter_fused.kernels.binding import BoundForward
    from adapter_fused.ops import CheckedParameters

    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        children: list[object] = [*obj.keys(), *obj.values()]
    elif isinstance(obj, (list, tuple, set, frozenset)):
        children = list(obj)
    elif isinstance(obj, (CheckedParameters, BoundForward)):
        children = [getattr(obj, name) for name in type(obj).__slots__ if hasattr(obj, name)]
    else:
        return []
    return [t for child in children for t in _tensors_held(child, seen)]


@pytest.mark.parametrize("with_residual", [False, True])
def test_the_module_keeps_no_activations(interpreted_binding,  # type: ignore[no-untyped-def]
                                         with_residual: bool) -> None:
    """Called under no_grad on 100 prompt lengths, a module keeps nothing of them: every x, residual
    and y is freed once the caller drops it, its checked state holds no tensor but its parameters,
    and its bound launches number one per class of row counts, not one per length."""
    launches, _ = interpreted_binding
    torch.manual_seed(2)
    layer = FusedAdapter(16, 4, activation="silu")
    with torch.no_grad():
        layer.up.weight.normal_(std=0.3)
    alive: list[weakref.ref] = []  # type: ignore[type-arg]
    with torch.no_grad():
        for length in range(1, 101):
            x = torch.randn(1, length, 16)
            residual = torch.randn(1, length, 16) if with_residual else None
            y = layer(x, residual=residual)
            if length % 33 == 0:  # a few results checked: the launches are interpreted
                want = _truth(layer, x) + (0 if residual is None else residual.double() - x.double())
                assert_matches(y, want, torch.float32, f"length {length}")
                del want
            alive += [weakref.ref(t) for t in (x, y, residual) if t is not None]
            del x, y, residual
    gc.collect()
    assert not [ref for ref in alive if ref() is not None], "a call's tensors outlived the call"
    params = list(layer.parameters())
    held = _tensors_held(layer._checked)
    assert held and all(any(t is p for p in params) for t in held), [tuple(t.shape) for t in held]
    # rows 1..100: one row; 2..16, 32, 64, 96 and the rest of 17..100 in buckets 16, 32, 64 and 128
    assert len(_plans(layer)) == 9 and len(launches) == 100 - 9
