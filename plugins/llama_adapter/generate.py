"""`surgery generate`: build or load a model, read its inputs, decode, stream the text, time it.

Registered by this plugin's command module; the options and the families of models it runs
(LLaMA-Adapter V2 here, ImageBind-LLM from its own plugin) are in `generation.py`. Everything a
user can get wrong is checked before the model is built: the options, the number of inputs per
prompt, their weights; then the files, in the order they are read. Nothing is written but the
text (stdout) and the progress and timing lines (stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from typing import Any, Iterator

import torch
from torch import nn

import surgery
from surgery.cli.arguments import requested_counts
from surgery.commands import UsageError
from surgery.errors import DeviceUnavailableError, ModelConfigError, ModelInputError

from .generation import MODALITIES, Family, choose_family, families
from .tokenizer import Tokenizer, format_prompt

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
REPLACEMENT = "\ufffd"  # what sentencepiece decodes an incomplete UTF-8 byte sequence to


def run(args: argparse.Namespace) -> int:
    prompts = _check_options(args)
    known = families()
    if args.model:
        from surgery.plugins import get_host

        family = choose_family(args, get_host().model_spec(args.model).backbone, known)
        given = [f.encoder_option for f in known if getattr(args, f.encoder_dest, None)]
        if given:
            raise UsageError(f"{given[0]} is for official files; --model {args.model} is built by its plugin")
    else:
        family = choose_family(args, None, known)
    inputs = collect_inputs(args, family, len(prompts))
    device = _device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float32 if device.type == "cpu" else torch.float16)
    tokenizer = Tokenizer(args.tokenizer) if args.tokenizer else None

    with _progress_on_stderr():
        model = _registered(args.model, args.max_seq_len, device, dtype, args.seed) if args.model else \
            family.function("load_official")(args, device, dtype)
    prepare = family.function("prepare", required=False)
    if prepare is not None:  # the family's own options on the built model
        prepare(model, args)
    counts = requested_counts(args.set)
    if counts:
        before = surgery.counts(model)
        surgery.resize(model, **counts)
        after = surgery.counts(model)
        print("surgery: " + ", ".join(f"{name} {before[name]} -> {after[name]}" for name in counts), file=sys.stderr)
    tokenizer = _tokenizer(model, tokenizer, args.tokenizer)

    ids = [tokenizer.encode(p if args.raw else format_prompt(p), bos=True, eos=False) for p in prompts]
    limit = model.config.max_seq_len
    if max(len(i) for i in ids) >= limit:
        raise ModelInputError(f"a prompt takes {max(len(i) for i in ids)} tokens (the Alpaca template included "
                              f"unless --raw) and the model reads {limit} positions: shorten it, or give "
                              f"--max-seq-len")
    visual = family.function("read_inputs")(model, inputs, len(prompts))
    generator = torch.Generator(device=device).manual_seed(args.seed) if args.temperature > 0 else None
    stream = TextStream(tokenizer, sys.stdout) if len(prompts) == 1 else None
    clock = Clock(tokenizer.eos_id, stream)
    answers = model.generate_tokens(visual, ids, max_gen_len=args.max_new_tokens, temperature=args.temperature,
                                    top_p=args.top_p, generator=generator, eos_id=tokenizer.eos_id,
                                    on_token=clock.on_token)
    clock.stop()
    texts = [tokenizer.decode(a) for a in answers]
    if stream is not None:
        stream.finish(texts[0])
    else:
        for number, text in enumerate(texts, 1):
            print(f"[{number}] {text}")
    print(f"surgery: {clock.summary(sum(len(i) for i in ids))}", file=sys.stderr)
    return 0


def _check_options(args: argparse.Namespace) -> list[str]:
    """The option combinations argparse cannot check; returns the prompts."""
    if not args.prompt:
        raise UsageError("give at least one --prompt TEXT")
    official = [o for o, v in (("--llama-dir", args.llama_dir), ("--checkpoint", args.checkpoint)) if v]
    if args.model and official:
        raise UsageError(f"--model builds a registered model; {' and '.join(official)} are for official files: "
                         f"give one or the other")
    if not args.model and len(official) != 2:
        raise UsageError("give --model NAME (see 'surgery models'), or the official files: --llama-dir DIR, "
                         "--checkpoint FILE and the encoder's weights")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.max_seq_len is not None and args.max_seq_len < 2:
        raise UsageError(f"--max-seq-len must be at least 2, got {args.max_seq_len}")
    if not args.temperature >= 0:
        raise UsageError(f"--temperature must be >= 0 (0: greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be within (0, 1], got {args.top_p}")
    return list(args.prompt)


def collect_inputs(args: argparse.Namespace, family: Family, batch: int) -> dict[str, tuple[list[str], float]]:
    """{modality: (one file per prompt, weight)} from the input options, checked against the family."""
    given = {m: getattr(args, m) for m in MODALITIES if getattr(args, m)}
    if not given:
        takes = " / ".join(f"--{m} FILE" for m in family.modalities)
        raise UsageError(f"{family.name} generates from an input: give {takes}")
    inputs = {}
    for modality, files in given.items():
        if modality not in family.modalities:
            raise UsageError(f"unknown modality for {family.name}: --{modality}; it takes "
                             + ", ".join(f"--{m}" for m in family.modalities))
        if len(files) not in (1, batch):
            raise UsageError(f"{len(files)} --{modality} files for {batch} prompts: give one (for every prompt) "
                             f"or one per prompt")
        weights = {f.weight for f in files if f.weight is not None}
        if weights and not family.mixes:
            raise UsageError(f"{family.name} does not mix inputs: --{modality} takes FILE, not FILE:WEIGHT")
        if len(weights) > 1:
            raise UsageError(f"--{modality} has one weight for all its files (the model mixes modalities, not "
                             f"files); got {', '.join(f'{w:g}' for w in sorted(weights))}")
        paths = [f.path for f in files] * (batch if len(files) == 1 else 1)
        inputs[modality] = (paths, weights.pop() if weights else 1.0)
    total = sum(w for _, w in inputs.values())
    if abs(total) < 1e-6:
        raise UsageError("the input weights sum to 0; they are divided by their sum: give weights that do not "
                         f"cancel ({', '.join(f'--{m} {w:g}' for m, (_, w) in inputs.items())})")
    return inputs


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"--device {name!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(f"--device {name}: CUDA is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name!r}: use cpu, cuda or cuda:N")
    return device


def _registered(name: str, max_seq_len: int | None, device: torch.device, dtype: torch.dtype,
                seed: int) -> nn.Module:
    """A registered model, its random weights drawn from `seed` (so that a run repeats)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = surgery.build(name, **({"max_seq_len": max_seq_len} if max_seq_len else {}))
    meta = next((n for n, p in model.named_parameters() if p.is_meta), None)
    if meta is not None:
        raise ModelConfigError(f"{name} is built on the meta device (shapes only, no weights): generate from the "
                               f"official files instead (--llama-dir, --checkpoint and the encoder's weights)")
    return model.to(device=device, dtype=dtype).eval()


