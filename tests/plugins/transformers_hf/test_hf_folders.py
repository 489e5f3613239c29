"""Hugging Face folders: what `save_pretrained` writes loads through `surgery.load` (the plugin's
`surgery_checkpoint_layout` renames transformers' checkpoint key names to the modules'), into a
model at any count; a resized model saved with transformers' (or peft's) own `save_pretrained`
opens with `from_pretrained` as the same model at the new count. config.json is data: nothing it
names is imported, and a broken or hostile folder is refused with the model left as it was."""

import json

import pytest

hf = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import torch  # noqa: E402
from surgery_plugins.transformers_hf import blip2, detr, dinov2, peft_prompts, vit  # noqa: E402
from surgery_plugins.transformers_hf.folders import model_from_folder  # noqa: E402

import surgery  # noqa: E402
from surgery.errors import CheckpointError  # noqa: E402

IMAGES = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def outputs(model, *args, **kwargs):
    with torch.no_grad():
        out = model(*args, **kwargs)
    return [t for t in out.to_tuple() if isinstance(t, torch.Tensor)]


def assert_same(a, b):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.shape == y.shape and torch.equal(x, y), (i, (x - y).abs().max())


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_dinov2_folder_loads_at_its_count_and_a_resized_one_reopens(tmp_path):
    torch.manual_seed(0)
    source = dinov2.tiny(2)
    source.save_pretrained(tmp_path / "two")
    torch.manual_seed(1)
    target = dinov2.tiny(5)  # another count, other weights
    result = surgery.load(tmp_path / "two", target)
    assert result.counts["num_register_tokens"] == 2 and target.config.num_register_tokens == 2
    assert same_weights(target, source)
    assert_same(outputs(target, IMAGES), outputs(source, IMAGES))
    # resized, saved by transformers itself, opened by transformers at the new count
    surgery.resize(target, num_register_tokens=4)
    target.save_pretrained(tmp_path / "four")
    reopened = hf.Dinov2WithRegistersForImageClassification.from_pretrained(tmp_path / "four").eval()
    assert reopened.config.num_register_tokens == 4 and same_weights(reopened, target)
    assert_same(outputs(reopened, IMAGES), outputs(target, IMAGES))
    built = model_from_folder(tmp_path / "four")  # the plugin's own: class and count from config.json
    assert type(built) is hf.Dinov2WithRegistersForImageClassification and built.config.num_register_tokens == 4
    surgery.load(tmp_path / "four", built)
    assert same_weights(built, target)


@pytest.mark.parametrize("language", ["opt", "t5"])
def test_a_blip2_folder_with_tied_embeddings_round_trips(tmp_path, language):
    torch.manual_seed(0)
    source = blip2.tiny(4, language)
    surgery.resize(source, num_query_tokens=6)
    source.save_pretrained(tmp_path / "blip")  # tied lm_head / embed_tokens written once
    reopened = hf.Blip2ForConditionalGeneration.from_pretrained(tmp_path / "blip").eval()
    assert reopened.config.num_query_tokens == 6 and same_weights(reopened, source)
    prompt = blip2.image_prompt(source, torch.tensor([[5, 6, 7], [8, 9, 10]]))
    args = dict(pixel_values=IMAGES, input_ids=prompt, max_new_tokens=3, do_sample=False)
    assert torch.equal(reopened.generate(**args), source.generate(**args))
    torch.manual_seed(1)
    target = blip2.tiny(2, language)
    surgery.load(tmp_path / "blip", target)
    assert target.config.num_query_tokens == 6 and same_weights(target, source)
    assert torch.equal(target.generate(**args), source.generate(**args))


