"""The conformance kit for backbone plugins (also the `surgery` pytest plugin, entry point `pytest11`).

A plugin only *describes* its sites; whether the description is complete (every coupled row, every
counter, every change through the journal) shows only when counts change. The kit changes them in
every way the engine promises and checks each promise bit for bit (docs/plugins.md):

    TestTinyConformance = ConformanceSuite.for_model("my_tiny_test")   # a registered model

pytest loads this package in every run of the environment, so only pytest is imported eagerly.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import pytest

from .checks import (
    CHECKS,
    InjectedFailure,
    check_atomic_on_failing_plugin,
    check_atomic_on_injected_failure,
    check_counters_follow,
    check_factory_deterministic,
    check_forward_at_every_count,
    check_grow_shrink_roundtrip,
    check_matches_fresh_build,
    check_recipe_replays,
    check_same_count_is_noop,
    check_shrink_restore_roundtrip,
    check_something_to_check,
    check_submodels_compose,
    check_tokens_restores,
)
from .compare import Snapshot, Subject, assert_matches_fresh_build, assert_same_model, snapshot

__all__ = [
    "CHECKS", "ConformanceSuite", "InjectedFailure", "Snapshot", "Subject", "assert_matches_fresh_build",
    "assert_same_model",
    "check_conformance", "check_something_to_check", "plugin_host", "snapshot", "surgery_host",
    *(check.__name__ for check in CHECKS),
]


# -- running the checks --------------------------------------------------------------------------


def check_conformance(factory: Callable[[], Any] | str, example_inputs: Callable[[Any], tuple] | tuple | None = None,
                      forward: Callable[..., Any] | None = None, counts: Mapping[str, Iterable[int]] | None = None,
                      *, seed: int = 0, expect_output_change: bool = True, ignore_attributes: Sequence[str] = (),
                      count_kwargs: Callable[[dict[str, int]], Mapping[str, Any]] | None = None,
                      checks: Iterable[Callable[[Subject], None]] = CHECKS) -> None:
    """Run every check (or `checks`) on models from `factory`; the AssertionError starts with the
    failing check's name. `factory(**counts)` builds the model at other counts (see `Subject`).
    `factory` may be a registered model name: `example_inputs` and `forward` then default to the
    registration's."""
    if isinstance(factory, str):
        from surgery.engine import build
        from surgery.plugins import get_host

        spec, name = get_host().model_spec(factory), factory
        factory = lambda **kwargs: build(name, **kwargs)  # noqa: E731
        example_inputs = spec.example_inputs if example_inputs is None else example_inputs
        forward = spec.forward if forward is None else forward
    if example_inputs is None:
        raise AssertionError("check_conformance needs example_inputs: a callable (model) -> tuple, or a tuple")
    subject = Subject(factory, example_inputs, forward, counts, seed, expect_output_change, ignore_attributes,
                      count_kwargs)
    check_something_to_check(subject)
    for check in checks:
        try:
            check(subject)
        except AssertionError as exc:
            raise AssertionError(f"{check.__name__}: {exc}") from exc


# -- plugin hosts --------------------------------------------------------------------------------


@contextlib.contextmanager
def plugin_host(*plugins: Any, entry_points: bool = True) -> Iterator[Any]:
    """A fresh `PluginHost`, installed as the process-wide one for the block, with the installed
    entry points (unless `entry_points=False`) and `plugins`: plugin objects or modules, or
    `(name, plugin)` pairs. A plugin that fails to load fails the test with its recorded error."""
    from surgery.plugins import PluginHost, reset_host

    host = PluginHost()
    if entry_points:
        host.load_entry_points()
    for item in plugins:
        name, plugin = item if isinstance(item, tuple) else (getattr(item, "__name__", type(item).__name__), item)
        if not host.add_plugin(plugin, name):
            raise AssertionError(f"plugin {name!r} did not load: {host.records[name].error}")
    old = reset_host(host)
    try:
        yield host
    finally:
        reset_host(old)


@pytest.fixture
def surgery_host() -> Iterator[Any]:
    """A fresh plugin host with the installed plugins, for one test (`surgery_host.add_plugin(p,
    "name")` adds one); the previous host comes back afterwards."""
    with plugin_host() as host:
        yield host


# -- the test class ------------------------------------------------------------------------------


