"""Argument groups shared by the commands: data, engine (backend/device) and output.

Each group is defined once here and reused, so a flag means the same thing, offers the same
choices and shows the same help under `hashret train`, `export`, `check`, `index build`, `serve`,
`bench` and `demo`. Choices come from the registries (dataset formats, engine backends), so a newly
registered entry shows up in every command without touching it.
"""
from __future__ import annotations

import argparse
from typing import Any

DATA_HELP = ("dataset folder or CSV file (default: $HASHRET_DATA, else ../shared/datasets/grocery "
             "beside the checkout)")


def _format_help(default: str | None) -> str:
    from hashret.datasets import FORMATS

    shown = default if default is not None else "the run's"
    return (f"dataset layout, one of {', '.join(FORMATS.names())}: digix = label.txt with "
            "'relative_path,label'; folder = one sub-folder per class; grocery = GroceryStoreDataset "
            f"split files; csv = header path,label[,split] (default: {shown})")


def add_data_args(p: argparse.ArgumentParser | Any, *, title: str = "data", data_help: str = DATA_HELP,
                  default_format: str | None = "grocery", format_dest: str = "format",
                  data_metavar: str = "DIR", with_format: bool = True) -> Any:
    """`--data` and `--format` (choices from the dataset-format registry). Returns the group.

    default_format=None leaves the format unset, for commands that fall back to a run's own;
    with_format=False leaves --format out, for a command that reads one fixed layout (demo).
    """
    from hashret.datasets import FORMATS

    g = p.add_argument_group(title) if isinstance(p, argparse.ArgumentParser) else p
    g.add_argument("--data", default=None, metavar=data_metavar, help=data_help)
    if not with_format:
        return g
    g.add_argument("--format", dest=format_dest, default=default_format, choices=FORMATS.names(),
                   metavar="FMT", help=_format_help(default_format))
    return g


def backend_choices(gpu_only: bool = False) -> list[str]:
    """Every registered engine backend (registered ones appear without further edits)."""
    from hashret.engines import ENGINES, backend_spec

    names = ENGINES.names()
    return [n for n in names if backend_spec(n).needs_gpu] if gpu_only else names


def add_engine_args(p: argparse.ArgumentParser | Any, *, title: str | None = "engine",
                    default_backend: str | None = "ort", backend_help: str = "inference engine",
                    default_device: str = "cpu",
                    device_help: str = "cpu, cuda or cuda:N where the backend supports it",
                    with_device: bool = True) -> Any:
    """`--backend` (choices from the engine registry) and `--device`. Returns the group.

    with_device=False leaves --device out, for a command that offers no device choice (demo).
    """
    if isinstance(p, argparse.ArgumentParser) and title:
        g = p.add_argument_group(title)
    else:
        g = p
    g.add_argument("--backend", default=default_backend, choices=backend_choices(), metavar="BACKEND",
                   help=f"{backend_help}, one of {', '.join(backend_choices())} (default: {default_backend})")
    if with_device:
        add_device_arg(g, default=default_device, help=device_help)
    return g


def add_device_arg(p: Any, *, default: str = "cpu",
                   help: str = "cpu, cuda or cuda:N where the backend supports it") -> None:
    p.add_argument("--device", default=default, help=f"{help} (default: {default})")


def add_output_args(p: argparse.ArgumentParser | Any, *, flag: str = "--out", metavar: str = "DIR",
                    required: bool = False, default: str | None = None, help: str = "folder to write",
                    progress: bool = True, title: str | None = "output") -> Any:
    """The output location and `--no-progress`. Returns the group."""
    if isinstance(p, argparse.ArgumentParser) and title:
        g = p.add_argument_group(title)
    else:
        g = p
    shown = " (required)" if required else (f" (default: {default})" if default is not None and "default:" not in help else "")
    g.add_argument(flag, required=required, default=default, metavar=metavar, help=help + shown)
    if progress:
        add_progress_arg(g)
    return g


def add_progress_arg(p: Any) -> None:
    p.add_argument("--no-progress", action="store_true", help="hide progress bars (default: shown)")
