"""BatchNorm statistics over every process of a data-parallel run, on CPUs (gloo) as well as GPUs.

torch.nn.SyncBatchNorm works on GPUs only: it refuses CPU tensors, and DistributedDataParallel
refuses it in a CPU model. The layer here computes the batch statistics from per-channel sums added
up over all processes, whose gradients are added up over all processes in turn on the way back.
Runs on GPUs (NCCL) keep torch's fused kernels.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from pytorch_lightning.plugins import TorchSyncBatchNorm
from torch import nn


class AllReduceSum(torch.autograd.Function):
    """The sum of a tensor over all processes; the gradient of each input is the sum of the gradients
    of all the outputs, since every process's output depends on every input."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        total = grad.clone()
        dist.all_reduce(total)
        return total


class SyncedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm of any dimension whose training statistics are those of the whole batch, all
    processes together; in evaluation, or in a single process, it is plain BatchNorm."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an input of 2 or more dimensions, got {x.dim()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        x32 = x.float()
        # Sums in float64, so that E[x^2] - E[x]^2 does not cancel away the variance.
        count = torch.tensor([x32.numel() // channels], dtype=torch.float64, device=x.device)
        local = torch.cat([x32.sum(dims, dtype=torch.float64), x32.square().sum(dims, dtype=torch.float64), count])
        total = AllReduceSum.apply(local)
        n = total[-1]
        mean = total[:channels] / n
        var = (total[channels : 2 * channels] / n - mean.square()).clamp_min(0)
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            momentum = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
            with torch.no_grad():
                self.running_mean.lerp_(mean.float(), momentum)
                self.running_var.lerp_((var * n / (n - 1)).float(), momentum)
        shape = [1, channels] + [1] * (x.dim() - 2)
        y = (x32 - mean.float().view(shape)) * torch.rsqrt(var.float() + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def synchronised(module: nn.Module) -> nn.Module:
    """module with every BatchNorm layer replaced by a SyncedBatchNorm sharing its parameters and statistics."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        synced = SyncedBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                 module.track_running_stats)
        synced.weight, synced.bias = module.weight, module.bias
        synced.running_mean, synced.running_var = module.running_mean, module.running_var
        synced.num_batches_tracked = module.num_batches_tracked
        return synced.train(module.training)
    for name, child in module.named_children():
        module.add_module(name, synchronised(child))
    return module


class BatchNormSync(TorchSyncBatchNorm):
    """Lightning's sync_batchnorm plugin, which it applies to data-parallel training only (after the
    processes have joined), made to work on CPUs too."""

    def apply(self, model: nn.Module) -> nn.Module:
        if dist.get_backend() == "nccl":
            return super().apply(model)
        return synchronised(model)
