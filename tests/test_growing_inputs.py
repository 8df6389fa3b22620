"""narrow_growing_inputs: a graph input of growing width that the graph reads only at a static part
becomes that part, a static input, against the graph as dynamo traced it."""

import pytest
import torch

from kvcompile.growing_inputs import narrow_growing_inputs


def _dynamo_graphs(fn, *calls):
    """Dynamo's graphs of `fn` (with their example inputs) over `calls`, each a tuple of arguments."""
    graphs = []

    def recording(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=recording)
    try:
        for args in calls:
            torch.testing.assert_close(compiled(*args), fn(*args))
    finally:
        torch._dynamo.reset()
    return graphs


def _growing_calls(width=5, count=3):
    """x (2, 3) and a mask (2, width + i) a column wider each call, as generate's."""
    return [(torch.randn(2, 3), torch.randint(0, 2, (2, width + i))) for i in range(count)]


@pytest.mark.parametrize("tail", [1, 2])
def test_a_mask_read_at_its_tail_becomes_that_tail(tail):
    gm, example = _dynamo_graphs(lambda x, mask: x * mask[:, -tail:].sum(1, keepdim=True), *_growing_calls())[-1]
    traced = [node.meta["example_value"] for node in gm.graph.nodes if node.op == "placeholder"]
    assert any(isinstance(value, torch.SymInt) for value in traced)  # dynamo made the width symbolic
    narrowed, feed = narrow_growing_inputs(gm, example)
    shapes = {tuple(node.meta["example_value"].shape) for node in narrowed.graph.nodes if node.op == "placeholder"}
    assert shapes == {(2, 3), (2, tail)}
    for width in (6, 9, 30):  # any later width, as the traced graph takes it
        x, mask = torch.randn(2, 3), torch.randint(0, 2, (2, width))
        inputs = [width if isinstance(value, torch.SymInt) else x if value.shape == (2, 3) else mask for value in traced]
        torch.testing.assert_close(narrowed.forward(*feed(inputs)), gm.forward(*inputs))
    # dynamo's own graph is untouched: it reads its placeholders after the backend
    assert [node.meta["example_value"] for node in gm.graph.nodes if node.op == "placeholder"] == traced


def test_an_input_read_beyond_a_static_part_stays_growing():
    calls = _growing_calls()
    gm, example = _dynamo_graphs(lambda x, mask: x * mask[:, -1:] + mask.sum(), *calls)[-1]
    assert narrow_growing_inputs(gm, example) is None


def test_a_part_whose_shape_follows_the_width_stays_growing():
    calls = _growing_calls()
    gm, example = _dynamo_graphs(lambda x, mask: x * mask[:, 1:].sum(1, keepdim=True), *calls)[-1]
    assert narrow_growing_inputs(gm, example) is None


def test_a_static_graph_is_left_alone():
    gm, example = _dynamo_graphs(lambda x, mask: x * mask[:, -1:], *_growing_calls(count=1))[-1]
    assert narrow_growing_inputs(gm, example) is None
