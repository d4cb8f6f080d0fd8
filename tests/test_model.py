"""Model: shapes and counts, packed reference path == fake-quant training model, KV cache, configs."""

import copy

import pytest
import torch

from bittern.configs import CONFIGS, ModelConfig, get_config
from bittern.generate import generate_ids
from bittern.kernels import ternary_linear
from bittern.kernels.reference import int_matmul
from bittern.layers import BitLinear, PackedLinear
from bittern.model import KVCache, Transformer
from bittern.pack import TernaryWeight
from bittern.quant import quantize_activation
from bittern.sampling import SamplingParams

VARIANTS = ["tiny", "tiny-2b4t", "tiny-faq"]


@pytest.mark.parametrize("name", VARIANTS)
def test_parameter_count_is_computed_from_shapes(name):
    cfg = get_config(name)
    for linear in ("bitnet", "fp"):
        model = Transformer(cfg.replace(linear=linear))
        unique = {id(p): p.numel() for p in model.parameters()}
        assert sum(unique.values()) == cfg.num_params()
    assert cfg.num_params(include_embeddings=False) < cfg.num_params()


def test_named_configs_have_plausible_sizes():
    billions = {name: CONFIGS[name].num_params() / 1e9 for name in ["700M", "1.3B", "3B", "3.9B", "7B", "13B", "70B", "100B", "2B4T"]}
    assert 0.6 < billions["700M"] < 0.85 and 1.2 < billions["1.3B"] < 1.5
    assert 3.0 < billions["3B"] < 3.6 and 3.7 < billions["3.9B"] < 4.2
    assert 6.5 < billions["7B"] < 7.0 and 12.5 < billions["13B"] < 13.5
    assert 65 < billions["70B"] < 72 and 95 < billions["100B"] < 105
    assert 2.3 < billions["2B4T"] < 2.5  # 2.08 B non-embedding + 0.33 B tied embedding
    two_b = CONFIGS["2B4T"]
    assert (two_b.hidden_size, two_b.num_layers, two_b.num_kv_heads, two_b.intermediate_size) == (2560, 30, 5, 6912)


def test_config_validation_and_round_trip():
    cfg = get_config("tiny-2b4t")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="divisible"):
        cfg.replace(num_heads=3)
    with pytest.raises(ValueError, match="unknown config"):
        get_config("nope")
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_bitnet_and_fp_twins_have_the_same_shapes():
    cfg = get_config("tiny")
    a, b = Transformer(cfg), Transformer(cfg.replace(linear="fp"))
    assert [(n, p.shape) for n, p in a.named_parameters()] == [(n, p.shape) for n, p in b.named_parameters()]
    assert any(isinstance(m, BitLinear) for m in a.modules())
    assert not any(isinstance(m, BitLinear) for m in b.modules())


def test_reference_backend_matches_hand_integer_product():
    torch.manual_seed(3)
    w = torch.randn(11, 29)
    x = torch.randn(4, 29) * 3
    tw = TernaryWeight.from_float(w, "1.6bit")
    q, s = quantize_activation(x)
    acc = (q.long() @ tw.codes().long().t())
    expected = acc.float() * (tw.scale / s)
    assert torch.equal(ternary_linear(x, tw, "reference"), expected)


def test_int32_accumulation_worst_case_has_no_overflow():
    k = 28672
    q = torch.full((1, k), -128, dtype=torch.int8)
    codes = torch.ones(2, k, dtype=torch.int8)
    codes[1] = -1
    assert int_matmul(q, codes).tolist() == [[-128 * k, 128 * k]]


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("layout", ["2bit", "1.6bit"])
def test_packed_reference_logits_equal_fake_quant_logits(name, layout):
    torch.manual_seed(0)
    model = Transformer(get_config(name)).eval()
    packed = copy.deepcopy(model).freeze(layout)
    assert packed.is_packed and all(isinstance(m, PackedLinear) for m in packed.packed_linears().values())
    tokens = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        a, b = model(tokens), packed(tokens)
    assert a.abs().max() > 0.1  # real logits, not zeros
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    params = SamplingParams(max_tokens=16)
    assert list(generate_ids(model, [1, 2, 3], params)) == list(generate_ids(packed, [1, 2, 3], params))


@pytest.mark.parametrize("name", VARIANTS)
def test_kv_cache_incremental_equals_full_forward(name):
    torch.manual_seed(1)
    model = Transformer(get_config(name)).freeze()
    tokens = torch.randint(0, model.config.vocab_size, (2, 20))
    cache = KVCache(model.config, 2, 32)
    with torch.no_grad():
        full = model(tokens)
        parts = [model(tokens[:, :7], cache, 0)] + [model(tokens[:, i:i + 1], cache, i) for i in range(7, 20)]
    torch.testing.assert_close(full, torch.cat(parts, dim=1), rtol=1e-4, atol=1e-5)


def test_kv_cache_copied_prefix_continues_like_the_original():
    torch.manual_seed(2)
    model = Transformer(get_config("tiny")).freeze()
    tokens = torch.randint(0, model.config.vocab_size, (1, 12))
    cache = KVCache(model.config, 3, 32)
    with torch.no_grad():
        model(tokens[:, :9], cache, 0, torch.tensor([0]))
        cache.copy_prefix(0, 2, 9)
        a = model(tokens[:, 9:], cache, 9, torch.tensor([0]))
        b = model(tokens[:, 9:], cache, 9, torch.tensor([2]))
    assert torch.equal(a, b) and not torch.equal(cache.k[:, 1, :, :9], cache.k[:, 0, :, :9])
    with pytest.raises(ValueError, match="cannot copy"):
        cache.copy_prefix(0, 3, 4)


def test_context_overflow_is_a_clear_error():
    model = Transformer(get_config("tiny"))
    with pytest.raises(ValueError, match="context length"):
        model(torch.zeros(1, model.config.max_seq_len + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="context"):
        list(generate_ids(model, list(range(model.config.max_seq_len)), SamplingParams()))


def test_bitlinear_trains_latent_weights():
    torch.manual_seed(0)
    layer = BitLinear(16, 8, norm=True)
    x, target = torch.randn(32, 16), torch.randn(32, 8)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.mse_loss(layer(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    packed = layer.freeze()
    with torch.no_grad():
        torch.testing.assert_close(packed(x), layer(x), rtol=1e-4, atol=1e-4)


def test_fp_model_cannot_be_frozen():
    with pytest.raises(ValueError, match="only a BitNet"):
        Transformer(get_config("tiny", linear="fp")).freeze()
