import numpy as np
import pytest

from pipeline.core import toy


def test_every_spec_is_distinct_and_captions_parse_back():
    specs = toy.all_specs()
    assert len(specs) == len(set(specs)) == 90
    for spec in specs:
        assert toy.parse_caption(spec.caption) == spec
    assert toy.all_specs()[0].caption.startswith("a ") and toy.all_specs()[0].caption.endswith(" background")


@pytest.mark.parametrize("caption", ["a red circle", "a purple circle on a red background", "an red circle on a blue background"])
def test_parse_caption_rejects_anything_else(caption):
    with pytest.raises(ValueError):
        toy.parse_caption(caption)


def test_generate_is_seeded_and_covers_every_caption():
    first = toy.generate(180, 32, seed=3)
    again = toy.generate(180, 32, seed=3)
    other = toy.generate(180, 32, seed=4)
    assert [s for s, _ in first] == [s for s, _ in again]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for (_, a), (_, b) in zip(first, again))
    assert [s for s, _ in first] != [s for s, _ in other]
    assert len({s for s, _ in first}) == 90


def test_drawn_image_uses_exactly_the_two_palette_colours():
    spec = toy.ToySpec("square", "red", "blue")
    image = np.asarray(toy.draw(spec, 64, np.random.default_rng(0)))
    colours = {tuple(c) for c in image.reshape(-1, 3)}
    assert colours == {toy.PALETTE["red"], toy.PALETTE["blue"]}
    assert tuple(image[0, 0]) == toy.PALETTE["blue"]
