"""Resized models against transformers itself: a model resized by surgery must be the model
transformers builds at the target count holding the same weights (strict load: same keys and
shapes), and give the same tensors from every forward the class offers: every tensor of its output
(logits, hidden states, pooled outputs, feature maps, boxes, losses) and its generations."""

import pytest

hf = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import torch  # noqa: E402
from surgery_plugins.transformers_hf import blip2, detr, dinov2, peft_prompts  # noqa: E402
from surgery_plugins.transformers_hf.common import randomize_zero_tokens  # noqa: E402

import surgery  # noqa: E402
from surgery.errors import CountError  # noqa: E402


def tensors(output):
    """Every tensor in a transformers output (nested tuples of hidden states included), in order."""
    if isinstance(output, torch.Tensor):
        return [output]
    items = output.to_tuple() if hasattr(output, "to_tuple") else output
    if isinstance(items, (tuple, list)):
        return [t for item in items for t in tensors(item)]
    return []


def assert_same_outputs(a, b):
    ours, theirs = tensors(a), tensors(b)
    assert ours and len(ours) == len(theirs)
    for x, y in zip(ours, theirs):
        assert x.shape == y.shape and torch.equal(x, y)


def fresh_with_weights(cls, config, model):
    """transformers' model at `config`, holding `model`'s weights (strict: same keys, same shapes)."""
    torch.manual_seed(1)
    fresh = cls(config).eval()
    fresh.load_state_dict(model.state_dict())
    return fresh


def resized(cls, config, site, count, **resize):
    torch.manual_seed(0)
    model = randomize_zero_tokens(cls(config).eval())
    surgery.resize(model, **{site: count}, **resize)
    return model


# -- DINOv2 with registers ---------------------------------------------------------------------------

DINO_CLASSES = [hf.Dinov2WithRegistersModel, hf.Dinov2WithRegistersForImageClassification,
                hf.Dinov2WithRegistersBackbone]