class ConformanceSuite:
    """Base class of a plugin's conformance tests: one test per check.

    Subclass it as `class TestMyBackbone(ConformanceSuite)` with `make_model(**counts)` (no
    keywords: the model under test; every site's count as a keyword named after the site, or as
    `count_kwargs(counts)` spells them: the same model at those counts) and `make_inputs(model)`
    (called once per model; optionally `forward(model, *inputs)`, `counts`, `seed`,
    `expect_output_change`, `ignore_attributes`, `count_kwargs`, and `plugins`: plugin objects or
    (name, plugin) pairs to register, for a plugin not installed through its entry point), or bind
    `ConformanceSuite.for_model(name)` to a `Test...` name. The base class is not collected
    (`__test__ = False`); its subclasses are.
    """

    __test__ = False
    model_name: str | None = None  # set by for_model
    plugins: Sequence[Any] = ()
    counts: Mapping[str, Iterable[int]] | None = None
    seed = 0
    expect_output_change = True
    ignore_attributes: Sequence[str] = ()
    count_kwargs: Callable[[dict[str, int]], Mapping[str, Any]] | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__test__" not in cls.__dict__:
            cls.__test__ = True

    def make_model(self, **counts: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must define make_model(**counts) "
                                  f"(or use ConformanceSuite.for_model)")

    def make_inputs(self, model: Any) -> tuple:
        raise NotImplementedError(f"{type(self).__name__} must define make_inputs(model)")

    def forward(self, model: Any, *inputs: Any) -> Any:
        return model(*inputs)

    @classmethod
    def for_model(cls, name: str, **attributes: Any) -> type:
        """A suite for the model a plugin registered as `name`: its factory, `example_inputs` and
        `forward`. `attributes` override class attributes (`counts=...`, `seed=...`,
        `count_kwargs=...` when the factory's keywords are not the site names)."""
        def spec() -> Any:
            from surgery.plugins import get_host

            return get_host().model_spec(name)

        def make_model(self: Any, **kwargs: Any) -> Any:
            from surgery.engine import build

            return build(name, **kwargs)

        def make_inputs(self: Any, model: Any) -> tuple:
            if spec().example_inputs is None:
                raise AssertionError(f"model {name!r} was registered without example_inputs; "
                                     f"subclass the suite and define make_inputs(model)")
            return spec().example_inputs(model)

        def forward(self: Any, model: Any, *inputs: Any) -> Any:
            run = spec().forward
            return run(model, *inputs) if run is not None else model(*inputs)

        title = "".join(part.capitalize() for part in re.split(r"[^0-9A-Za-z]+", name) if part)
        body = {"make_model": make_model, "make_inputs": make_inputs, "forward": forward, "model_name": name,
                "__doc__": f"Conformance of the registered model {name!r}.", **attributes}
        return type(f"Test{title}Conformance", (cls,), body)

    def subject(self) -> Subject:
        return Subject(self.make_model, self.make_inputs, self.forward, self.counts, self.seed,
                       self.expect_output_change, self.ignore_attributes, self._count_kwargs())

    def _count_kwargs(self) -> Callable[[dict[str, int]], Mapping[str, Any]] | None:
        """The `count_kwargs` class attribute as given: a function of the counts, not bound to the suite."""
        for klass in type(self).__mro__:
            if "count_kwargs" in vars(klass):
                value = vars(klass)["count_kwargs"]
                return value.__func__ if isinstance(value, staticmethod) else value
        return None

    @pytest.fixture(autouse=True)
    def _surgery_plugins(self) -> Iterator[None]:
        """Registers `plugins`, if any, on a fresh host around each test of the suite."""
        with plugin_host(*self.plugins) if self.plugins else contextlib.nullcontext():
            yield

    def test_something_to_check(self) -> None:
        check_something_to_check(self.subject())

    def test_factory_is_deterministic(self) -> None:
        check_factory_deterministic(self.subject())

    def test_same_count_is_noop(self) -> None:
        check_same_count_is_noop(self.subject())

    def test_counters_follow_counts(self) -> None:
        check_counters_follow(self.subject())

    def test_submodels_compose(self) -> None:
        check_submodels_compose(self.subject())

    def test_forward_at_every_count(self) -> None:
        check_forward_at_every_count(self.subject())

    def test_matches_fresh_build(self) -> None:
        check_matches_fresh_build(self.subject())

    def test_grow_then_shrink_back_is_exact(self) -> None:
        check_grow_shrink_roundtrip(self.subject())

    def test_shrink_then_restore_is_exact(self) -> None:
        check_shrink_restore_roundtrip(self.subject())

    def test_tokens_restores(self) -> None:
        check_tokens_restores(self.subject())

    def test_recipe_replays_on_fresh_model(self) -> None:
        check_recipe_replays(self.subject())

    def test_atomic_on_injected_failure(self) -> None:
        check_atomic_on_injected_failure(self.subject())

    def test_atomic_on_failing_plugin(self) -> None:
        check_atomic_on_failing_plugin(self.subject())
