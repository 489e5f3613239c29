"""The core's command module: its commands, registered through the same registry as plugins'.

It is loaded first, under the name `surgery`, so that no plugin can take a core command's name
(a plugin's command module that tries is recorded as failed, and `surgery plugins` says why).
Each command's code lives in its own module; this one only says what is typed and where it goes.
"""

from __future__ import annotations

from typing import Any

import surgery

from . import bench, demo, inspect, listing, resize


@surgery.hookimpl
def surgery_register_commands(register: Any) -> None:
    from surgery.sweep import cli as sweep  # light: its code imports torch only when it runs

    register("plugins", listing.cmd_plugins, help="list backbone plugins (failed ones too)",
             description=listing.PLUGINS_DESCRIPTION, add_arguments=listing.add_arguments)
    register("models", listing.cmd_models, help="list models plugins can build by name",
             description=listing.MODELS_DESCRIPTION, add_arguments=listing.add_arguments)
    register("backends", listing.cmd_backends, help="list the fused-kernel backends and whether they run here",
             description=listing.BACKENDS_DESCRIPTION, add_arguments=listing.add_arguments)
    register("inspect", inspect.cmd_inspect, help="show a model's or checkpoint's token sites",
             description=inspect.DESCRIPTION, add_arguments=inspect.add_arguments)
    register("resize", resize.cmd_resize, help="resize the token sites of a checkpoint file",
             description=resize.DESCRIPTION, add_arguments=resize.add_arguments)
    register("demo", demo.cmd_demo, kinds=True, description=demo.DESCRIPTION, add_arguments=demo.add_arguments,
             help="the installed story (stories: its kinds), or one model with --model, every claim checked")
    register("bench", None, help=bench.GROUP_HELP, description=bench.GROUP_DESCRIPTION)
    register("kernels", bench.cmd_bench_kernels, group="bench",
             help="each fused op x backend x shape x dtype: ms, GB/s, fraction of each limit",
             description=bench.KERNELS_DESCRIPTION, add_arguments=bench.add_kernels_arguments)
    register("surgery", bench.cmd_bench_surgery, group="bench",
             help="time and extra memory of resize and tokens(...) (meta weights)",
             description=bench.SURGERY_DESCRIPTION, add_arguments=bench.add_surgery_arguments)
    register("sweep", sweep.cmd_sweep, help=sweep.HELP, description=sweep.DESCRIPTION,
             add_arguments=sweep.add_arguments)