@pytest.mark.parametrize("cls", DINO_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("target", [0, 5])
def test_dinov2_registers_match_transformers(cls, target):
    extra = dict(out_features=["stage1", "stage2"]) if cls is hf.Dinov2WithRegistersBackbone else {}
    model = resized(cls, dinov2.tiny_config(2, **extra), "num_register_tokens", target)
    fresh = fresh_with_weights(cls, dinov2.tiny_config(target, **extra), model)
    assert model.config.num_register_tokens == target
    assert getattr(model, "num_register_tokens", target) == target  # the Backbone's own copy
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_same_outputs(model(x, output_hidden_states=True), fresh(x, output_hidden_states=True))


def test_dinov2_keeps_registers_and_refuses_its_class_token():
    torch.manual_seed(0)
    model = dinov2.tiny(3)
    kept = model.dinov2_with_registers.embeddings.register_tokens.detach().clone()
    surgery.resize(model, num_register_tokens=1)
    assert torch.equal(model.dinov2_with_registers.embeddings.register_tokens, kept[:, :1])
    with pytest.raises(CountError, match="always has one class token"):
        surgery.resize(model, class_token=0)


# -- BLIP-2 and InstructBLIP ---------------------------------------------------------------------------

IMAGES = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
TEXT = torch.randint(3, 50, (2, 5), generator=torch.Generator().manual_seed(4))
INSTRUCTION = torch.randint(1, 39, (2, 4), generator=torch.Generator().manual_seed(5))


def _blip_forward(model):
    """The class's forward, with a prompt written for the model's count now."""
    prompt = blip2.image_prompt(model, TEXT)
    if isinstance(model, hf.Blip2VisionModelWithProjection):
        return model(pixel_values=IMAGES)
    if isinstance(model, hf.Blip2ForImageTextRetrieval):
        qformer_text = torch.cat([prompt[:, :model.config.num_query_tokens], INSTRUCTION], dim=1)
        mask = torch.ones_like(qformer_text)
        return tuple(model(pixel_values=IMAGES, input_ids=qformer_text, attention_mask=mask,
                           use_image_text_matching_head=head) for head in (True, False))
    extra = {"qformer_input_ids": INSTRUCTION} if "InstructBlip" in type(model).__name__ else {}
    if not model.config.use_decoder_only_language_model:
        extra["decoder_input_ids"] = TEXT[:, :3]
    return model(pixel_values=IMAGES, input_ids=prompt, output_hidden_states=True, **extra)


BLIP_CASES = [
    (hf.Blip2ForConditionalGeneration, dict(language="opt")),
    (hf.Blip2ForConditionalGeneration, dict(language="t5")),
    (hf.Blip2Model, dict(language="opt")),
    (hf.Blip2ForImageTextRetrieval, dict(language="opt")),
    (hf.Blip2VisionModelWithProjection, dict(language="opt")),
    (hf.InstructBlipForConditionalGeneration, dict(instruct=True)),
    (hf.InstructBlipModel, dict(instruct=True)),
]


@pytest.mark.parametrize("cls, kind", BLIP_CASES,
                         ids=lambda c: getattr(c, "__name__", None) or "-".join(map(str, c.values())))
@pytest.mark.parametrize("target", [2, 7])
def test_blip2_queries_match_transformers(cls, kind, target):
    def config(count):
        made = blip2.tiny_config(count, **kind)
        made.qformer_config.use_qformer_text_input = cls is hf.Blip2ForImageTextRetrieval  # its text branch
        return made

    model = resized(cls, config(4), "num_query_tokens", target)
    fresh = fresh_with_weights(cls, config(target), model)
    assert model.config.num_query_tokens == target and model.query_tokens.shape[1] == target
    with torch.no_grad():
        assert_same_outputs(_blip_forward(model), _blip_forward(fresh))


@pytest.mark.parametrize("language", ["opt", "t5"])
def test_blip2_generates_as_transformers_at_the_new_count(language):
    model = resized(hf.Blip2ForConditionalGeneration, blip2.tiny_config(4, language), "num_query_tokens", 2)
    fresh = fresh_with_weights(hf.Blip2ForConditionalGeneration, blip2.tiny_config(2, language), model)
    for prompt in (None, blip2.image_prompt(model, TEXT)):  # captioning (the model writes the image tokens), a prompt
        ours = model.generate(pixel_values=IMAGES, input_ids=prompt, max_new_tokens=4, do_sample=False)
        theirs = fresh.generate(pixel_values=IMAGES, input_ids=prompt, max_new_tokens=4, do_sample=False)
        assert torch.equal(ours, theirs)
    if language == "opt":  # decoder-only: the output starts with the prompt, 2 image tokens now
        assert (ours[:, :2] == blip2.IMAGE_TOKEN).all() and ours[:, 2].ne(blip2.IMAGE_TOKEN).all()


def test_instructblip_generates_as_transformers_at_the_new_count():
    model = resized(hf.InstructBlipForConditionalGeneration, blip2.tiny_config(4, instruct=True),
                    "num_query_tokens", 6)
    fresh = fresh_with_weights(hf.InstructBlipForConditionalGeneration, blip2.tiny_config(6, instruct=True), model)
    args = dict(pixel_values=IMAGES, qformer_input_ids=INSTRUCTION, input_ids=blip2.image_prompt(model, TEXT),
                max_new_tokens=3, do_sample=False)
    assert torch.equal(model.generate(**args), fresh.generate(**args))


def test_inside_tokens_the_prompt_follows_and_afterwards_comes_back():
    torch.manual_seed(0)
    model = blip2.tiny(4)
    with surgery.tokens(model, num_query_tokens=2):
        assert blip2.image_prompt(model, TEXT).shape == (2, 2 + 5)
        with torch.no_grad():
            model(pixel_values=IMAGES, input_ids=blip2.image_prompt(model, TEXT))
    assert model.config.num_query_tokens == 4 and blip2.image_prompt(model, TEXT).shape == (2, 9)


def test_a_processor_follows_the_model():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate("a photo of cat dog".split())}}
    words = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = hf.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", pad_token="[PAD]")
    processor = hf.Blip2Processor(hf.BlipImageProcessor(size={"height": 16, "width": 16}), tokenizer,
                                  num_query_tokens=4)
    torch.manual_seed(0)
    model = blip2.tiny(4)
    model.config.image_token_index = processor.tokenizer.convert_tokens_to_ids("<image>")
    surgery.resize(model, num_query_tokens=3)
    image = torch.rand(3, 16, 16)
    before = processor(images=image, text="a photo of a cat", return_tensors="pt")
    assert (before.input_ids == model.config.image_token_index).sum() == 4  # still written for 4
    blip2.sync_processor(processor, model)
    after = processor(images=image, text="a photo of a cat", return_tensors="pt")
    assert (after.input_ids == model.config.image_token_index).sum() == 3
    text = after.input_ids[:, 3:]
    assert torch.equal(after.input_ids, blip2.image_prompt(model, text))  # the same prompt image_prompt writes


def test_blip2_refuses_zero_queries():
    model = blip2.tiny(4)
    with pytest.raises(CountError, match="no image at all"):
        surgery.resize(model, num_query_tokens=0)


