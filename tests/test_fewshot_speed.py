"""Every throughput option of the few-shot step (fewshot/speed.py) gives the reference
meta-gradient.

The reference is the formulation before the options: NCHW memory, batch norm by its textbook
formula (EpisodeBatchNorm2d with fused=False), ReLU before max-pool, float32 throughout. A tiny
mini-ImageNet C4 network (8 filters, 20x20 images: 20 -> 10 -> 5 -> 2 -> 1) on two 3-way
episodes keeps each test well under a second.

Tolerances, measured when these tests were written (seed 0):
- float64: every option equals the reference to 4e-15 relative (rounding of a different sum
  order), asserted at 1e-12.
- float32: the reference itself is 1.7e-6 from float64 (relative, whole meta-gradient); each
  option 1.4e-6 to 1.7e-6. Asserted: within 1e-5 of float64, the reference's error x 6.
- bf16 representation (CPU autocast): 0.18 relative, cosine 0.984 with float64: 8 significant
  bits through four conv/batch-norm blocks and the reverse pass of the inner steps. Asserted:
  relative 0.35, cosine 0.95; the loss to 1e-3 (measured 1.0e-4).
"""

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from bilevel.app import models
from bilevel.app.data import ClassSet, DeviceEpisodeSampler, Episodes, EpisodeSampler
from bilevel.app.experiments.fewshot import FewshotConfig, speed
from bilevel.app.experiments.fewshot.config import NOT_HASHED, SPEED_KEYS
from bilevel.app.experiments.fewshot.learners import Learner, evaluate, meta_loss

TINY = dict(
    dataset="miniimagenet", split="ravi", model="miniimagenet-conv", width=0.25, ways=3,
    shots=2, queries=2, meta_batch=2,
)  # fmt: skip
REFERENCE = dict(memory_format="contiguous", fused_blocks=False)
OPTIONS = [
    dict(memory_format=m, fused_blocks=f)
    for m, f in itertools.product(("contiguous", "channels_last"), (False, True))
]
NAMES = [f"{o['memory_format']}-fused={o['fused_blocks']}" for o in OPTIONS]


def episodes(dtype=torch.float32, side=20, b=2, ways=3, shots=2, queries=2) -> Episodes:
    g = torch.Generator().manual_seed(0)
    labels = lambda n: torch.arange(ways).repeat_interleave(n).expand(b, -1).clone()  # noqa: E731
    images = lambda n: torch.rand(b, ways * n, 3, side, side, generator=g, dtype=torch.float64)  # noqa: E731
    return Episodes(
        images(shots).to(dtype), labels(shots), images(queries).to(dtype), labels(queries),
        torch.zeros(b, ways, dtype=torch.long),
    )  # fmt: skip


@pytest.fixture(scope="module")
def weights():
    torch.manual_seed(0)
    return Learner(FewshotConfig(**TINY, **REFERENCE)).state_dict()


def learner(weights, dtype=torch.float32, **settings) -> tuple[Learner, FewshotConfig]:
    config = FewshotConfig(**TINY, **settings)
    net = Learner(config)
    net.load_state_dict(weights)
    return net.to(dtype), config


def meta_gradient(weights, dtype, **settings):
    """(query loss, the network's meta-gradient flattened, the learner after the step)."""
    net, config = learner(weights, dtype, **settings)
    loss, _ = meta_loss(net, episodes(dtype), config)
    loss.backward()
    grads = torch.cat([p.grad.double().flatten() for p in net.parameters()])
    return loss.detach().double(), grads, net


