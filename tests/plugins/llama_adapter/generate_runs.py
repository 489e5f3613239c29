"""Running `surgery generate` in tests and computing what it must print: shared by the LLaMA-Adapter
V2 and ImageBind-LLM command tests."""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
from PIL import Image

import surgery
from surgery.cli import main
from surgery_plugins.llama_adapter.tokenizer import format_prompt

TINY = "llama_adapter_v2_tiny"


class Recorder:
    """stdout that keeps each write apart, to see the text arrive in pieces."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    @property
    def text(self) -> str:
        return "".join(self.writes)


def run(argv: list[str], monkeypatch, capsys) -> tuple[int, Recorder, str]:
    out = Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    code = main(["generate", *argv])
    return code, out, capsys.readouterr().err


def picture(path, seed: int, size: int = 40):
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


def built(name: str = TINY, seed: int = 0, **kwargs):
    """The registered model as the command builds it: random weights drawn from --seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return surgery.build(name, **kwargs)


def greedy(model, images, prompts, max_new, tokenizer=None, template=True):
    tok = tokenizer or model.tokenizer
    ids = [tok.encode(format_prompt(p) if template else p, bos=True, eos=False) for p in prompts]
    answers = model.generate_tokens(images, ids, max_gen_len=max_new, temperature=0, eos_id=tok.eos_id)
    return [tok.decode(a) for a in answers]


def files_in(folder) -> dict[str, int]:
    return {os.path.join(r, f): os.path.getmtime(os.path.join(r, f)) for r, _, fs in os.walk(folder) for f in fs}


def refused(argv, monkeypatch, capsys, folder, code: int = 1) -> str:
    before = files_in(folder)
    got, out, err = run(argv, monkeypatch, capsys)
    assert got == code, err
    assert out.text == "" and files_in(folder) == before
    lines = err.strip().splitlines()  # progress lines (a shard read) may come first; then one error line
    assert [line.startswith("surgery: error: ") for line in lines].count(True) == 1 and "Traceback" not in err
    assert lines[-1].startswith("surgery: error: ") and all(line.startswith("surgery: reading ") for line in lines[:-1])
    return lines[-1]
