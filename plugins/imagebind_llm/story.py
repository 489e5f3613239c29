"""`surgery demo study`: the study's story, told on models with random weights, on a CPU, in seconds.

The study (docs/imagebind_llm.md, "The study") reads LLaMA-Adapter V2, where query_len = 10
learned visual queries carry an image into every adapted LLaMA layer, and ImageBind, whose heads
read one CLS token per modality; it supposes that more ImageBind CLS tokens, given to
ImageBind-LLM's LLaMA as more visual tokens, may help OCR and VQA. Its author could not start
ImageBind and tested nothing. Here each step runs: LLaMA-Adapter V2 generates while query_len
goes 10 -> 1 -> 64 (prefill ms and tokens/s each time), ImageBind's vision CLS tokens go 1 -> 4
with the head in mode `all`, ImageBind-LLM reads them as 4 visual tokens, and the guarantees of
that change are checked (`surgery.cli.walkthrough`). The weights are random (seeded), so the
text is gibberish; the shapes, the timings and the checks are real.

This plugin's command module registers it as a kind of `surgery demo` (its options are there:
that module imports no torch); it is the story `surgery demo` runs when typed alone.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

import surgery
from surgery.cli.format import format_shape_changes, print_lines, state_shapes
from surgery.commands import UsageError
from surgery.errors import BackboneError
from surgery.cli.walkthrough import (Change, Walkthrough, check_guarantees, checkpoint_name, forward_runner,
                                     keywords, shapes)
from surgery.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from surgery_plugins.llama_adapter.generate import Clock
from surgery_plugins.llama_adapter.tokenizer import format_prompt

INSTRUCTION = "What is written on the sign?"  # the study's hope: reading text (OCR) and answering (VQA)
QUERY_LENS = (10, 1, 64)  # the released count, the fewest, many
CLS_TOKENS = 4  # ImageBind's vision CLS tokens after the change (1 as released)
VISION = "num_cls_tokens.vision"


@dataclass(frozen=True)
class Cast:
    """The registered models a size of the story uses, with the keyword arguments they are built with."""

    llama_adapter: str
    imagebind: str
    imagebind_llm: str
    llama_adapter_kwargs: dict[str, Any] = field(default_factory=dict)
    imagebind_llm_kwargs: dict[str, Any] = field(default_factory=dict)


SIZES = {
    # the tiny models start at 3 queries and read 64 positions: built at 10 (as released) and with
    # room for the Alpaca prompt (about 55 tokens) and the answer
    "tiny": Cast("llama_adapter_v2_tiny", "imagebind_tiny_test", "imagebind_llm_tiny",
                 dict(query_len=10, max_seq_len=128), dict(max_seq_len=128)),
    # 7B's shape ratios (dim 1024, 16 layers): timings closer to the released models', slower
    "bench": Cast("llama_adapter_v2_bench", "imagebind_small", "imagebind_llm_bench"),
}

INTRO = """\
The study: LLaMA-Adapter V2 carries an image into its LLaMA through query_len=10 learned visual
queries; ImageBind reads one CLS token per modality, and ImageBind-LLM gives that one embedding to
its LLaMA as a single visual token. The hypothesis: more ImageBind CLS tokens, read as more visual
tokens, may help OCR and VQA (at the risk of unbalancing the modalities, which were tuned as
equals). Its author could not start ImageBind (a CUDA driver problem) and could test nothing.
Here every step runs on this machine with random weights (torch.manual_seed(0)) and the package's
small tokenizer: the text is gibberish, the shapes, timings and checks are real."""


def run(args: argparse.Namespace) -> int:
    if getattr(args, "model", None) or getattr(args, "set", None):  # `demo`'s own options, typed before `study`
        raise UsageError("--model and --set choose the single-model walk ('surgery demo --model NAME'); the story "
                         "builds its own models: type 'surgery demo study' without them")
    if args.max_new_tokens < 2:
        raise UsageError(f"--max-new-tokens must be at least 2 (a first token, then decoding to time), "
                         f"got {args.max_new_tokens}")
    cast = SIZES[args.size]
    missing = [name for name in (cast.llama_adapter, cast.imagebind, cast.imagebind_llm)
               if name not in surgery.get_host().models]
    if missing:  # e.g. SURGERY_PLUGINS left out the llama_adapter_v2 or imagebind plugin
        raise BackboneError(f"the study's story needs the models {', '.join(missing)}, which no loaded plugin "
                            f"registers; it uses the llama_adapter_v2, imagebind and imagebind_llm plugins "
                            f"(see 'surgery plugins')")
    change = Change({VISION: CLS_TOKENS}, {"head_mode": {"vision": "all"}})
    file_name = checkpoint_name(cast.imagebind_llm, change, args.out)  # before any work
    walk = Walkthrough()
    print(f"token-surgery demo: the study's story ({args.size} models, random weights)\n")
    print(INTRO)
    llama_adapter(walk, cast, args.max_new_tokens)
    imagebind(walk, cast)
    imagebind_llm(walk, cast, change, args.max_new_tokens, args.out, file_name)
    return walk.finish()


# -- 1-2. LLaMA-Adapter V2: generate, swap query_len, generate ------------------------------------


def llama_adapter(walk: Walkthrough, cast: Cast, max_new: int) -> None:
    torch.manual_seed(0)
    model = surgery.build(cast.llama_adapter, **cast.llama_adapter_kwargs)
    image = picture(model.config.clip.image_size)
    prompt = model.tokenizer.encode(format_prompt(INSTRUCTION), bos=True, eos=False)
    walk.step(f"LLaMA-Adapter V2 generates (query_len={model.query_len}, as released)",
              f"model = surgery.build({cast.llama_adapter!r}{_kwargs(cast.llama_adapter_kwargs)})",
              f"model.generate(image, [format_prompt({INSTRUCTION!r})], max_gen_len={max_new}, temperature=0)")
    print(f"  image {tuple(image.shape)}: a sign with three lines of 'text' under the sun, drawn with torch")
    print(f"  prompt: the Alpaca template around the instruction, {len(prompt)} tokens")
    print("  (each timing follows an untimed warm-up at the same shapes; a model this small is timed in\n"
          "   milliseconds, so rates vary from run to run: `surgery bench e2e` measures properly)")
    generate(model, image, prompt, 1)  # warm-up: first-call costs (allocations, dispatch) stay out of the timings
    first = generate(model, image, prompt, max_new)
    print(first.line(f"query_len={model.query_len}"))
    print(f"  {adapter_text(model)}")

    released = model.query_len
    walk.step(f"Swap query_len at runtime: {' -> '.join(map(str, QUERY_LENS))}, generating at each")
    stashed = 0
    for count in QUERY_LENS[1:]:
        if count < model.query_len:
            stashed = model.query_len - count
            note = f"truncate: the {stashed} dropped queries are stashed"
        else:
            new = count - model.query_len - stashed
            note = (f"restore: the {stashed} stashed queries come back, " if stashed else "") + \
                   f"{new} new ones drawn by the site's default init ({surgery.sites(model)['query_len'].default_init})"
            stashed = 0
        walk.code(f"surgery.resize(model, query_len={count})   # {note}")
        surgery.resize(model, query_len=count)
        print(f"  {adapter_text(model)}")
        generate(model, image, prompt, 1)  # warm-up at the new shapes, as above
        print(generate(model, image, prompt, max_new).line(f"query_len={count}"))
    walk.code(f"surgery.resize(model, query_len={released})   # truncate: the first {released} are the released ones")
    surgery.resize(model, query_len=released)
    generate(model, image, prompt, 1)
    again = generate(model, image, prompt, max_new)
    print(again.line(f"query_len={released}"))
    walk.check(f"visual queries and answer equal the first run's at query_len={released}",
               (again.visual, torch.tensor(again.ids)), (first.visual, torch.tensor(first.ids)))


def adapter_text(model: Any) -> str:
    L, Q = model.query_layer, model.query_len
    return (f"visual_query.weight {tuple(model.visual_query.weight.shape)}, adapter_query.weight "
            f"{tuple(model.adapter_query.weight.shape)} seen as (query_layer, query_len, dim) = "
            f"{tuple(model.adapter_table().shape)}: {Q} adapter token{'s' * (Q != 1)} in each of the last {L} layers")


# -- 3. ImageBind: 1 -> 4 vision CLS tokens, head `all` --------------------------------------------


def imagebind(walk: Walkthrough, cast: Cast) -> None:
    torch.manual_seed(0)
    encoder = surgery.build(cast.imagebind)
    image = picture(encoder.config.modalities["vision"].input_size[-1])
    walk.step(f"ImageBind: {VISION} 1 -> {CLS_TOKENS}, the vision head in mode 'all'",
              f"encoder = surgery.build({cast.imagebind!r})",
              'before = encoder({"vision": image})["vision"]   # head mode "first": CLS token 0')
    with torch.no_grad():
        before = encoder({"vision": image})["vision"]
    print(f"  image {tuple(image.shape)} -> embedding {shapes(before)} (normalised)")
    change = Change({VISION: CLS_TOKENS}, {"head_mode": {"vision": "all"}})
    for call in change.calls("encoder"):
        walk.code(call)
    old, init = state_shapes(encoder), surgery.sites(encoder)[VISION].default_init
    change.apply(encoder)
    print("  tensors that changed shape:")
    print_lines(format_shape_changes(old, state_shapes(encoder)))
    walk.code('after = encoder({"vision": image})["vision"]    # head mode "all": every CLS token')
    with torch.no_grad():
        after = encoder({"vision": image})["vision"]
        first = encoder({"vision": image}, head_mode="first")["vision"]
    print(f"  embedding {shapes(after)}: one per CLS token")
    drift = (after[:, 0] - before).abs().max().item()
    print(f"  drift of token 0 against the original embedding: cosine {cosine(after[:, 0], before):.4f}, "
          f"max |diff| {drift:.3g}")
    print(f"    (token 0 is the released CLS token; the {CLS_TOKENS - 1} new ones, drawn by the site's default "
          f"init ({init}), take part in attention, so it moves)")
    others = ", ".join(f"{cosine(after[:, i], after[:, 0]):.4f}" for i in range(1, CLS_TOKENS))
    print(f"  tokens 1..{CLS_TOKENS - 1} against token 0: cosine {others}")
    # the same token through the same head, but projected alone or among 4 rows: equal up to float
    # rounding (a matmul's blocking depends on its shape), not necessarily bit for bit
    gap = (first - after[:, 0]).abs().max().item()
    walk.expect("head mode 'first' reads token 0 of mode 'all'",
                torch.allclose(first, after[:, 0], rtol=1e-5, atol=1e-6), f"yes (max |diff| {gap:.2g}: float rounding)")


# -- 4-8. ImageBind-LLM: 4 CLS tokens -> 4 visual tokens, then the guarantees ---------------------


def imagebind_llm(walk: Walkthrough, cast: Cast, change: Change, max_new: int, out: str | None,
                  file_name: str) -> None:
    torch.manual_seed(0)
    model = surgery.build(cast.imagebind_llm, **cast.imagebind_llm_kwargs)
    spec = surgery.get_host().model_spec(cast.imagebind_llm)
    image = picture(model.image_bind.config.modalities["vision"].input_size[-1])
    inputs = {"Image": [image, 1.0]}
    prompt = model.tokenizer.encode(format_prompt(INSTRUCTION), bos=True, eos=False)
    walk.step(f"ImageBind-LLM: {CLS_TOKENS} CLS tokens become {CLS_TOKENS} visual tokens in every adapted layer",
              f"model = surgery.build({cast.imagebind_llm!r}{_kwargs(cast.imagebind_llm_kwargs)})",
              f'model.generate({{"Image": [image, 1.0]}}, [format_prompt({INSTRUCTION!r})], max_gen_len={max_new}, '
              f'temperature=0)')
    run = forward_runner(spec, spec.example_inputs(model))
    original = run(model)
    print(f"  {visual_text(model, inputs)}")
    generate(model, inputs, prompt, 1)  # warm-up
    print(generate(model, inputs, prompt, max_new).line(f"{VISION}=1"))
    back = change.undo_on(model)
    for call in change.calls():
        walk.code(call)
    change.apply(model)
    print(f"  {visual_text(model, inputs)}")
    with torch.no_grad():
        layers = model.adapter_kv(model.forward_visual(inputs))
    attends = len(layers) == model.query_layer and all(
        kv.k_t is not None and kv.k_t.shape[-1] == kv.v.shape[2] == CLS_TOKENS for kv in layers)
    walk.expect(f"each of the {model.query_layer} adapted layers attends over {CLS_TOKENS} visual tokens", attends,
                f"yes: keys {shapes(layers[0].k_t)} (B, heads, head dim, K), values {shapes(layers[0].v)} "
                f"(B, heads, K, head dim)" if attends else "")
    print(generate(model, inputs, prompt, max_new).line(f"{VISION}={CLS_TOKENS}"))
    changed = run(model)
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(original, changed))
    print(f"  logits of the registered forward (every modality, example inputs) moved: max |diff| {diff:.3g}")

    print(f"\nThe guarantees, on ImageBind-LLM and the change of step {walk.number} ({change.text()}):")
    check_guarantees(walk, model, change, back, run=run, original=original, changed=changed,
                     rebuild=lambda: surgery.build(cast.imagebind_llm, **cast.imagebind_llm_kwargs), out=out,
                     file_name=file_name)


def visual_text(model: Any, inputs: dict) -> str:
    with torch.no_grad():
        visual = model.forward_visual(inputs)
    kv = model.adapter_kv(visual)[0]
    how = ("a gated bias per layer, no keys (nothing to attend over)" if kv.k_t is None
           else f"attention over {visual.shape[1]} tokens per layer")
    k = model.image_bind.num_cls_tokens("vision")
    return (f"head mode {model.image_bind.head_mode('vision')!r}, {k} vision CLS token{'s' * (k != 1)} -> visual "
            f"tokens {shapes(visual)} (B, K, dim) in the last {model.query_layer} layers: {how}")


# -- shared pieces ---------------------------------------------------------------------------------


@dataclass
class Generation:
    ids: list[int]
    text: str
    visual: torch.Tensor
    clock: Clock

    def line(self, label: str) -> str:
        c = self.clock
        rate = f"{c.decoded / (c.end - c.first):7.1f} tokens/s" if c.decoded and c.end > c.first else "no decode"
        return f"  {label:<26} prefill {1000 * (c.first - c.start):7.1f} ms  decode {rate}  {self.text!r}"


def generate(model: Any, inputs: Any, prompt: list[int], max_new: int) -> Generation:
    """One greedy generation, timed by `surgery generate`'s clock (prefill to the first token,
    then the decode rate), with the visual input it read."""
    eos = model.tokenizer.eos_id
    with torch.no_grad():
        visual = model.forward_visual(inputs)
    clock = Clock(eos, None)
    ids = model.generate_tokens(inputs, [prompt], max_gen_len=max_new, temperature=0.0, eos_id=eos,
                                on_token=clock.on_token)[0]
    clock.stop()
    return Generation(ids, model.tokenizer.decode(ids), visual, clock)


def picture(size: int) -> torch.Tensor:
    """(1, 3, size, size): a light sign with three dark lines of "text" under a sun in a blue sky,
    drawn with torch (no file), normalised as CLIP and ImageBind expect."""
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    image = torch.stack([0.35 + 0.3 * y, 0.6 + 0.2 * y, 0.95 - 0.2 * y])  # sky, paler towards the horizon
    sun = (x - 0.8) ** 2 + (y - 0.18) ** 2 < 0.012
    image[:, sun] = torch.tensor([1.0, 0.85, 0.2])[:, None]
    image[:, (x > 0.12) & (x < 0.78) & (y > 0.38) & (y < 0.88)] = 0.95  # the sign
    for row in (0.5, 0.63, 0.76):
        image[:, (x > 0.18) & (x < 0.72) & ((y - row).abs() < 0.03)] = 0.1  # its lines of text
    mean, std = torch.tensor(OPENAI_CLIP_MEAN)[:, None, None], torch.tensor(OPENAI_CLIP_STD)[:, None, None]
    return ((image - mean) / std).unsqueeze(0)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def _kwargs(kwargs: dict[str, Any]) -> str:
    return f", {keywords(kwargs)}" if kwargs else ""


__all__ = ["SIZES", "Cast", "run", "picture", "generate"]
