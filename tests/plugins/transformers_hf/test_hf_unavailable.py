"""Without transformers, the plugin is listed as unavailable with what to install, and nothing else
is affected: the other plugins load, strict mode does not fail, the CLI lists it. Runs whether or
not transformers is installed: a subprocess hides it (a meta-path finder that finds nothing)."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

HIDE = textwrap.dedent("""
    import importlib.abc, sys

    class Hide(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HIDDEN:
                raise ModuleNotFoundError(f"No module named {name!r}")
            return None

    sys.meta_path.insert(0, Hide())
""")


def _run(hidden, code, **env):
    script = f"HIDDEN = {hidden!r}\n{HIDE}\n{textwrap.dedent(code)}"
    environment = {k: v for k, v in os.environ.items() if k not in ("SURGERY_PLUGINS", "SURGERY_STRICT_PLUGINS")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**environment, **env})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


# the plugin and one other (loading only these two keeps the subprocesses quick)
ONLY = {"SURGERY_PLUGINS": "transformers,timm_vit"}
RECORDS = """
    import json, surgery
    host = surgery.get_host()
    print(json.dumps({"records": {n: r.to_dict() for n, r in host.records.items()},
                      "backbones": sorted(host.backbones), "models": sorted(host.models)}))
"""
CLI = """
    import runpy, sys
    sys.argv = ["surgery", "plugins", "--json"]
    try:
        runpy.run_module("surgery", run_name="__main__")
    except SystemExit as exc:
        assert not exc.code, exc.code
"""


def test_without_transformers_the_plugin_is_unavailable_and_the_others_load():
    lines = _run(("transformers",), RECORDS + CLI, SURGERY_STRICT_PLUGINS="1", **ONLY)
    out = json.loads(lines.splitlines()[0])
    record = out["records"]["transformers"]
    assert record["status"] == "unavailable", record
    assert "transformers" in record["error"] and 'pip install "token-surgery[transformers]"' in record["error"]
    assert not [b for b in out["backbones"] if b.startswith("hf_")]
    assert not [m for m in out["models"] if m.startswith("hf_")]
    assert out["records"]["timm_vit"]["status"] == "loaded"  # strict mode did not stop the others
    assert "vit_tiny_test" in out["models"]
    cli = lines[lines.index("\n[") + 1:]  # `surgery plugins --json` lists it with the reason
    listed = {r["name"]: r for r in json.loads(cli)}
    assert listed["transformers"]["status"] == "unavailable" and "not installed" in listed["transformers"]["error"]


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_without_peft_only_the_peft_backbone_is_missing():
    out = json.loads(_run(("peft",), RECORDS, **ONLY).splitlines()[-1])
    assert out["records"]["transformers"]["status"] == "loaded"
    assert "hf_blip2" in out["backbones"] and "hf_peft_prompt" not in out["backbones"]
    assert "hf_blip2_tiny" in out["models"] and "hf_peft_prompt_tiny" not in out["models"]
