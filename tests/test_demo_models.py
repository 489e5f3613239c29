"""`surgery demo --model NAME` for every registered model, and how `surgery demo` chooses what it runs.

Every model either walks through the demo with every check bit-exact, or is refused in one line
for a reason the test confirms on the model itself: it is built on the meta device (shapes, no
values), or none of its sites may take another count. Never a traceback.
"""

from __future__ import annotations

import argparse

import pytest

import surgery
from surgery.cli import command_registry, demo, main

MODELS = sorted(surgery.get_host().models)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def cannot_be_walked(name: str) -> str | None:
    """Why the demo cannot walk `name`, judged on the model built here: None when it can."""
    model = surgery.build(name)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        return "meta device"
    sites = surgery.sites(model)
    if not any(site.violation(count) is None
               for site in sites.values() for count in (site.count - site.step, site.count + site.step)):
        return "no site whose count can change"
    return None


@pytest.mark.parametrize("name", [*MODELS, "timm/test_vit2"])  # and a name a plugin resolves (slash included)
def test_every_registered_model_runs_the_demo_or_is_refused_in_one_line(capsys, name):
    code, out, err = run_cli(capsys, "demo", "--model", name)
    assert "Traceback" not in out + err
    if code == 0:
        assert "MISMATCH" not in out and out.rstrip().endswith("all checks passed"), out
        assert f"token-surgery demo: {name} " in out and "bit-exact" in out
        return
    reason = cannot_be_walked(name)
    assert reason is not None, f"{name} can be walked but the demo refused it: {err}"
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("surgery: error: "), err
    assert repr(name) in lines[0] and reason in lines[0], err


def test_the_models_include_ones_on_meta_and_ones_that_walk():
    """The parametrisation above covers both outcomes (it would pass vacuously otherwise)."""
    meta = [n for n in MODELS if n.endswith("_7b")]
    assert meta and all(cannot_be_walked(n) == "meta device" for n in meta)
    assert cannot_be_walked("vit_tiny_test") is None


def test_without_a_story_demo_walks_the_default_model(capsys, monkeypatch):
    monkeypatch.setenv("SURGERY_PLUGINS", "timm_vit")  # no plugin's command module: no story
    assert demo.installed_story() is None
    code, out, err = run_cli(capsys, "demo")
    assert code == 0, err
    assert out.startswith(f"token-surgery demo: {demo.DEFAULT_MODEL} ") and "reg_tokens: 0 -> 4" in out
    assert out.rstrip().endswith("all checks passed")


def _story_module(name: str, log: list[str]):
    class Module:
        @surgery.hookimpl
        def surgery_register_commands(self, register):
            def run(args: argparse.Namespace) -> int:
                log.append(f"{name} out={getattr(args, 'out', None)}")
                return 0

            register(name, run, group="demo", help=f"story {name}",
                     add_arguments=lambda p: p.add_argument("--out"))
    return Module()


def test_demo_alone_runs_the_first_story_registered(capsys, monkeypatch, tmp_path):
    log: list[str] = []
    registry = command_registry([])  # the core's commands only
    registry.add_module(_story_module("zebra", log), "first_plugin")  # registered first, named last
    registry.add_module(_story_module("apple", log), "second_plugin")
    monkeypatch.setattr("surgery.cli.command_registry", lambda *a: registry)
    assert demo.installed_story().name == "zebra"
    assert run_cli(capsys, "demo", "--out", str(tmp_path))[0] == 0
    assert log == [f"zebra out={tmp_path}"]  # its own options, with --out given to `surgery demo`


def test_a_demo_option_the_story_lacks_is_a_usage_error(capsys, monkeypatch):
    registry = command_registry([])

    class Module:
        @surgery.hookimpl
        def surgery_register_commands(self, register):
            register("bare", lambda args: 0, group="demo", help="a story without options")

    registry.add_module(Module(), "plugin")
    monkeypatch.setattr("surgery.cli.command_registry", lambda *a: registry)
    code, _, err = run_cli(capsys, "demo", "--out", "somewhere")
    assert code == 2 and "takes no --out" in err and len(err.strip().splitlines()) == 1


def test_the_built_in_story_is_the_one_demo_runs():
    story = demo.installed_story()
    assert story is not None and story.path == "demo study" and story.plugin == "imagebind_llm"



def test_walkthrough_checks_compare_every_tensor_bit_for_bit(capsys):
    import torch

    from surgery.cli.walkthrough import Walkthrough

    walk = Walkthrough()
    x = torch.arange(6.0).reshape(2, 3)
    assert walk.check("same", {"a": [x, (x + 1,)]}, {"a": [x.clone(), (x + 1,)]})
    one_ulp = x.clone()
    one_ulp[1, 2] = torch.nextafter(x[1, 2], torch.tensor(10.0))  # the next float32 after 5
    assert not walk.check("one value", (x,), (one_ulp,))
    assert not walk.check("one tensor fewer", (x, x), (x,))
    assert not walk.check("dtype", (x,), (x.double(),))
    assert not walk.check("shape", (x,), (x.reshape(3, 2),))
    assert walk.finish() == 1
    out = capsys.readouterr().out
    assert "    same: bit-exact" in out and out.count(": MISMATCH") == 4
    assert out.rstrip().endswith("4 check(s) failed: one value; one tensor fewer; dtype; shape")
