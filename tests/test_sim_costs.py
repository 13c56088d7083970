"""The simulator's roofline cost model: profile loading and analytic cases, exactly."""

import json

import pytest

from microserve.sim.costs import CostModel, load_gpu, load_link, load_model


def test_profiles_match_the_published_models():
    m8, m70 = load_model("llama-3.1-8b"), load_model("llama-3.1-70b")
    assert m8.total_params == pytest.approx(8.03e9, rel=0.01)
    assert m70.total_params == pytest.approx(70.6e9, rel=0.01)
    assert m8.kv_bytes_per_token == 128 * 1024  # 32 layers x 8 KV heads x 128 x K,V x bf16
    assert load_gpu("h100").hbm_tb_s == 3.35 and load_link("ib400").bandwidth_gb_s == 50.0


def test_profile_errors_and_files(tmp_path):
    with pytest.raises(ValueError, match=r"unknown gpu 'tpu'.*h100"):
        load_gpu("tpu")
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                               "intermediate_size": 128, "vocab_size": 100}))
    tiny = load_model(str(cfg))
    assert (tiny.name, tiny.kv_heads, tiny.head_dim) == ("tiny", 4, 16)


def test_decode_alone_is_memory_bound():
    m, g = load_model("llama-3.1-8b"), load_gpu("h100")
    cost = CostModel(m, g)
    want = (m.weight_bytes + m.kv_bytes_per_token * (100 + 1)) / (3.35e12 * 0.8) + 2e-3
    assert cost.step_seconds(decode_contexts=[100]) == pytest.approx(want, rel=1e-12)


def test_long_prefill_is_compute_bound_and_tp_splits_it():
    m, g = load_model("llama-3.1-8b"), load_gpu("h100")
    n = 4096
    flops = 2 * m.linear_params * n + 2 * m.lm_head_params + 4 * m.heads * m.head_dim * m.layers * n * (n + 1) // 2
    one = CostModel(m, g).step_seconds(prefill=[(0, n)])
    assert one == pytest.approx(flops / (989e12 * 0.6) + 2e-3, rel=1e-12)
    four = CostModel(m, g, tp=4)
    assert four.step_seconds(prefill=[(0, n)]) == pytest.approx(
        flops / (989e12 * 0.6) / 4 + four.allreduce_seconds(n) + 2e-3, rel=1e-12)
    assert four.allreduce_seconds(n) > 0 and CostModel(m, g).allreduce_seconds(n) == 0


def test_transfer_and_capacity():
    m70, link = load_model("llama-3.1-70b"), load_link("ib400")
    cost = CostModel(m70, load_gpu("h100"), tp=4)
    assert cost.transfer_seconds(3000, link) == pytest.approx(
        10e-6 + 3000 * m70.kv_bytes_per_token / (50e9 * 0.8 * 4), rel=1e-12)
    assert 1e5 < cost.kv_capacity_tokens() < 2e6
    with pytest.raises(ValueError, match="does not fit"):
        CostModel(m70, load_gpu("h100"), tp=1).kv_capacity_tokens()
