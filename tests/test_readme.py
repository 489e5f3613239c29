"""The README and the CLI's help say what works (issue 14 item 24): their examples run as written,
and the README's CLI list names every command the parser has.

The examples are read from the files themselves, so a later edit that breaks one fails here.
"""

from __future__ import annotations

import re
import shlex

import timm
import torch

import surgery
from surgery.cli import build_parser, main

from readme_blocks import code_blocks


def test_the_first_python_example_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # it writes its checkpoint to the working folder
    namespace: dict = {}
    exec(compile(code_blocks("python")[0], "README.md", "exec"), namespace)
    vit, fresh = namespace["vit"], namespace["fresh_vit"]
    assert surgery.counts(fresh) == {"class_token": 1, "reg_tokens": 6}
    # what the example built is a timm ViT with 6 registers, by timm's own count and its weights
    reference = timm.create_model("vit_small_patch16_224", reg_tokens=6)
    reference.load_state_dict(vit.state_dict())
    with torch.no_grad():
        assert torch.equal(reference.eval()(namespace["images"]), fresh.eval()(namespace["images"]))
    assert len(capsys.readouterr().out) < 2000  # print(surgery.sites(vit)) is a summary, not the model


def test_the_resize_help_example_runs(tmp_path, monkeypatch, capsys):
    assert main(["resize", "--help"]) == 0
    example = re.search(r"example: (surgery resize .*)", capsys.readouterr().out).group(1)
    argv = shlex.split(example)[1:]
    monkeypatch.chdir(tmp_path)
    surgery.save(surgery.build("vit_tiny_test"), argv[1])  # the file it names
    code = main(argv)
    assert code == 0, capsys.readouterr().err
    out_name = argv[argv.index("-o") + 1]
    loaded = surgery.build("vit_tiny_test")
    surgery.load(out_name, loaded)
    assert surgery.counts(loaded) == {"class_token": 1, "reg_tokens": 4}


def test_the_readme_lists_every_command():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    listed = {line.split()[1] for block in code_blocks("") for line in block.splitlines()
              if line.startswith("surgery ")}
    assert set(commands) <= listed, f"missing from the README's CLI list: {sorted(set(commands) - listed)}"
