"""Bad input gets a clear exception and leaves the engine serving."""

import json
import shutil

import msgspec
import pytest

from microserve import LLM, InvalidRequestError, SamplingParams
from microserve.engine.config import ModelConfig, UnsupportedModelError
from microserve.engine.model.loader import CheckpointError

OK = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(demo_path):
    return LLM(demo_path, max_model_len=64)


@pytest.mark.parametrize("prompt, message", [
    ([], "empty"),
    ("", "empty"),
    (list(range(5, 69)), "context is 64"),
    ([5, 6, 100000], "outside the vocabulary"),
    ([5, -1], "outside the vocabulary"),
])
def test_bad_prompts(llm, prompt, message):
    with pytest.raises(InvalidRequestError, match=message):
        llm.generate([prompt], OK)
    # nothing queued, nothing leaked, still serving
    assert not llm.engine.has_unfinished() and llm.engine.kv.pool.num_used == llm.engine.kv.num_cached
    assert len(llm.generate([[5, 6, 7]], OK)[0].token_ids) == 4


def test_one_bad_prompt_rejects_the_call_before_any_work(llm):
    with pytest.raises(InvalidRequestError):
        llm.generate([[5, 6], []], OK)
    assert not llm.engine.has_unfinished()


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-3), "top_k"),
    (dict(seed=-1), "seed"),
    (dict(stop_token_ids=[-4]), "stop_token_ids"),
])
def test_bad_sampling_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_sampling_params_decode_strictly():
    assert msgspec.json.decode(b'{"max_tokens": 3, "temperature": 0}', type=SamplingParams).max_tokens == 3
    with pytest.raises(msgspec.ValidationError, match="max_tokens"):
        msgspec.json.decode(b'{"max_tokens": 0}', type=SamplingParams)
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"max_tokens": 3, "bogus": 1}', type=SamplingParams)


def test_sampling_list_must_match_prompts(llm):
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        llm.generate([[5, 6]], [OK, OK])


def test_prompt_larger_than_kv_pool(demo_path):
    small = LLM(demo_path, block_size=4, num_kv_blocks=3)
    with pytest.raises(InvalidRequestError, match="KV blocks"):
        small.generate([list(range(5, 25))], OK)


@pytest.mark.parametrize("missing, message", [
    ("config.json", "config.json"),
    ("model.safetensors", "safetensors"),
    ("tokenizer.json", "tokenizer.json"),
])
def test_missing_checkpoint_files(demo_path, tmp_path, missing, message):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(demo_path, ckpt)
    (ckpt / missing).unlink()
    with pytest.raises((FileNotFoundError, CheckpointError), match=message):
        LLM(ckpt)


def test_missing_tensor_and_wrong_shape(demo_path, tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "ckpt"
    shutil.copytree(demo_path, ckpt)
    tensors = load_file(ckpt / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match="down_proj"):
        LLM(ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    shutil.copy(demo_path / "model.safetensors", ckpt / "model.safetensors")
    (ckpt / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 100}))
    with pytest.raises(CheckpointError, match="shape"):
        LLM(ckpt)


def test_unsupported_architecture_lists_supported():
    cfg = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}
    with pytest.raises(UnsupportedModelError, match=r"LlamaForCausalLM.*Qwen3ForCausalLM"):
        ModelConfig.from_dict(cfg)


def test_both_config_dialects():
    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2}
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    hub = ModelConfig.from_dict({**base, "rope_theta": 500000.0, "rope_scaling": rope})
    v5 = ModelConfig.from_dict({**base, "rope_parameters": {**rope, "rope_theta": 500000.0}})
    assert hub.rope == v5.rope and hub.rope.rope_type == "llama3" and hub.rope.theta == 500000.0
    with pytest.raises(UnsupportedModelError, match="rope type"):
        ModelConfig.from_dict({**base, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})


def _sentencepiece_folder(path):
    import sentencepiece as spm  # a test dependency (pyproject [test])
    path.mkdir()
    corpus = path / "corpus.txt"
    corpus.write_text("\n".join([f"the quick brown fox jumps over the lazy dog {i} times" for i in range(200)]
                                + ["hello world, hello tokens"] * 50))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(path / "tokenizer"), vocab_size=320,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1, byte_fallback=True,
                                   minloglevel=2, normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   add_dummy_prefix=True, split_digits=True)
    corpus.unlink()
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>",
                                                            "eos_token": "</s>", "add_bos_token": True}))
    return spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))


def test_a_sentencepiece_only_checkpoint_is_read(tmp_path):
    from microserve.engine.model.tokenizer import Tokenizer

    sp = _sentencepiece_folder(tmp_path / "spm")
    tok = Tokenizer(tmp_path / "spm")
    for text in ["hello world, the fox é", "the lazy dog 17 times\nnew line", "日本"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == sp.encode(text) and tok.decode(ids) == sp.decode(ids), text
    assert tok.encode("hello")[0] == 1 and tok.eos_token_id == 2  # <s> added, </s> known


def test_a_sentencepiece_checkpoint_without_the_converter_names_the_fix(tmp_path, monkeypatch):
    import sys

    from microserve.engine.model.tokenizer import Tokenizer

    _sentencepiece_folder(tmp_path / "spm")
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if transformers were not installed
    with pytest.raises(FileNotFoundError, match="pip install transformers sentencepiece protobuf"):
        Tokenizer(tmp_path / "spm")
    with pytest.raises(FileNotFoundError, match=r"nor a sentencepiece tokenizer\.model"):
        Tokenizer(tmp_path)
