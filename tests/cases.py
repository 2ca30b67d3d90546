"""Random adapter problems and their float64 truth, shared by the parity tests."""

from dataclasses import dataclass

import torch

from adapter_fused import reference_adapter


@dataclass
class Problem:
    """x (*lead, d); down_weight (r, d); down_bias (r,) | None; up_weight (d, r); up_bias (d,) | None;
    grad: the upstream gradient, shaped like x."""

    x: torch.Tensor
    down_weight: torch.Tensor
    down_bias: torch.Tensor | None
    up_weight: torch.Tensor
    up_bias: torch.Tensor | None
    grad: torch.Tensor

    @property
    def params(self) -> tuple[torch.Tensor | None, ...]:
        return (self.down_weight, self.down_bias, self.up_weight, self.up_bias)

    @property
    def inputs(self) -> tuple[torch.Tensor | None, ...]:
        return (self.x, *self.params)


def make_problem(lead: tuple[int, ...], d: int, r: int, dtype: torch.dtype, device: torch.device,
                 bias: bool = True, seed: int = 0) -> Problem:
    """Values of order one at every stage: weights scaled by 1/sqrt(fan-in), biases ~0.1."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dtype).to(device)

    return Problem(
        x=rand(*lead, d),
        down_weight=rand(r, d, std=d ** -0.5),
        down_bias=rand(r, std=0.1) if bias else None,
        up_weight=rand(d, r, std=r ** -0.5),
        up_bias=rand(d, std=0.1) if bias else None,
        grad=rand(*lead, d),
    )


def float64_truth(p: Problem, activation: str, scale: float) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Output and gradients of every input, in float64, from the same (rounded) values."""
    leaves = [None if t is None else t.detach().double().cpu().requires_grad_() for t in p.inputs]
    y = reference_adapter(*leaves, activation=activation, scale=scale)  # type: ignore[arg-type]
    y.backward(p.grad.double().cpu())
    return y.detach(), [None if t is None else t.grad for t in leaves]


def run_with_grads(fn, p: Problem, activation: str, scale: float,  # type: ignore[no-untyped-def]
                   requires: tuple[bool, ...] = (True,) * 5) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Run ``fn`` on leaf copies of the problem's inputs, backpropagate ``p.grad``; return y and grads."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(req) for t, req in zip(p.inputs, requires)]
    y = fn(*leaves, activation=activation, scale=scale)
    if y.requires_grad:
        y.backward(p.grad)
    return y.detach(), [None if t is None else t.grad for t in leaves]
