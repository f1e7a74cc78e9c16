"""Episode sampling on synthetic class sets whose pixels say which class and example they are."""

import json

import numpy as np
import pytest
import torch

from bilevel.app.data.episodes import ClassSet, EpisodeSampler

N_CLASSES, N_EXAMPLES, SIDE = 12, 20, 4


def _grey(n_classes=N_CLASSES, n_examples=N_EXAMPLES) -> ClassSet:
    """Class c, example e is an image filled with c * 20 + e (uint8, so at most 12 x 20)."""
    codes = np.arange(n_classes * n_examples, dtype=np.uint8).reshape(n_classes, n_examples)
    images = np.broadcast_to(codes[:, :, None, None], (n_classes, n_examples, SIDE, SIDE)).copy()
    names = tuple(f"c{i}" for i in range(n_classes))
    return ClassSet(images, np.arange(n_classes), np.zeros(n_classes, int), names)


def _codes(x: torch.Tensor) -> np.ndarray:
    """Back from float pixels in [0, 1] to the code of each image."""
    return (x[..., 0, 0, 0] * 255).round().long().numpy()


def test_shapes_dtypes_and_labels():
    sampler = EpisodeSampler(_grey(), ways=5, shots=2, queries=3, batch_size=4)
    ep = sampler.sample()
    assert ep.support_x.shape == (4, 10, 1, SIDE, SIDE) and ep.support_x.dtype == torch.float32
    assert ep.query_x.shape == (4, 15, 1, SIDE, SIDE)
    assert ep.support_y.dtype == torch.int64 and ep.support_y.shape == (4, 10)
    assert ep.support_y[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert ep.query_y[0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert 0 <= ep.support_x.min() and ep.support_x.max() <= 1
    assert ep.classes.shape == (4, 5)


def test_labels_name_the_same_class_in_support_and_query_and_images_are_distinct():
    sampler = EpisodeSampler(_grey(), ways=5, shots=2, queries=3, batch_size=8, seed=3)
    ep = sampler.sample()
    support, query = _codes(ep.support_x), _codes(ep.query_x)
    for b in range(8):
        assert len(set(ep.classes[b].tolist())) == 5  # distinct classes
        for label in range(5):
            s = support[b][ep.support_y[b].numpy() == label]
            q = query[b][ep.query_y[b].numpy() == label]
            assert set(s // N_EXAMPLES) == set(q // N_EXAMPLES) == {ep.classes[b, label].item()}
            assert len(set(s) | set(q)) == len(s) + len(q)  # no image twice


def test_all_examples_and_classes_get_drawn():
    sampler = EpisodeSampler(_grey(), ways=3, shots=1, queries=1, batch_size=64, seed=0)
    seen = np.concatenate([_codes(sampler.sample().support_x).ravel() for _ in range(20)])
    assert set(seen) == set(range(N_CLASSES * N_EXAMPLES))


def test_same_seed_same_episodes_other_seed_other_episodes():
    def draw(seed):
        return EpisodeSampler(_grey(), 5, 1, 5, batch_size=3, seed=seed).sample()

    a, b, c = draw(7), draw(7), draw(8)
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
    assert not torch.equal(a.support_x, c.support_x)


def test_numpy_generator_is_used_in_place():
    rng = np.random.default_rng(5)
    sampler = EpisodeSampler(_grey(), 5, 1, 1, seed=rng)
    before = rng.bit_generator.state
    sampler.sample()
    assert rng.bit_generator.state != before


def test_state_dict_resumes_exactly_and_is_json():
    sampler = EpisodeSampler(_grey(), 4, 2, 2, batch_size=2, seed=11)
    sampler.sample()
    state = json.loads(json.dumps(sampler.state_dict()))
    expected = [sampler.sample() for _ in range(3)]
    resumed = EpisodeSampler(_grey(), 4, 2, 2, batch_size=2, seed=999)
    resumed.load_state_dict(state)
    for want, got in zip(expected, (resumed.sample() for _ in range(3))):
        assert all(torch.equal(w, g) for w, g in zip(want, got))


def test_state_dict_of_other_episodes_is_refused():
    state = EpisodeSampler(_grey(), 4, 2, 2).state_dict()
    with pytest.raises(ValueError, match="shots"):
        EpisodeSampler(_grey(), 4, 1, 2).load_state_dict(state)
    renamed = _grey()
    renamed = ClassSet(renamed.images, renamed.base, renamed.rotation, tuple("abcdefghijkl"))
    with pytest.raises(ValueError, match="names"):
        EpisodeSampler(renamed, 4, 2, 2).load_state_dict(state)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(ways=13, shots=1, queries=1), "ways"),  # more ways than classes
        (dict(ways=5, shots=10, queries=11), "shots \\+ queries"),  # 21 > 20 examples
        (dict(ways=0, shots=1, queries=1), "ways"),
        (dict(ways=5, shots=0, queries=1), "shots"),
        (dict(ways=5, shots=1, queries=-1), "queries"),
        (dict(ways=5, shots=1, queries=1, batch_size=0), "batch_size"),
        (dict(ways=5.0, shots=1, queries=1), "ways"),
    ],
)
def test_bad_sizes_name_the_argument(kwargs, word):
    with pytest.raises(ValueError, match=word):
        EpisodeSampler(_grey(), **kwargs)


