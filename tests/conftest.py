"""Shared test fixtures: the repository root, configs, and running Snakemake for real."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def load_config(name: str = "config.yaml") -> dict:
    """A config file of the repository (``config.yaml`` or a path relative to the root)."""
    return yaml.safe_load((REPO / name).read_text())


def snakemake_command(workdir: Path, *args: str, config: dict | None = None) -> list[str]:
    """The real ``snakemake`` on this repository's Snakefile in ``workdir``, as a command line.

    ``config`` is written to ``workdir/config.yaml`` and given with --configfile, so a test
    owns its whole configuration and its .snakemake metadata.
    """
    command = [
        str(Path(sys.executable).with_name("snakemake")),
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        *args,
    ]
    if config is not None:
        config_file = workdir / "config.yaml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        command += ["--configfile", str(config_file)]
    return command


def snakemake_environment() -> dict[str, str]:
    """This environment, with the test's Python first on PATH (the rules call ``python``)."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def snakemake(
    *args: str, config: dict | None = None, workdir: Path, check: bool = True
) -> subprocess.CompletedProcess:
    """Run ``snakemake_command`` to its end; fail with its output unless told not to check."""
    command = snakemake_command(workdir, *args, config=config)
    result = subprocess.run(command, capture_output=True, text=True, env=snakemake_environment())
    if check and result.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} failed ({result.returncode}):\n"
            f"{result.stdout[-5000:]}\n{result.stderr[-5000:]}"
        )
    return result


@pytest.fixture
def default_config() -> dict:
    return copy.deepcopy(load_config())


@pytest.fixture
def tiny_config() -> dict:
    return copy.deepcopy(load_config("tests/configs/tiny.yaml"))
