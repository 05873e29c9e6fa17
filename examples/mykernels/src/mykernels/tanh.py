"""tanh as an autograd.Function (setup_context style): the plugin takes its gradient by autograd."""

import torch


class Tanh(torch.autograd.Function):
    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)  # the rule needs only the output

    @staticmethod
    def backward(ctx, dout: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return dout * (1 - y) * (1 + y)  # 1 - y*y loses bits to cancellation near |y| = 1


tanh = Tanh.apply
