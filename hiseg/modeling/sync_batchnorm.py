"""BatchNorm with the statistics of the batch of all processes, on GPUs and on CPU (gloo).

``torch.nn.SyncBatchNorm`` refuses CPU tensors, and detectron2's ``NaiveSyncBatchNorm`` is 4-D
only, needs affine parameters and updates ``running_var`` with the biased variance (a plain
BatchNorm on the same full batch stores the unbiased one). These subclasses of
``nn.BatchNorm1d`` / ``nn.BatchNorm2d`` keep their state-dict layout and, on W processes in
training mode, equal the plain BatchNorm run on the W batches concatenated: outputs, gradients
(through fvcore's differentiable all-reduce, the one detectron2's own SyncBN uses) and running
statistics.
"""
import torch
from detectron2.utils import comm
from fvcore.nn.distributed import differentiable_all_reduce
from torch import nn

__all__ = ["SyncBatchNorm1d", "SyncBatchNorm2d", "convert_to_sync_batchnorm", "differentiable_all_reduce"]


class _GlobalStatsBatchNorm:
    """BatchNorm whose training statistics are those of the batch of all processes.

    On one process, or in eval mode, it is the plain BatchNorm it derives from (same state dict,
    same numbers). With W processes in training mode: mean and biased variance over the
    concatenated batch (two-pass, through a differentiable all-reduce, so the gradient flows
    to every process's inputs as in one process), the running statistics updated with them
    (unbiased variance, as ``nn.BatchNorm``). Unlike ``torch.nn.SyncBatchNorm`` it also runs on
    CPU (gloo) and processes may hold different batch sizes."""

    def forward(self, x):
        if not (self.training and comm.get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        local = x.new_tensor([x.numel() / x.shape[1]])
        sums = differentiable_all_reduce(torch.cat([x.sum(dims), local]))
        n = sums[-1].clamp(min=1.0)
        mean = sums[:-1] / n
        var = differentiable_all_reduce(((x - mean.view(shape)) ** 2).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_((var * n / (n - 1).clamp(min=1.0)).detach(), alpha=m)
        y = (x - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


class SyncBatchNorm1d(_GlobalStatsBatchNorm, nn.BatchNorm1d):
    pass


class SyncBatchNorm2d(_GlobalStatsBatchNorm, nn.BatchNorm2d):
    pass


_SYNC_BN = {nn.BatchNorm1d: SyncBatchNorm1d, nn.BatchNorm2d: SyncBatchNorm2d}


def convert_to_sync_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every ``nn.BatchNorm1d`` / ``nn.BatchNorm2d`` replaced by its synchronised
    variant, parameters, buffers, ``requires_grad`` and train / eval mode kept."""
    out = module
    cls = _SYNC_BN.get(type(module))
    if cls is not None:
        out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        if module.track_running_stats:
            out.running_mean, out.running_var = module.running_mean, module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_to_sync_batchnorm(child))
    return out
