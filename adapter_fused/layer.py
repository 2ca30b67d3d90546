"""FusedAdapter: the drop-in nn.Module."""

import math

import torch
from torch import nn

from .activations import canonical_activation
from .ops import CheckedParameters, fused_adapter, module_forward

INITS = ("bert", "houlsby", "mam")


class FusedAdapter(nn.Module):
    """A bottleneck adapter ``y = x + scale * up(act(down(x)))`` running the fused kernel.

    ``down`` is ``nn.Linear(d_model, bottleneck)`` and ``up`` is ``nn.Linear(bottleneck, d_model)``,
    so the state dict keys are ``down.weight, down.bias, up.weight, up.bias`` and an eager adapter's
    weights load unchanged. Input (..., d_model), output the same shape.
    Parameters: 2 * d_model * bottleneck + bottleneck + d_model.

    init: ``"bert"`` (weights normal, std 0.02; biases zero), ``"houlsby"`` (weights truncated
    normal, std 1e-2, cut at two standard deviations; biases zero) or ``"mam"`` (down weight
    Kaiming-uniform, up weight and biases zero: the layer starts as the identity).
    """

    def __init__(
        self,
        d_model: int,
        bottleneck: int,
        activation: str = "relu",
        scale: float = 1.0,
        init: str = "bert",
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("bottleneck", bottleneck)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FusedAdapter: {name} must be a positive int, got {value!r}")
        if init not in INITS:
            raise ValueError(f"FusedAdapter: init must be one of {', '.join(INITS)}, got {init!r}")
        self.activation = activation
        self.scale = scale
        self.init = init
        self.down = nn.Linear(d_model, bottleneck, device=device, dtype=dtype)
        self.up = nn.Linear(bottleneck, d_model, device=device, dtype=dtype)
        self._shapes = ((bottleneck, d_model), (bottleneck,), (d_model, bottleneck), (d_model,))
        self._checked: CheckedParameters | None = None
        self.reset_parameters()

    @property
    def activation(self) -> str:
        """The canonical activation name (set any accepted alias; it is checked when set)."""
        return self._activation

    @activation.setter
    def activation(self, name: str) -> None:
        self._activation = canonical_activation(name)

    @property
    def scale(self) -> float:
        """The output scale s (a finite number, checked when set)."""
        return self._scale

    @scale.setter
    def scale(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"FusedAdapter: scale must be a finite number, got {value!r}")
        self._scale = float(value)

    @property
    def d_model(self) -> int:
        return self.down.in_features

    @property
    def bottleneck(self) -> int:
        return self.down.out_features

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialise the parameters with the scheme chosen by ``init``."""
        if self.init == "bert":
            nn.init.normal_(self.down.weight, std=0.02)
            nn.init.normal_(self.up.weight, std=0.02)
        elif self.init == "houlsby":
            nn.init.trunc_normal_(self.down.weight, std=1e-2, a=-2e-2, b=2e-2)
            nn.init.trunc_normal_(self.up.weight, std=1e-2, a=-2e-2, b=2e-2)
        else:
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., d_model) -> (..., d_model); with ``residual`` (shaped like x) the output is
        ``residual + scale * up(act(down(x)))``."""
        # The four parameters through the submodules' own tables (what attribute access returns, read
        # without nn.Module.__getattr__'s fallback chain: this is the hot path of batch-1 decoding).
        down, up = self._modules["down"]._parameters, self._modules["up"]._parameters  # type: ignore[union-attr]
        params = (down.get("weight"), down.get("bias"), up.get("weight"), up.get("bias"))
        if not torch.compiler.is_compiling():  # eager: the parameters checked once, kept in _checked
            y = module_forward(self.__dict__, "_checked", params, self._shapes, x,  # type: ignore[arg-type]
                               self._activation, self._scale, residual)
            if y is not None:
                return y
        if any(p is None for p in params):  # reparametrized (e.g. torch.nn.utils.parametrize): plain attributes
            params = (self.down.weight, self.down.bias, self.up.weight, self.up.bias)
        return fused_adapter(x, *params, self._activation, self._scale, residual=residual)  # type: ignore[arg-type]

    def __getstate__(self) -> dict[str, object]:
        """The module's state for pickling and deepcopy, without the checked-parameter cache (it
        holds compiled kernels and refers to these very tensors; a copy checks its own)."""
        state = dict(super().__getstate__())
        state["_checked"] = None
        return state

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, bottleneck={self.bottleneck}, activation={self.activation!r}, scale={self.scale}"
