import json

import pytest

import fflora
from fflora import FFBAConfig


def test_round_trips_through_json():
    cfg = FFBAConfig(r=4, alpha=8, r_backward=2, alpha_backward=3.0, forward=False, sub_blocks=("mlp",), phi="silu", dropout=0.1)
    again = FFBAConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert again.sub_blocks == ("mlp",)


def test_defaults_and_scales():
    cfg = FFBAConfig(r=8, alpha=16)
    assert (cfg.forward, cfg.backward, cfg.sub_blocks, cfg.phi, cfg.dropout) == (True, True, ("attn", "mlp"), "identity", 0.0)
    assert cfg.scale_forward == 2.0 and cfg.scale_backward == 2.0 and cfg.rank_backward == 8
    other = FFBAConfig(r=8, alpha=16, r_backward=4, alpha_backward=4)
    assert other.rank_backward == 4 and other.scale_backward == 1.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, r"FFBAConfig\.r must be an integer >= 1, got 0"),
        ({"r": 2.5}, r"FFBAConfig\.r must be an integer"),
        ({"r_backward": -1}, r"FFBAConfig\.r_backward must be an integer >= 1"),
        ({"alpha": 0}, r"FFBAConfig\.alpha must be a number > 0, got 0"),
        ({"alpha": -2.0}, r"FFBAConfig\.alpha must be a number > 0"),
        ({"phi": "tanh"}, r"FFBAConfig\.phi must be one of \('identity', 'relu', 'silu'\), got 'tanh'"),
        ({"forward": False, "backward": False}, r"forward and backward are both False"),
        ({"sub_blocks": ("attn", "ffn")}, r"FFBAConfig\.sub_blocks must be a non-empty subset of \('attn', 'mlp'\)"),
        ({"sub_blocks": ()}, r"FFBAConfig\.sub_blocks must be a non-empty subset"),
        ({"dropout": 1.0}, r"FFBAConfig\.dropout must be in \[0, 1\)"),
    ],
)
def test_bad_values_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FFBAConfig(**kwargs)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['rank'\]"):
        FFBAConfig.from_dict({"rank": 4})


def test_a_value_set_after_construction_is_checked_when_the_adapter_is_built():
    from conftest import make_model

    cfg = FFBAConfig(r=4)
    cfg.r = 0  # configurations are mutable, as PEFT's are
    with pytest.raises(ValueError, match=r"FFBAConfig\.r must be an integer >= 1, got 0"):
        fflora.apply_adapter(make_model("llama"), cfg)
