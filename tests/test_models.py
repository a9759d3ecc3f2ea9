import json

import pytest

from epkit.errors import TopologyError
from epkit.topology.models import ModelSpec, bundled_model_names

GIB = 2**30


def test_bundled_models_include_required_ones():
    names = set(bundled_model_names())
    for required in ("deepseek-ai/DeepSeek-V3-0324", "Qwen/Qwen3-30B-A3B", "Qwen/Qwen3-235B-A22B",
                     "mistralai/Mixtral-8x7B-v0.1", "openai/gpt-oss-120b", "epkit-tiny-moe"):
        assert required in names


def test_deepseek_v3_facts():
    s = ModelSpec.load("deepseek-ai/DeepSeek-V3-0324")
    assert (s.num_layers, s.num_moe_layers, s.num_experts, s.top_k) == (61, 58, 256, 8)
    assert (s.num_expert_groups, s.topk_group, s.num_shared_experts) == (8, 4, 1)
    assert s.expert_quant.method == "fp8" and s.expert_quant.block == (128, 128)
    # 3 × 7168 × 2048 fp8 bytes + 128×128-block fp32 scales
    assert s.bytes_per_expert == 3 * 7168 * 2048 + 3 * (56 * 16) * 4
    assert 44.0e6 < s.bytes_per_expert < 44.1e6
    assert 670e9 < s.total_params < 672e9  # the published 671B (without the MTP layer)
    assert s.kv_bytes_per_token() == (512 + 64) * 61 * 2  # MLA latent + rope key


@pytest.mark.parametrize("name,layers,experts,topk,bpe_mb,params_b", [
    ("Qwen/Qwen3-30B-A3B", 48, 128, 8, 9.437, 30.5),
    ("Qwen/Qwen3-235B-A22B", 94, 128, 8, 37.749, 235.1),
    ("mistralai/Mixtral-8x7B-v0.1", 32, 8, 2, 352.322, 46.7),
    ("openai/gpt-oss-120b", 36, 128, 4, 13.24, 116.8),
    ("openai/gpt-oss-20b", 24, 32, 4, 13.24, 20.9),
])
def test_family_facts(name, layers, experts, topk, bpe_mb, params_b):
    s = ModelSpec.load(name)
    assert (s.num_moe_layers, s.num_experts, s.top_k) == (layers, experts, topk)
    assert s.bytes_per_expert / 1e6 == pytest.approx(bpe_mb, abs=0.01)
    assert s.total_params / 1e9 == pytest.approx(params_b, abs=0.1)


def test_qwen_sparse_step_and_mlp_only_layers():
    cfg = json.loads(json.dumps(ModelSpec.load("Qwen/Qwen3-30B-A3B").raw))
    cfg.update(decoder_sparse_step=2, mlp_only_layers=[1, 3])
    s = ModelSpec.load(cfg)
    assert s.moe_layer_indices == tuple(i for i in range(48) if (i + 1) % 2 == 0 and i not in (1, 3))
    assert s.num_dense_layers == 48 - s.num_moe_layers


def test_gpt_oss_experts_are_mxfp4():
    s = ModelSpec.load("openai/gpt-oss-120b")
    assert s.expert_quant.method == "mxfp4"
    elements = 3 * 2880 * 2880
    assert s.bytes_per_expert == pytest.approx(elements * (0.5 + 1 / 32) + (2 * 2880 + 2880) * 2)


def test_config_path_and_dir(tmp_path):
    cfg = ModelSpec.load("mistralai/Mixtral-8x7B-v0.1").raw
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg)))
    assert ModelSpec.load(tmp_path).num_experts == 8
    assert ModelSpec.load(tmp_path / "config.json").num_experts == 8


@pytest.mark.parametrize("mutate,needle", [
    ({"model_type": "llama"}, "model_type='llama'"),
    ({"num_local_experts": None}, "num_local_experts"),
    ({"torch_dtype": "int3"}, "torch_dtype='int3'"),
    ({"num_experts_per_tok": 99}, "num_experts_per_tok=99"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quant_method='gptq'"),
])
def test_bad_configs_name_the_field(mutate, needle):
    cfg = dict(ModelSpec.load("mistralai/Mixtral-8x7B-v0.1").raw)
    cfg.update(mutate)
    with pytest.raises(TopologyError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        ModelSpec.load(cfg)


def test_unknown_model_lists_bundled():
    with pytest.raises(TopologyError, match="bundled models: .*DeepSeek-V3-0324"):
        ModelSpec.load("nobody/NoSuchModel")