def _tokenizer(model: nn.Module, given: Tokenizer | None, path: str | None) -> Tokenizer:
    """The tokenizer to decode with (--tokenizer, else the model's), its vocabulary the model's."""
    tokenizer = given if given is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ModelConfigError("the model has no tokenizer: give --tokenizer FILE (its tokenizer.model)")
    vocab = model.llama.output.out_features
    if tokenizer.n_words != vocab:
        where = f"tokenizer {path}" if path else "the model's tokenizer"
        raise ModelConfigError(f"{where} has {tokenizer.n_words} pieces but the model's vocabulary has {vocab}: "
                               f"its ids would be other words; give the tokenizer.model the model was trained with")
    return tokenizer


@contextlib.contextmanager
def _progress_on_stderr() -> Iterator[None]:
    """The loaders' INFO lines (one per file read, e.g. each LLaMA shard) on stderr while loading."""
    logger = logging.getLogger("surgery_plugins")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("surgery: %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


class TextStream:
    """Writes one row's text as its tokens are decoded.

    Each step decodes the row's ids so far and writes what is new. Two things keep the written text
    a prefix of the final one: a trailing replacement character (an incomplete UTF-8 sequence of
    byte pieces) is held back until its bytes complete, and `finish` writes whatever is left.
    """

    def __init__(self, tokenizer: Tokenizer, out: Any) -> None:
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.written = ""

    def add(self, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids).rstrip(REPLACEMENT)
        if text.startswith(self.written) and len(text) > len(self.written):
            self.out.write(text[len(self.written):])
            self.out.flush()
            self.written = text

    def finish(self, text: str) -> None:
        """Write the rest of `text` (the row's decoded answer) and a newline."""
        rest = text[len(self.written):] if text.startswith(self.written) else "\n" + text
        self.out.write(rest + "\n")
        self.out.flush()


class Clock:
    """Times a generation from `llama.decode`'s per-position callback: prefill is the time to the
    first position (inputs encoded, adapter keys/values and the prompt's first tokens read), decode
    the rate of the generated tokens after it (each row counted until its EOS)."""

    def __init__(self, eos_id: int, stream: TextStream | None) -> None:
        self.eos_id, self.stream = eos_id, stream
        self.start = time.perf_counter()
        self.first: float | None = None
        self.end: float | None = None
        self.done: list[bool] | None = None
        self.decoded = 0  # generated tokens after the first position, EOS excluded

    def on_token(self, tokens: torch.Tensor, generated: torch.Tensor) -> None:
        rows, new = tokens.tolist(), generated.tolist()  # one transfer; synchronises a GPU, so the times hold
        first = self.first is None
        if first:
            self.first = time.perf_counter()
            self.done = [False] * len(rows)
        for row, (token, is_new) in enumerate(zip(rows, new)):
            if not is_new or self.done[row]:
                continue
            if token == self.eos_id:
                self.done[row] = True
                continue
            self.decoded += 0 if first else 1
            if row == 0 and self.stream is not None:
                self.stream.add(token)

    def stop(self) -> None:
        self.end = time.perf_counter()

    def summary(self, prompt_tokens: int) -> str:
        if self.first is None or self.end is None:
            return "nothing was decoded"
        prefill = f"prefill {1000 * (self.first - self.start):.1f} ms ({prompt_tokens} prompt tokens)"
        seconds = self.end - self.first
        if self.decoded == 0 or seconds <= 0:
            return prefill + "; decode: no token after the first"
        return prefill + f"; decode {self.decoded} tokens in {seconds:.3f} s, {self.decoded / seconds:.1f} tokens/s"


__all__ = ["run", "collect_inputs", "TextStream", "Clock"]
