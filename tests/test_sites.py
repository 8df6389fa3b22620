"""Analysis finds every attention site from the graph alone, for each architecture."""

import pytest
import torch

from kvcompile import capture
from kvcompile.passes import SiteMatchError, find_attention_sites
from tests.tiny_models import ARCHITECTURES, make_tiny_model


def _weight_name(gm, linear):
    weight = linear.args[1]
    return weight.target if weight.op == "get_attr" else weight.name


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_one_site_per_layer_with_projections_and_rope(arch):
    model = make_tiny_model(arch)
    gm = capture(model)
    sites = find_attention_sites(gm)
    assert [s.layer for s in sites] == [0, 1]
    for site in sites:
        prefix = f"layers.{site.layer}.self_attn."
        assert site.module_path == f"model.layers.{site.layer}.self_attn"
        assert site.past_key.target == f"past_key_{site.layer}"
        assert site.past_value.target == f"past_value_{site.layer}"
        if arch == "phi3":  # one fused projection feeds q, k and v
            assert site.q_proj is site.k_proj is site.v_proj
            assert _weight_name(gm, site.q_proj).endswith(prefix + "qkv_proj.weight")
        else:
            for part in ("q", "k", "v"):
                assert _weight_name(gm, getattr(site, f"{part}_proj")).endswith(prefix + f"{part}_proj.weight")
        assert _weight_name(gm, site.o_proj).endswith(prefix + "o_proj.weight")
        assert site.rope is not None and site.rope.layout == "rotate_half"
        assert site.rope.rotary_dims == 16
        assert site.scale == pytest.approx(16**-0.5)
        assert site.query.meta["val"].shape[1] == 4


class _MatmulAttention(torch.nn.Module):
    """An attention whose scores are computed by hand: no SDPA for analysis to anchor on."""

    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, hidden_states, **kwargs):
        kwargs["past_key_values"].update(
            self.attn.k_proj(hidden_states).view(*hidden_states.shape[:2], 2, 16).transpose(1, 2),
            self.attn.v_proj(hidden_states).view(*hidden_states.shape[:2], 2, 16).transpose(1, 2),
            self.attn.layer_idx,
        )
        return self.attn.o_proj(self.attn.q_proj(hidden_states)), None


def test_layer_without_recognisable_attention_is_named():
    model = make_tiny_model("llama")
    model.model.layers[1].self_attn = _MatmulAttention(model.model.layers[1].self_attn)
    with pytest.raises(SiteMatchError, match=r"layer 1: could not find the attention"):
        find_attention_sites(capture(model))


def test_cache_concat_hidden_behind_other_ops_is_named():
    gm = capture(make_tiny_model("llama"))
    site = find_attention_sites(gm)[0]
    # route the layer-0 key through an op that is not a GQA repeat
    with gm.graph.inserting_after(site.key_cat):
        scaled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (site.key_cat, 1.0))
    site.key_cat.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled and user.op != "output")
    with pytest.raises(SiteMatchError, match=r"layer 0 \(model.layers.0.self_attn\): could not find the key cache concat"):
        find_attention_sites(gm)
