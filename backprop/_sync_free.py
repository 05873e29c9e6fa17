"""The sync-free ``prepare``s of the custom ops (backprop.library): ``prepare`` reads targets and
indices on the host to raise a message naming the offending entry; in a custom op that would be a
device sync inside a compiled graph. Here the range check is a device-side ``torch._assert_async``;
on the CPU (where there is nothing to sync with) a failed check calls the module's own
``prepare``, which raises its usual message."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from backprop import cross_entropy, embedding, linear_cross_entropy


def _range_checked(ok: torch.Tensor, message: str, eager_prepare: Callable[[], Any]) -> None:
    """Assert ok (a 0-d bool) without a host sync. On real CPU tensors, a failure re-runs the
    module's prepare, which raises the eager message (offending value and its index)."""
    if ok.device.type == "cpu" and not torch._subclasses.fake_tensor.is_fake(ok):
        if not bool(ok):
            eager_prepare()
        return
    torch._assert_async(ok, message)


def _class_targets(args: Any, targets: torch.Tensor, C: int, ignore_index: int,
                   eager_prepare: Callable[[], Any]) -> Any:
    """Class-index targets checked on the device: each in [0, C) or ignore_index. Ignored rows
    are masked (``valid``), given a gatherable index, and the 'mean' denominator stays a 0-d
    tensor (forward_math and backward_math divide by it as by an int)."""
    valid = targets != ignore_index  # targets' shape
    ok = (~valid | ((targets >= 0) & (targets < C))).all()
    _range_checked(ok, f"targets must lie in [0, {C}) (or ignore_index={ignore_index})", eager_prepare)
    return args._replace(targets=torch.where(valid, targets, 0), valid=valid, count=valid.sum())


def _cross_entropy_prepare(logits, targets, *, weight=None, reduction="mean", ignore_index=-100,
                           label_smoothing=0.0):
    """cross_entropy.prepare without host reads (_class_targets)."""
    # check takes int64 and uint8 class indices, as torch does, and widens uint8 to int64
    args = cross_entropy.check(logits, targets, weight=weight, reduction=reduction,
                               ignore_index=ignore_index, label_smoothing=label_smoothing)
    if targets.is_floating_point():
        return args  # class probabilities: nothing to read
    C = logits.shape[1] if logits.ndim >= 2 else logits.shape[0]
    return _class_targets(args, args.targets, C, ignore_index, lambda: cross_entropy.prepare(
        logits, targets, weight=weight, reduction=reduction, ignore_index=ignore_index,
        label_smoothing=label_smoothing))


def _embedding_prepare(indices, weight, *, padding_idx=None, max_norm=None, norm_type=2.0,
                       scale_grad_by_freq=False, sparse=False, deterministic=True):
    """embedding.prepare without host reads: its checks on an empty view of indices (every check but
    the range one reads dtypes, shapes and options only), the range check on the device.
    sparse=True is refused: a custom op's backward declares dense gradients (its fake kernel)."""
    options = dict(padding_idx=padding_idx, max_norm=max_norm, norm_type=norm_type,
                   scale_grad_by_freq=scale_grad_by_freq, sparse=sparse, deterministic=deterministic)
    args = embedding.prepare(indices.reshape(-1)[:0], weight, **options)
    if sparse:
        raise ValueError("sparse=True is not offered by torch.ops.backprop.embedding (a custom op's "
                         "gradients are dense); use backprop.autograd.apply(backprop.embedding, ...)")
    V = weight.shape[0]
    ok = ((indices >= 0) & (indices < V)).all()
    eager = lambda: embedding.prepare(indices, weight, **options)  # noqa: E731
    _range_checked(ok, f"indices must lie in [0, {V})", eager)
    return args._replace(indices=indices)


def _linear_cross_entropy_prepare(x, linear_weight, targets, linear_bias=None, *, weight=None, reduction="mean",
                                  ignore_index=-100, label_smoothing=0.0, chunk_size=None):
    """linear_cross_entropy.prepare without host reads (_class_targets)."""
    args = linear_cross_entropy.check(x, linear_weight, targets, linear_bias, weight=weight,
                                      reduction=reduction, ignore_index=ignore_index,
                                      label_smoothing=label_smoothing, chunk_size=chunk_size)
    eager = lambda: linear_cross_entropy.prepare(  # noqa: E731
        x, linear_weight, targets, linear_bias, weight=weight, reduction=reduction, ignore_index=ignore_index,
        label_smoothing=label_smoothing, chunk_size=chunk_size)
    return _class_targets(args, targets, linear_weight.shape[0], ignore_index, eager)


# op name -> its sync-free prepare; every other op of backprop.OPS uses its module's own
SYNC_FREE_PREPARE = {"cross_entropy": _cross_entropy_prepare, "embedding": _embedding_prepare,
                     "linear_cross_entropy": _linear_cross_entropy_prepare}
