"""canonicalize_attention: one kvcompile::attention per site, same numbers as the captured program."""

import pytest
import torch
from kvcompile.passes import canonicalize_attention, find_attention_sites
from kvcompile.passes.sites import SDPA

from kvcompile import Plan, capture
from kvcompile.program import clone_program
from tests.tiny_models import ARCHITECTURES, make_tiny_model

NO_PLAN = Plan.from_k_channels({})  # the pass reads no plan


def _run(gm, batch=2, seq=5, past=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (batch, seq), generator=g)
    pos = torch.arange(past, past + seq).expand(batch, -1)
    kv = [torch.randn(batch, 2, past, 16, generator=g) for _ in range(4)]
    return gm(ids, pos, *kv)


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_canonical_program_computes_the_same(arch):
    captured = capture(make_tiny_model(arch))
    canonical = canonicalize_attention(clone_program(captured), NO_PLAN)
    canonical.recompile()
    targets = _targets(canonical)
    assert targets.count(torch.ops.kvcompile.attention.default) == 2
    assert SDPA not in targets
    # the GQA repeat ops died with SDPA: the cache update feeds only the op and the outputs
    for site in find_attention_sites(canonical):
        assert set(site.key_cat.users) == {site.attention, canonical.graph.output_node()}
        # nor does a reshape with the head dim as a literal read the output
        assert all(user.target == torch.ops.aten.transpose.int for user in site.attention.users)
    with torch.no_grad():
        for want, got in zip(_run(captured), _run(canonical)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_canonicalize_is_idempotent_and_sites_survive():
    canonical = canonicalize_attention(capture(make_tiny_model("llama")), NO_PLAN)
    before = canonical.graph.python_code("self").src
    again = canonicalize_attention(canonical, NO_PLAN)
    assert again.graph.python_code("self").src == before
    assert [s.layer for s in find_attention_sites(again)] == [0, 1]
