"""Think-block parsing: both formats' markers, unclosed blocks, the text outside kept verbatim."""

import pytest

from nemo_plugins.data.thinking import THINK_SPANS, split_thinking, strip_thinking


@pytest.mark.parametrize("open_, close", THINK_SPANS)
def test_split_inverts_the_rendered_block(open_, close):
    thinking, answer = split_thinking(f"{open_}\n3 * 4 = 12\n12 + 1 = 13\n{close}\nAnswer: 13")
    assert thinking == "3 * 4 = 12\n12 + 1 = 13"
    assert answer == "Answer: 13"


def test_no_block_is_none_and_an_empty_block_is_empty():
    assert split_thinking("Answer: 13") == (None, "Answer: 13")
    assert split_thinking("<think></think>Answer: 13") == ("", "Answer: 13")


def test_an_unclosed_block_runs_to_the_end():
    assert split_thinking("<think>\n3 * 4 = 12\n12 +") == ("3 * 4 = 12\n12 +", "")
    assert strip_thinking("Sure. [THINK]and then") == "Sure. "


def test_every_span_of_both_formats_is_removed_and_the_rest_kept():
    text = "[THINK]is it 4?[/THINK]It is 4.<think>\nhidden\n</think> Done.[THINK]unfinished"
    assert strip_thinking(text) == "It is 4. Done."
    assert split_thinking(text) == ("is it 4?\nhidden\nunfinished", "It is 4. Done.")


def test_markers_of_one_format_do_not_close_the_other():
    assert split_thinking("<think>a[/THINK]b</think>c") == ("a[/THINK]b", "c")
