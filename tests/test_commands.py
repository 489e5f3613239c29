"""Commands contributed by command modules (`surgery.commands`): registration, the parser, errors."""

import importlib.metadata
import textwrap

import pytest

import surgery
import surgery.cli as cli
from surgery.commands import ENTRY_POINT_GROUP, CommandRegistry

GOOD = """
import surgery

def add_arguments(parser):
    parser.add_argument("--times", type=int, default=1)

def run(args):
    print("hello " * args.times)
    return 0

def run_kind(args):
    print("kind", args.size)
    return 3

@surgery.hookimpl
def surgery_register_commands(register):
    register("hello", run, help="say hello", add_arguments=add_arguments)
    register("measure", None, help="a group of measurements")
    register("small", run_kind, group="measure", help="a small one",
             add_arguments=lambda p: p.add_argument("--size", type=int, required=True))
"""

HALF = """
import surgery

@surgery.hookimpl
def surgery_register_commands(register):
    register("first", lambda args: 0, help="registered before the failure")
    register("hello", lambda args: 0, help="taken by another module")
"""

FAILS = """
import surgery

def run(args):
    import sys
    if args.how == "exit":
        sys.exit(0)
    if args.how == "refuse":
        from surgery.errors import ModelInputError
        raise ModelInputError("the input was wrong; allowed: right ones")
    raise KeyError("a bug")

@surgery.hookimpl
def surgery_register_commands(register):
    register("fails", run, help="fails", add_arguments=lambda p: p.add_argument("how"))
"""


@pytest.fixture
def module_dir(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("SURGERY_PLUGINS", raising=False)

    def write(name: str, source: str) -> importlib.metadata.EntryPoint:
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        return importlib.metadata.EntryPoint(name=name, value=name, group=ENTRY_POINT_GROUP)
    return write


@pytest.fixture
def with_modules(module_dir, monkeypatch):
    """Make the CLI see exactly these command modules (besides the core's commands)."""
    def use(**sources: str) -> CommandRegistry:
        registry = cli.command_registry([module_dir(name, source) for name, source in sources.items()])
        monkeypatch.setattr(cli, "command_registry", lambda: registry)
        return registry
    return use


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_commands_and_group_kinds_reach_the_command_line(with_modules, capsys):
    with_modules(greeter=GOOD)
    assert run_cli(capsys, "hello", "--times", "2")[:2] == (0, "hello hello \n")
    assert run_cli(capsys, "measure", "small", "--size", "5")[:2] == (3, "kind 5\n")
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and "say hello" in out and "a group of measurements" in out
    code, out, _ = run_cli(capsys, "measure", "--help")
    assert code == 0 and "small" in out and "a small one" in out


def test_a_group_needs_its_kind_and_a_kind_its_options(with_modules, capsys):
    with_modules(greeter=GOOD)
    code, _, err = run_cli(capsys, "measure")
    assert code == 2 and err.count("\n") == 1 and "small" in err
    code, _, err = run_cli(capsys, "measure", "small")
    assert code == 2 and err.count("\n") == 1 and "--size" in err
    code, _, err = run_cli(capsys, "measure", "large")
    assert code == 2 and err.count("\n") == 1 and "large" in err


def test_a_failing_module_is_recorded_whole_and_the_others_work(with_modules, capsys):
    registry = with_modules(greeter=GOOD, zz_half=HALF, broken="raise ImportError('no such library')")
    assert registry.records["greeter"].status == "loaded"
    assert registry.records["broken"].status == "failed" and "no such library" in registry.records["broken"].error
    half = registry.records["zz_half"]
    assert half.status == "failed" and "'surgery hello' is registered by both" in half.error
    assert "first" not in registry.commands  # all or nothing: its first command is not kept
    assert run_cli(capsys, "hello")[0] == 0
    code, out, _ = run_cli(capsys, "plugins")
    assert code == 0 and "no such library" in out and "zz_half" in out


def test_a_command_may_not_take_a_core_command_or_group_it_does_not_have(module_dir):
    class Core:
        @surgery.hookimpl
        def surgery_register_commands(self, register):
            register("inspect", lambda args: 0, help="the core's")

    registry = CommandRegistry()
    registry.add_module(Core(), "core")
    steal = module_dir("steal", """
        import surgery
        @surgery.hookimpl
        def surgery_register_commands(register):
            register("inspect", lambda args: 0, help="mine")
    """)
    orphan = module_dir("orphan", """
        import surgery
        @surgery.hookimpl
        def surgery_register_commands(register):
            register("kind", lambda args: 0, group="nosuchgroup", help="x")
    """)
    clash = module_dir("clash", """
        import surgery
        def both(p):
            p.add_argument("--x")
            p.add_argument("--x")
        @surgery.hookimpl
        def surgery_register_commands(register):
            register("clash", lambda args: 0, help="x", add_arguments=both)
    """)
    registry.load_entry_points([steal, orphan, clash])
    assert "registered by both 'core' and 'steal'" in registry.records["steal"].error
    assert "not a group command" in registry.records["orphan"].error
    assert registry.records["clash"].status == "failed" and "--x" in registry.records["clash"].error
    assert set(registry.commands) == {"inspect"} and registry.commands["inspect"].plugin == "core"


@pytest.mark.parametrize("how, message", [
    ("refuse", "the input was wrong; allowed: right ones"),
    ("exit", "sys.exit(0) was called during the command"),
    ("bug", "unexpected error, please report it"),
])
def test_errors_of_a_command_are_one_line_and_never_success(with_modules, capsys, how, message):
    with_modules(failing=FAILS)
    code, out, err = run_cli(capsys, "fails", how)
    assert code == 1 and message in err and err.count("\n") == 1 and "Traceback" not in err


def test_surgery_plugins_selects_command_modules_by_name(module_dir, monkeypatch):
    eps = [module_dir("greeter", GOOD), module_dir("failing", FAILS)]
    monkeypatch.setenv("SURGERY_PLUGINS", "failing")
    registry = CommandRegistry()
    registry.load_entry_points(eps)
    assert set(registry.records) == {"failing"} and set(registry.commands) == {"fails"}


def test_a_group_with_a_run_of_its_own_runs_it_when_no_kind_is_typed(module_dir, with_modules, capsys):
    with_modules(story=textwrap.dedent("""
        import surgery

        @surgery.hookimpl
        def surgery_register_commands(register):
            register("tour", lambda args: print("whole tour, fast" if args.fast else "whole tour") or 0,
                     kinds=True, help="a tour", add_arguments=lambda p: p.add_argument("--fast", action="store_true"))
            register("part", lambda args: print("one part") or 0, group="tour", help="one part of it")
    """))
    assert run_cli(capsys, "tour")[:2] == (0, "whole tour\n")
    assert run_cli(capsys, "tour", "--fast")[:2] == (0, "whole tour, fast\n")
    assert run_cli(capsys, "tour", "part")[:2] == (0, "one part\n")