def relative(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("option", OPTIONS, ids=NAMES)
def test_every_option_gives_the_reference_meta_gradient_in_float64(weights, option):
    loss, grads, net = meta_gradient(weights, torch.float64, **option)
    ref_loss, ref_grads, ref_net = meta_gradient(weights, torch.float64, **REFERENCE)
    assert relative(grads, ref_grads) < 1e-12
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    for (name, stat), ref in zip(net.net.named_buffers(), ref_net.net.buffers()):
        torch.testing.assert_close(stat, ref, rtol=1e-12, atol=1e-15, msg=name)  # running stats
    channels_last = option["memory_format"] == "channels_last"
    first = net.net.body[0][0].weight
    assert first.is_contiguous(memory_format=torch.channels_last) == channels_last


@pytest.mark.parametrize("option", OPTIONS, ids=NAMES)
def test_every_option_in_float32_is_as_close_to_float64_as_the_reference(weights, option):
    exact = meta_gradient(weights, torch.float64, **REFERENCE)[1]
    reference = relative(meta_gradient(weights, torch.float32, **REFERENCE)[1], exact)
    error = relative(meta_gradient(weights, torch.float32, **option)[1], exact)
    assert reference < 1e-5 and error < 1e-5, (reference, error)


def test_bf16_representation_keeps_heads_and_hypergradient_in_float32(weights):
    loss64, exact, _ = meta_gradient(weights, torch.float64, **REFERENCE)
    loss, grads, net = meta_gradient(weights, torch.float32, network_precision="bf16")
    assert net.speed.lowered is torch.bfloat16
    assert all(p.grad.dtype == torch.float32 for p in net.parameters())
    assert relative(grads, exact) < 0.35
    assert float(torch.nn.functional.cosine_similarity(grads, exact, 0)) > 0.95
    assert abs(float(loss - loss64)) < 1e-3
    with net.speed.autocast():  # the representation alone runs lowered
        features = net.net(episodes().support_x[0])
    assert features.dtype == torch.bfloat16 and speed.upcast(features).dtype == torch.float32


@pytest.mark.parametrize("mode", ["transductive", "separate", "running"])
def test_evaluation_under_inference_mode_gives_the_reference_accuracy(weights, mode):
    batch = episodes(torch.float64)

    class Once:
        def sample(self):
            return batch

    results = []
    for settings in (REFERENCE, {}):  # {}: the defaults, every exact option on
        net, _ = learner(weights, torch.float64, **settings)
        before = {k: v.clone() for k, v in net.state_dict().items()}
        results.append(evaluate(net, Once(), 2, [1, 5], mode))
        assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    for t in (1, 5):
        np.testing.assert_array_equal(results[0][t], results[1][t])


def test_features_for_the_heads_are_ordinary_float32_tensors(weights):
    net, _ = learner(weights, network_precision="bf16")
    with speed.features_only(net.speed):
        features = net.net(episodes().support_x[0])
    assert features.is_inference() and not features.requires_grad
    heads_input = speed.for_heads(features)
    assert not heads_input.is_inference() and heads_input.dtype == torch.float32


# --- the fused parts -----------------------------------------------------------------------


def reference_norm(x, weight, bias, groups, eps):
    grouped = x.view(groups, x.shape[0] // groups, *x.shape[1:])
    mean = grouped.mean((1, 3, 4), keepdim=True)
    var = grouped.var((1, 3, 4), unbiased=False, keepdim=True)
    y = (grouped - mean) * torch.rsqrt(var + eps) * weight.view(-1, 1, 1) + bias.view(-1, 1, 1)
    return y.view_as(x), mean.view(groups, -1), var.view(groups, -1)


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_episode_norm_is_batch_norm_of_each_group_with_its_gradient(groups, layout):
    g = torch.Generator().manual_seed(groups)
    x = (3 * torch.randn(6, 4, 5, 5, generator=g, dtype=torch.float64) + 2).contiguous(
        memory_format=layout
    )
    weight = torch.rand(4, generator=g, dtype=torch.float64)
    bias = torch.randn(4, generator=g, dtype=torch.float64)
    y, mean, var = speed.episode_norm(x, weight, bias, groups, 1e-5)
    for got, want in zip((y, mean, var), reference_norm(x, weight, bias, groups, 1e-5)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert y.is_contiguous(memory_format=layout)
    inputs = [t.clone().requires_grad_() for t in (x, weight, bias)]
    assert torch.autograd.gradcheck(
        lambda *t: speed.episode_norm(*t, groups, 1e-5)[0], inputs, eps=1e-6, atol=1e-7
    )


def test_episode_norm_statistics_stay_accurate_on_large_channels_last_batches():
    # torch's own channels_last batch norm on a CPU sums sequentially: 4e-5 relative error on
    # this batch (82,944 values per channel), against 2e-7 for episode_norm
    g = torch.Generator().manual_seed(0)
    x64 = 3 * torch.randn(16, 2, 72, 72, generator=g, dtype=torch.float64) + 1
    one, zero = torch.ones(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    exact, _, _ = reference_norm(x64, one, zero, 1, 1e-5)
    x = x64.float().contiguous(memory_format=torch.channels_last)
    y, _, _ = speed.episode_norm(x, torch.ones(2), torch.zeros(2), 1, 1e-5)
    assert float((y.double() - exact).abs().max()) < 2e-6


def test_episode_norm_names_a_batch_that_does_not_split_into_its_groups():
    with pytest.raises(ValueError, match=r"N a multiple of groups=4, got \(6, 2, 3, 3\)"):
        speed.episode_norm(torch.ones(6, 2, 3, 3), torch.ones(2), torch.zeros(2), 4, 1e-5)


@pytest.mark.parametrize("name", ["miniimagenet-conv", "resnet12"])
def test_max_pool_before_the_activation_gives_the_same_values_and_gradients(name):
    torch.manual_seed(0)
    net = models.build(name, 3, 16, width=0.125).double()
    swapped = models.build(name, 3, 16, width=0.125).double()
    swapped.load_state_dict(net.state_dict())
    assert speed.pool_before_activation(swapped) == 4
    assert list(swapped.state_dict()) == list(net.state_dict())
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    outputs = [m(x) for m in (net, swapped)]
    assert torch.equal(*outputs)
    for out in outputs:
        out.square().sum().backward()
    for a, b in zip(net.parameters(), swapped.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14)


def test_max_pool_is_not_moved_before_an_activation_that_is_not_monotone():
    net = nn.Sequential(nn.LeakyReLU(-0.5), nn.MaxPool2d(2), nn.SiLU(), nn.MaxPool2d(2))
    assert speed.pool_before_activation(net) == 0


# --- data on the device --------------------------------------------------------------------


def class_set(rgb: bool) -> ClassSet:
    rng = np.random.default_rng(0)
    shape = (5, 6, 8, 8, 3) if rgb else (5, 6, 8, 8)
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    base, rotation = np.array([0, 1, 2, 3, 4, 0, 1, 2]), np.array([0, 0, 0, 0, 0, 1, 2, 3])
    return ClassSet(images, base, rotation, tuple(f"c{i}" for i in range(8)))


@pytest.mark.parametrize("rgb", [False, True])
def test_episodes_drawn_on_the_device_equal_the_host_sampler_bit_for_bit(rgb):
    classes = class_set(rgb)
    norm = dict(mean=[0.4, 0.5, 0.6], std=[0.2, 0.3, 0.25]) if rgb else {}
    host = EpisodeSampler(classes, 4, 2, 3, batch_size=3, seed=5, **norm)
    device = DeviceEpisodeSampler(classes, 4, 2, 3, batch_size=3, seed=5, device="cpu", **norm)
    for _ in range(3):
        for a, b in zip(host.sample(), device.sample()):
            assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    state = host.state_dict()
    device.load_state_dict(state)  # one state for both
    for a, b in zip(host.sample(), device.sample()):
        assert torch.equal(a, b)


def test_samplers_of_one_split_share_its_copy_on_the_device():
    classes = class_set(rgb=True)
    first, second = (DeviceEpisodeSampler(classes, 4, 2, 3, seed=s) for s in (0, 1))
    assert first._pixels is second._pixels
    assert DeviceEpisodeSampler(class_set(rgb=True), 4, 2, 3)._pixels is not first._pixels


def test_the_device_sampler_is_chosen_by_episodes_on_device():
    assert not speed.episodes_on_device(FewshotConfig(**TINY))  # cpu: the host sampler
    assert speed.episodes_on_device(FewshotConfig(**TINY, episodes_on_device=True))


# --- settings ------------------------------------------------------------------------------


def test_exact_options_stay_out_of_a_checkpoint_identity_and_bf16_is_in_it():
    assert SPEED_KEYS <= NOT_HASHED
    exact = FewshotConfig(memory_format="contiguous", fused_blocks=False, episodes_on_device=True)
    assert exact.hashed() == FewshotConfig().hashed()
    assert "network_precision" not in FewshotConfig().hashed()  # earlier runs still load
    lowered = FewshotConfig(network_precision="bf16").hashed()
    assert lowered["network_precision"] == "bf16"


def test_auto_memory_format_is_channels_last_on_a_cpu():
    assert speed.channels_last("auto", torch.device("cpu"))
    assert not speed.channels_last("auto", torch.device("cuda"))
    assert speed.channels_last("channels_last", torch.device("cuda"))
    with pytest.raises(ValueError, match="memory_format must be"):
        speed.channels_last("nhwc", torch.device("cpu"))


# A fresh process (the allocator settings act before its first tensor): speed.py alone, which
# imports torch and the standard library only; then whether a 64 MB tensor got a mapping of its
# own (glibc's mallinfo2().hblkhd: bytes in such mappings).
FRESH = f"""
import ctypes, importlib.util as u, sys
spec = u.spec_from_file_location("speed", {speed.__file__!r})
speed = u.module_from_spec(spec); sys.modules["speed"] = speed; spec.loader.exec_module(speed)
print(*speed.tune_allocator())
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks "
                "fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
x = speed.torch.empty(64 << 20, dtype=speed.torch.uint8)
print(libc.mallinfo2().hblkhd >= 64 << 20)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator")
def test_the_allocator_keeps_large_blocks_in_its_heap_unless_told_otherwise():
    env = {k: v for k, v in os.environ.items() if k not in (speed.HUGE_PAGES_ENV, "GLIBC_TUNABLES")}
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", FRESH], env={**env, **extra}, stdout=subprocess.PIPE, text=True
        )
        for extra in ({}, {speed.ALLOCATOR_ENV: "system"})
    ]
    tuned, system = (r.communicate(timeout=60)[0].split() for r in runs)
    assert tuned == ["True", "True", "False"]  # huge pages, kept heap, no mapping of its own
    assert system == ["False", "False", "True"]