def test_boundary_sizes_are_accepted():
    ep = EpisodeSampler(_grey(), ways=N_CLASSES, shots=10, queries=10).sample()
    assert ep.support_x.shape[1] == N_CLASSES * 10


def test_rotated_classes_are_rotated():
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(1, 2, 3, 3)
    classes = ClassSet(image, [0, 0, 0, 0], [0, 1, 2, 3], ("r0", "r1", "r2", "r3"))
    for k in range(4):
        assert np.array_equal(classes.class_images(k), np.rot90(image[0], k, axes=(1, 2)))
    ep = EpisodeSampler(classes, ways=4, shots=1, queries=1, seed=0).sample()
    for label in range(4):
        k = ep.classes[0, label].item()
        got = (ep.support_x[0, label, 0] * 255).round().to(torch.uint8).numpy()
        assert any(np.array_equal(got, np.rot90(image[0, e], k)) for e in range(2))


def test_colour_images_come_channels_first_and_normalised():
    images = np.zeros((6, 5, 2, 3, 3), np.uint8)
    images[..., 0], images[..., 1], images[..., 2] = 0, 51, 255
    classes = ClassSet(images, np.arange(6), np.zeros(6, int), tuple("abcdef"))
    ep = EpisodeSampler(classes, 2, 2, 1, batch_size=2).sample()
    assert ep.support_x.shape == (2, 4, 3, 2, 3)
    assert ep.support_x[0, 0, :, 0, 0].tolist() == pytest.approx([0.0, 0.2, 1.0])
    mean, std = [0.5, 0.5, 0.5], [0.5, 0.25, 0.5]
    ep = EpisodeSampler(classes, 2, 2, 1, mean=mean, std=std).sample()
    assert ep.query_x[0, 0, :, 0, 0].tolist() == pytest.approx([-1.0, -1.2, 1.0])


def test_bad_normalisation_is_refused():
    with pytest.raises(ValueError, match="both"):
        EpisodeSampler(_grey(), 2, 1, 1, mean=[0.5])
    with pytest.raises(ValueError, match="one per channel"):
        EpisodeSampler(_grey(), 2, 1, 1, mean=[0.5, 0.5], std=[1.0, 1.0])
    with pytest.raises(ValueError, match="positive"):
        EpisodeSampler(_grey(), 2, 1, 1, mean=[0.5], std=[0.0])


def test_class_set_checks_its_arrays():
    with pytest.raises(ValueError, match="uint8"):
        ClassSet(np.zeros((2, 3, 4, 4), np.float32), [0, 1], [0, 0], ("a", "b"))
    with pytest.raises(ValueError, match="one entry per class"):
        ClassSet(np.zeros((2, 3, 4, 4), np.uint8), [0, 1], [0], ("a", "b"))


def test_episodes_move_to_a_device():
    ep = EpisodeSampler(_grey(), 2, 1, 1).sample().to("cpu")
    assert ep.support_x.device.type == "cpu"
