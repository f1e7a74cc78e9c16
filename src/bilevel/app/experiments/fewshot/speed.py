"""Throughput of the few-shot step: the options, and why each gives the same numbers.

Each option is a setting of :class:`~.config.FewshotConfig` (docs/experiments.md,
"Throughput", has the measured gains and the command that measures them):

- ``memory_format``: the representation's weights, and so its activations, in channels_last
  (NHWC). A convolution with channels_last weights returns channels_last, so the inputs need no
  conversion of their own. Same numbers to float32 rounding.
- ``fused_blocks``: (a) batch norm in training mode as one autograd function
  (:func:`episode_norm`): two passes forward, three backward, instead of the dozen
  elementwise kernels of the reference formula; its statistics are torch's pairwise sums, as
  accurate as the reference's (torch's own channels_last batch-norm kernel on a CPU sums
  sequentially: 4e-5 relative error over 40 images of 84x84, against 2e-7; not used);
  (b) max-pool before the activation (:func:`pool_before_activation`): max-pool commutes with
  any non-decreasing function, so ReLU and leaky ReLU run on a quarter of the values. Same
  forward values; the same gradient except where two values of a pooling window tie.
- ``network_precision="bf16"``: the representation under ``torch.autocast`` to
  bfloat16; its features are cast to float32, so the heads, their inner steps and the
  hypergradient stay float32. It changes the numbers (8 significant bits), so it is part of a
  checkpoint's identity.
- ``episodes_on_device``: the split lives on the device as uint8 and each meta-batch is
  gathered, rotated and normalised there (:class:`bilevel.app.data.DeviceEpisodeSampler`),
  drawing the same episodes as the host sampler.
- The CPU allocator (:func:`tune_allocator`, not a setting: an environment variable,
  ``BILEVEL_CPU_ALLOCATOR=system``, leaves it alone). glibc hands every buffer above 32 MB
  (an activation of the mini-ImageNet step is 361 MB) to a fresh mapping and returns it at
  free, so every step has the kernel fault in and zero gigabytes of pages again: more than half
  of the step on this CPU. Large blocks are served from the heap and the heap is kept instead
  (``mallopt``; a process then holds its peak memory between steps, as torch's CUDA allocator
  does), and torch's allocator asks for transparent huge pages (``THP_MEM_ALLOC_ENABLE``).
- Validation and test embed their episodes under ``torch.inference_mode``
  (:func:`features_only`): the heads need gradients with respect to themselves only.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

ALLOCATOR_ENV = "BILEVEL_CPU_ALLOCATOR"  # "system": neither huge pages nor a kept heap
HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"
# Read by torch's CPU allocator at its first allocation: set on import, before any tensor of a
# run exists (the command line imports the experiments first); an explicit 0 is kept.
if os.environ.get(ALLOCATOR_ENV) != "system":
    os.environ.setdefault(HUGE_PAGES_ENV, "1")
# glibc's mallopt parameters (malloc.h), and the users' own ways of setting them
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
HEAP_BLOCKS_UP_TO = 1 << 30  # bytes: larger blocks still get mappings of their own
KEEP_HEAP_UP_TO = (1 << 31) - 1  # mallopt takes an int
GLIBC_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
_PROBE_BYTES = 4 << 20  # above the allocator's 2 MB threshold for huge pages
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
LOWER = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Speed:
    """The resolved throughput options of one device.

    Attributes:
        channels_last: the representation in channels_last memory format.
        fused: fused batch norm and max-pool before the activation.
        lowered: the autocast dtype of the representation (None: float32).
        device_type: "cpu" or "cuda", the kind autocast needs.
        huge_pages: whether torch's CPU allocator uses transparent huge pages.
        kept_heap: whether glibc serves large blocks from a heap it keeps.
    """

    channels_last: bool
    fused: bool
    lowered: torch.dtype | None
    device_type: str
    huge_pages: bool = False
    kept_heap: bool = False

    @classmethod
    def of(cls, config) -> Speed:
        """The options of a FewshotConfig on its device (``auto`` resolved there)."""
        device = torch.device(config.device)
        lowered = PRECISIONS[config.network_precision]
        if lowered is not None and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("network_precision='bf16': this GPU has no bfloat16; use 'fp32'")
        huge_pages, kept_heap = tune_allocator()
        return cls(
            channels_last=channels_last(config.memory_format, device),
            fused=config.fused_blocks,
            lowered=lowered,
            device_type=device.type,
            huge_pages=huge_pages,
            kept_heap=kept_heap,
        )

    def prepare(self, net: nn.Module) -> nn.Module:
        """``net`` (in place) in these options' memory format and block order."""
        if self.fused:
            pool_before_activation(net)
        if self.channels_last:
            net.to(memory_format=torch.channels_last)
        return net

    def autocast(self):
        """The region the representation runs in: autocast to ``lowered``, or none."""
        if self.lowered is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.lowered)


def episodes_on_device(config) -> bool:
    """Whether a FewshotConfig's episodes are drawn on its device (by default on a GPU)."""
    if config.episodes_on_device is not None:
        return config.episodes_on_device
    return torch.device(config.device).type == "cuda"


def channels_last(setting: str, device: torch.device) -> bool:
    """Whether ``memory_format=setting`` means channels_last on ``device``: ``auto`` is
    channels_last on a CPU (measured faster there) and contiguous elsewhere (not measured)."""
    if setting not in ("auto", "channels_last", "contiguous"):
        raise ValueError(
            f"memory_format must be 'auto', 'channels_last' or 'contiguous', got {setting!r}"
        )
    if setting == "auto":
        return device.type == "cpu"
    return setting == "channels_last"


# --- the CPU allocator --------------------------------------------------------------------


def tune_allocator() -> tuple[bool, bool]:
    """(huge pages, kept heap): what :func:`enable_huge_pages` and :func:`keep_freed_memory`
    achieve, or only whether huge pages are on where ``BILEVEL_CPU_ALLOCATOR=system``."""
    if os.environ.get(ALLOCATOR_ENV) == "system":
        return _huge_pages_in_use(), False
    return enable_huge_pages(), keep_freed_memory()


def keep_freed_memory() -> bool:
    """Have glibc serve blocks up to 1 GiB from its heap and keep up to 2 GiB of it free;
    True where it took effect (glibc only; a user's own MALLOC_* or GLIBC_TUNABLES win).

    Without it every large buffer is a fresh mapping, faulted in and zeroed page by page on
    each use. Any time is right: it applies to the blocks allocated after it.
    """
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in GLIBC_SETTINGS):
        return False
    mallopt = ctypes.CDLL(None).mallopt
    return bool(
        mallopt(M_MMAP_THRESHOLD, HEAP_BLOCKS_UP_TO) and mallopt(M_TRIM_THRESHOLD, KEEP_HEAP_UP_TO)
    )


def enable_huge_pages() -> bool:
    """Ask torch's CPU allocator for transparent huge pages; True where it uses them.

    The allocator reads ``THP_MEM_ALLOC_ENABLE`` once, at its first allocation, so this works
    only before the process has made any CPU tensor (at the start of a run); an explicit
    ``THP_MEM_ALLOC_ENABLE=0`` in the environment is respected. The answer is read from a
    4 MB probe: with huge pages the allocator aligns large buffers to a page, without them
    glibc's mapped chunks start past a 16-byte header.
    """
    os.environ.setdefault(HUGE_PAGES_ENV, "1")  # in case it was removed since the import
    return _huge_pages_in_use()


def _huge_pages_in_use() -> bool:
    probe = torch.empty(_PROBE_BYTES, dtype=torch.uint8)
    return probe.data_ptr() % 4096 == 0


# --- max-pool before the activation -------------------------------------------------------


def pool_before_activation(net: nn.Module) -> int:
    """Swap every (ReLU or non-negative-slope leaky ReLU, MaxPool2d) pair of consecutive
    layers of ``net``'s Sequentials, in place; returns how many were swapped.

    max(f(a), f(b)) = f(max(a, b)) for a non-decreasing f, so the outputs are the same and
    the activation touches a quarter of the values. The state dict is unchanged (neither
    layer has state, and the Sequential keeps its keys).
    """
    swapped = 0
    for module in net.modules():
        if not isinstance(module, nn.Sequential):
            continue
        for i in range(len(module) - 1):
            if _non_decreasing(module[i]) and isinstance(module[i + 1], nn.MaxPool2d):
                module[i], module[i + 1] = module[i + 1], module[i]
                swapped += 1
    return swapped


def _non_decreasing(layer: nn.Module) -> bool:
    if isinstance(layer, nn.LeakyReLU):
        return layer.negative_slope >= 0
    return isinstance(layer, nn.ReLU)


# --- fused batch norm ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Groups:
    """Views of a batch [N, C, H, W] as ``groups`` consecutive parts, channels kept apart:
    [G, N/G * H * W, C] for channels_last memory, [G, N/G, C, H * W] for contiguous."""

    groups: int
    shape: torch.Size
    channels_last: bool

    @classmethod
    def of(cls, x: Tensor, groups: int) -> _Groups:
        if x.dim() != 4 or groups < 1 or x.shape[0] % groups:
            raise ValueError(
                f"episode_norm: expected [N, C, H, W] with N a multiple of groups={groups}, "
                f"got {tuple(x.shape)}"
            )
        layout = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        return cls(groups, x.shape, layout)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    @property
    def dims(self) -> tuple[int, ...]:
        return (1,) if self.channels_last else (1, 3)

    @property
    def per_channel(self) -> tuple[int, ...]:
        """The shape of a [C] vector broadcast against a grouped view."""
        return (-1,) if self.channels_last else (-1, 1)

    @property
    def count(self) -> int:
        n, c, h, w = self.shape
        return n // self.groups * h * w

    def view(self, t: Tensor) -> Tensor:
        n, c, h, w = self.shape
        if self.channels_last:
            return t.permute(0, 2, 3, 1).view(self.groups, -1, c)
        return t.view(self.groups, n // self.groups, c, h * w)

    def empty(self, like: Tensor) -> Tensor:
        return torch.empty(self.shape, dtype=like.dtype, device=like.device).contiguous(
            memory_format=self.memory_format
        )

    def per_group(self, stat: Tensor) -> Tensor:
        return stat.reshape(self.groups, -1)

    def total(self, stat: Tensor) -> Tensor:
        """A per-group, per-channel statistic summed over the groups: [C]."""
        return self.per_group(stat).sum(0)


class _EpisodeNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps):
        if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            x = x.contiguous()
        layout = _Groups.of(x, groups)
        stat = torch.promote_types(x.dtype, torch.float32)  # bf16 sums in float32
        grouped = layout.view(x)
        mean = grouped.mean(layout.dims, keepdim=True, dtype=stat)
        centred = grouped - mean.to(x.dtype)
        var = centred.square().mean(layout.dims, keepdim=True, dtype=stat)
        invstd = (var + eps).rsqrt()
        scale = (invstd * weight.view(layout.per_channel)).to(x.dtype)
        y = layout.empty(x)
        torch.addcmul(bias.view(layout.per_channel).to(x.dtype), centred, scale, out=layout.view(y))
        ctx.save_for_backward(centred, invstd, weight)
        ctx.layout = layout
        mean, var = layout.per_group(mean), layout.per_group(var)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, _mean, _var):
        centred, invstd, weight = ctx.saved_tensors
        layout = ctx.layout
        grouped = layout.view(grad.contiguous(memory_format=layout.memory_format))
        stat, n = invstd.dtype, layout.count
        sum_grad = grouped.sum(layout.dims, keepdim=True, dtype=stat)
        sum_grad_centred = (grouped * centred).sum(layout.dims, keepdim=True, dtype=stat)
        # dx = a * grad + b * centred + c, the batch-norm gradient with x^ = centred * invstd
        a = weight.view(layout.per_channel) * invstd
        b = -a * invstd.square() * sum_grad_centred / n
        c = -a * sum_grad / n
        dx = layout.empty(grad)
        out = layout.view(dx)
        torch.addcmul(c.to(grad.dtype), grouped, a.to(grad.dtype), out=out)
        out.addcmul_(centred, b.to(grad.dtype))
        dweight = layout.total(sum_grad_centred * invstd).to(weight.dtype)
        return dx, dweight, layout.total(sum_grad).to(weight.dtype), None, None


def episode_norm(
    x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Batch norm (training mode) of each of ``groups`` equal consecutive parts of ``x``.

    Args:
        x: [N, C, H, W], contiguous or channels_last (the output has the same format);
            float32, float64 or a lower precision (statistics then in float32).
        weight, bias: [C], the affine parameters.
        groups: parts of the batch normalised separately (1: ordinary batch norm).
        eps: added to the variance.

    Returns:
        (y, mean, var): the normalised batch, differentiable w.r.t. x, weight and bias (once),
        and each part's per-channel mean and biased variance [groups, C] (not differentiable),
        for the running statistics.
    """
    return _EpisodeNorm.apply(x, weight, bias, groups, eps)


# --- validation and test ------------------------------------------------------------------


@contextlib.contextmanager
def features_only(speed: Speed) -> Iterator[None]:
    """The region where validation and test embed episodes: inference mode (no graph, no
    version counters) and the representation's precision. Pass what it computes through
    :func:`for_heads` before training heads on it."""
    with torch.inference_mode(), speed.autocast():
        yield


def upcast(features: Tensor) -> Tensor:
    """Features of a lowered representation in float32 (others unchanged): the heads, their
    inner steps and the hypergradient run in float32."""
    return features.float() if features.dtype in LOWER else features


def for_heads(features: Tensor) -> Tensor:
    """Features computed under :func:`features_only` as an ordinary tensor that the heads'
    inner steps can save for their gradients (an inference tensor cannot be saved)."""
    features = upcast(features)
    return features.clone() if features.is_inference() else features
