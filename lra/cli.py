"""train.py's command line before Hydra parses it, the ``--help`` catalogue, and a quiet console.

Hydra takes the overrides as one positional run, so an override after an option (``--cfg job task=text``)
fails with ``unrecognized arguments``; :func:`command_line` puts the options last, so every order works.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

from omegaconf import OmegaConf

from lra.build import default_profile_override
from lra.errors import ConfigError
from lra.registry import registered_attentions
from lra.resume import expand_resume_argv

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
# Hydra 1.3's options that take the next argument as their value (hydra/_internal/utils.py,
# get_args_parser); tests/test_cli.py checks these against Hydra's parser.
HYDRA_VALUE_OPTIONS = frozenset({"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name"})
HYDRA_VALUE_OPTIONS |= {"-cn", "--config-dir", "-cd", "--experimental-rerun"}
# --info takes the next argument only when it is one of these.
HYDRA_INFO_OPTIONS = frozenset({"--info", "-i"})
HYDRA_INFO_CHOICES = frozenset({"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"})
# Options that compose no app config, so a profile override would have nothing to apply to.
HYDRA_NO_APP_CONFIG = frozenset({"--hydra-help", "--version", "--shell-completion", "-sc"})
# Hydra runs one of these modes per command (and rejects two with a traceback): short form -> long form.
HYDRA_MODES = {"-r": "--run", "-m": "--multirun", "-c": "--cfg", "-i": "--info", "-sc": "--shell-completion"}
CATALOG_WIDTH = 100


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(overrides, options)``: Hydra's options with their values, and the overrides, each in given order."""
    overrides: list[str] = []
    options: list[str] = []
    args = iter(enumerate(argv))
    for i, arg in args:
        if not arg.startswith("-"):
            overrides.append(arg)
            continue
        options.append(arg)
        following = argv[i + 1] if i + 1 < len(argv) else None
        if following is not None and (
            arg in HYDRA_VALUE_OPTIONS or (arg in HYDRA_INFO_OPTIONS and following in HYDRA_INFO_CHOICES)
        ):
            options.append(following)
            next(args)
    return overrides, options


def command_line(argv: Sequence[str]) -> list[str]:
    """What train.py hands to Hydra: ``resume=`` expanded, the overrides (plus ``profile=cpu`` without CUDA
    when none was chosen, so the run records it), then Hydra's options; two of Hydra's modes at once are a
    ConfigError here rather than Hydra's traceback."""
    overrides, options = split_argv(expand_resume_argv(argv))
    names = {option.split("=", 1)[0] for option in options}
    modes = sorted({HYDRA_MODES.get(name, name) for name in names} & set(HYDRA_MODES.values()))
    if len(modes) > 1:
        raise ConfigError(
            f"{' and '.join(modes)} cannot be combined: Hydra runs one of --run, --multirun, --cfg, --info "
            f"and --shell-completion per command"
        )
    profile = None if HYDRA_NO_APP_CONFIG.intersection(options) else default_profile_override(overrides)
    return [*overrides, *([profile] if profile else []), *options]


def _description(path: Path) -> str:
    """The first sentence of a YAML file's leading comment (``# @package`` lines skipped), one line."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if not (text := line.lstrip("#").strip()).startswith("@package"):
            lines.append(text)
    sentence = re.split(r"(?<=\.)\s", " ".join(lines), maxsplit=1)[0]
    if len(sentence) > CATALOG_WIDTH:
        sentence = sentence[: CATALOG_WIDTH - 3].rsplit(" ", 1)[0] + " ..."
    return sentence


def catalog(group: str) -> str:
    """The ``${lra_catalog:<group>}`` resolver of the ``--help`` template: one line per ``conf/<group>/``
    option with the first sentence of its comment (``$`` doubled for Hydra's ``string.Template``)."""
    paths = sorted((CONF_DIR / group).glob("*.yaml"))
    if group == "attention":  # the registry's table order: the softmax baseline first
        paths = [CONF_DIR / group / f"{name}.yaml" for name in registered_attentions()]
    width = max((len(path.stem) for path in paths), default=0)
    lines = [f"  {path.stem:<{width}}  {_description(path)}".rstrip() for path in paths]
    return "\n".join(lines).replace("$", "$$")


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("lra_catalog", catalog, replace=True)


def quiet_library_noise() -> None:
    """Silence the library messages that say nothing to someone training a model: Lightning's litlogger
    advertisement on every fit, and a torch FutureWarning raised from Lightning's own pytree code."""
    tip = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    tip.addFilter(lambda record: not str(record.msg).startswith("💡 Tip:"))
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )
