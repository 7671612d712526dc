"""``WxH`` text and (height, width) pairs: one parser and one label for the CLI, the sweep and llava-next."""

from __future__ import annotations

import pytest

from mllm_bench.config import ConfigError
from mllm_bench.image_sizes import parse_sizes, sizes_label


def test_sizes_read_width_first_and_hold_height_first_and_the_label_writes_them_back() -> None:
    assert parse_sizes("672x1008", ",") == ((1008, 672),)
    assert parse_sizes(" 336X336 ; 672 x 1008", ";") == ((336, 336), (1008, 672))
    assert sizes_label(((1008, 672), (336, 336))) == "672x1008;336x336"
    assert parse_sizes(sizes_label(((5, 7), (9, 3))), ";") == ((5, 7), (9, 3))


@pytest.mark.parametrize("bad", ["672", "672x", "x336", "0x336", "336x0", "-1x5", "+672x1008", "1.5x2", "axb",
                                 "336x336x2", ""])
def test_anything_but_two_positive_integers_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_sizes(bad, ",")


def test_each_option_names_itself_when_a_size_is_bad() -> None:
    from mllm_bench.architectures.llava_next import parse_pinpoints
    from mllm_bench.cli.common import parse_image_size
    from mllm_bench.reports.sweep import image_pairs

    assert parse_image_size("672x1008,336x336") == (None, ((1008, 672), (336, 336)))
    assert parse_pinpoints("672x336,336x672") == ((336, 672), (672, 336))
    assert image_pairs("336x336;672x1008") == ((336, 336), (1008, 672))
    for call, name in [(lambda: parse_image_size("672x0"), "--image-size"),
                       (lambda: parse_pinpoints("672x"), "image_grid_pinpoints"),
                       (lambda: image_pairs("672by1008"), "--vary image")]:
        with pytest.raises(ConfigError, match=name):
            call()