def test_a_detr_folder_under_released_key_names_loads(tmp_path):
    torch.manual_seed(0)
    source = detr.tiny(5)
    source.save_pretrained(tmp_path / "detr")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "detr" / "model.safetensors"), "pt") as f:
        file_keys = set(f.keys())
    assert file_keys != set(source.state_dict())  # transformers writes the released names (backbone.conv_encoder...)
    torch.manual_seed(1)
    target = detr.tiny(9)
    surgery.load(tmp_path / "detr", target)
    assert target.config.num_queries == 5 and same_weights(target, source)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    assert_same(outputs(target, pixels), outputs(source, pixels))
    surgery.resize(target, num_queries=3)
    target.save_pretrained(tmp_path / "three")
    reopened = hf.DetrForObjectDetection.from_pretrained(tmp_path / "three").eval()
    assert reopened.config.num_queries == 3 and same_weights(reopened, target)
    # the same weights; the outputs agree to float rounding only: transformers' loader leaves the
    # tensors laid out otherwise, and the ResNet's kernels then sum in another order (as for any
    # DETR it loads, resized or not)
    for ours, theirs in zip(outputs(target, pixels), outputs(reopened, pixels)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_a_sharded_vit_folder_loads(tmp_path):
    torch.manual_seed(0)
    source = vit.tiny_deit()
    source.save_pretrained(tmp_path / "deit", max_shard_size="10KB")
    assert (tmp_path / "deit" / "model.safetensors.index.json").exists()
    target = model_from_folder(tmp_path / "deit")
    surgery.load(tmp_path / "deit", target)
    assert same_weights(target, source)


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_a_peft_adapter_folder_is_partial_and_reopens_at_the_new_count(tmp_path, kind):
    torch.manual_seed(0)
    source = peft_prompts.tiny(4, kind)
    surgery.resize(source, num_virtual_tokens=6)
    source.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["num_virtual_tokens"] == 6
    ids = torch.randint(3, 47, (2, 5), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    base = peft_prompts.tiny_base()
    reopened = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert reopened.peft_config["default"].num_virtual_tokens == 6
    with torch.no_grad():
        assert torch.equal(reopened(input_ids=ids).logits, source(input_ids=ids).logits)
    torch.manual_seed(0)
    target = peft_prompts.tiny(2, kind)  # same base weights, another count
    base_before = {k: v.clone() for k, v in target.get_base_model().state_dict().items()}
    result = surgery.load(tmp_path / "adapter", target)
    assert result.counts["num_virtual_tokens"] == 6 and result.missing_keys  # partial: the base is not in it
    assert all(torch.equal(v, base_before[k]) for k, v in target.get_base_model().state_dict().items())
    with torch.no_grad():
        assert torch.equal(target(input_ids=ids).logits, source(input_ids=ids).logits)


# -- refusals -------------------------------------------------------------------------------------


def _folder(tmp_path, config, model=None):
    folder = tmp_path / "folder"
    (model or dinov2.tiny(2)).save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(config) if isinstance(config, dict) else config)
    return folder


def _unchanged(model, attempt):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    counts = surgery.counts(model)
    with pytest.raises(CheckpointError) as error:
        attempt()
    assert surgery.counts(model) == counts
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    return str(error.value)


def test_config_json_names_no_code(tmp_path):
    torch.manual_seed(0)
    source = dinov2.tiny(2)
    config = json.loads(source.config.to_json_string())
    config.update(architectures=["os.system", "AutoModelForCausalLM"], auto_map={"AutoModel": "evil.Model"})
    folder = _folder(tmp_path, config, source)
    built = model_from_folder(folder)  # names outside the plugin's table: the type's base model, nothing imported
    assert type(built) is hf.Dinov2WithRegistersModel
    import sys

    assert "evil" not in sys.modules


def test_unsupported_or_broken_folders_are_refused_and_change_nothing(tmp_path):
    torch.manual_seed(0)
    model = dinov2.tiny(3)
    folder = _folder(tmp_path, {"model_type": "llama"})
    assert "no plugin recognises" in _unchanged(model, lambda: surgery.load(folder, model))
    with pytest.raises(CheckpointError, match="model_type 'llama' is not one the transformers plugin supports"):
        model_from_folder(folder)
    (folder / "config.json").write_text("{not json")
    assert "not a readable JSON file" in _unchanged(model, lambda: surgery.load(folder, model))
    # a shard index that points outside the folder
    folder = _folder(tmp_path, json.loads(dinov2.tiny(2).config.to_json_string()))
    (folder / "model.safetensors").rename(folder / "elsewhere.bin")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../secret.safetensors"}}))
    refused = _unchanged(model, lambda: surgery.load(folder, model))
    assert "shards must be .safetensors files in the folder itself" in refused
    # a folder of another class than the model: its keys do not fit, and the model stays as it was
    other = tmp_path / "vit"
    vit.tiny_vit().save_pretrained(other)
    assert "does not fit the model" in _unchanged(model, lambda: surgery.load(other, model))