# -- DETR -------------------------------------------------------------------------------------------

PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
LABELS = [{"class_labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.6, 0.1, 0.3]])},
          {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.4, 0.4, 0.5, 0.5]])}]


def _detr_config(count, conditional, segmentation):
    config = detr.tiny_config(count, conditional)
    if segmentation:  # the mask head reads three backbone stages, and wants d_model + heads divisible by 8
        config.encoder_attention_heads = config.decoder_attention_heads = 8
        config.backbone_config.out_features = ["stage2", "stage3", "stage4"]
        config.backbone_config.out_indices = [2, 3, 4]
    return config


DETR_CASES = [(hf.DetrModel, False), (hf.DetrForObjectDetection, False), (hf.DetrForSegmentation, False),
              (hf.ConditionalDetrForObjectDetection, True), (hf.ConditionalDetrModel, True)]


@pytest.mark.parametrize("cls, conditional", DETR_CASES, ids=lambda c: getattr(c, "__name__", ""))
@pytest.mark.parametrize("target", [2, 9])
def test_detr_queries_match_transformers(cls, conditional, target):
    segmentation = cls is hf.DetrForSegmentation
    model = resized(cls, _detr_config(5, conditional, segmentation), "num_queries", target)
    fresh = fresh_with_weights(cls, _detr_config(target, conditional, segmentation), model)
    assert model.config.num_queries == target
    labels = {"labels": LABELS} if cls is hf.DetrForObjectDetection else {}  # the loss: matching over the queries
    with torch.no_grad():
        ours, theirs = model(PIXELS, **labels), fresh(PIXELS, **labels)
    assert_same_outputs(ours, theirs)
    assert (ours.logits.shape[1] if hasattr(ours, "logits") else ours.last_hidden_state.shape[1]) == target


# -- PEFT prompt and prefix tuning ----------------------------------------------------------------------

IDS = torch.randint(3, 47, (2, 6), generator=torch.Generator().manual_seed(7))


def _peft(count, kind, language):
    torch.manual_seed(0)
    return peft_prompts.tiny(count, kind, language)


@pytest.mark.parametrize("kind, language", [("prompt", "opt"), ("prefix", "opt"), ("prompt", "t5"), ("prefix", "t5")])
@pytest.mark.parametrize("target", [2, 7])
def test_peft_virtual_tokens_match_peft(kind, language, target):
    model = _peft(4, kind, language)
    surgery.resize(model, num_virtual_tokens=target)
    fresh = _peft(target, kind, language)
    fresh.load_state_dict(model.state_dict())
    assert model.peft_config["default"].num_virtual_tokens == target
    assert torch.equal(model.prompt_tokens["default"], fresh.prompt_tokens["default"])
    mask = torch.ones_like(IDS)
    extra = {"decoder_input_ids": IDS[:, :3]} if language == "t5" else {}
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS, attention_mask=mask, **extra).logits,
                           fresh(input_ids=IDS, attention_mask=mask, **extra).logits)
        args = dict(input_ids=IDS, attention_mask=mask, max_new_tokens=3, do_sample=False)
        assert torch.equal(model.generate(**args), fresh.generate(**args))


def test_peft_seq2seq_prompt_keeps_both_blocks():
    """A seq2seq prompt-tuning table holds the encoder's N rows then the decoder's N: shrinking
    keeps the first rows of each block, not the first rows of the table."""
    model = _peft(4, "prompt", "t5")
    table = model.prompt_encoder["default"].embedding.weight.detach().clone()
    surgery.resize(model, num_virtual_tokens=2)
    assert torch.equal(model.prompt_encoder["default"].embedding.weight, torch.cat([table[0:2], table[4:6]]))


def test_peft_adapters_have_a_site_each():
    model = _peft(4, "prompt", "opt")
    model.add_adapter("short", peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    assert {n: s.count for n, s in surgery.sites(model).items()} == \
        {"num_virtual_tokens.default": 4, "num_virtual_tokens.short": 3}
    default_rows = model.prompt_encoder["default"].embedding.weight.detach().clone()
    surgery.resize(model, **{"num_virtual_tokens.short": 5})
    assert model.peft_config["short"].num_virtual_tokens == 5 and len(model.prompt_tokens["short"]) == 5
    assert torch.equal(model.prompt_encoder["default"].embedding.weight, default_rows)  # the other adapter untouched
    model.set_adapter("short")
    with torch.no_grad():
        assert model(input_ids=IDS).logits.shape == (2, 5 + 6, peft_prompts.VOCAB)
