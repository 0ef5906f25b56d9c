"""train.py's command line before Hydra parses it, its ``--help`` catalogue, and a quiet console.

* :func:`command_line`: ``resume=<run dir>`` expanded, the automatic ``profile=cpu`` added, and Hydra's
  options moved behind the overrides. Hydra's parser takes the overrides as one positional run, so an
  override after an option (``--cfg job task=text``, or the profile appended after ``--cfg job``) used to
  fail with ``unrecognized arguments``; ordering the arguments here makes every order work.
* :func:`catalog`: the ``${lra_catalog:<group>}`` resolver of ``conf/hydra/default.yaml``'s help template, one
  line per option of a config group, read from the YAML files themselves.
* :func:`quiet_library_noise`: the library messages that say nothing to the user, silenced one by one.
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
# get_args_parser); tests/test_cli.py checks this list against Hydra's parser.
HYDRA_VALUE_OPTIONS = frozenset(
    {
        "--cfg",
        "-c",
        "--package",
        "-p",
        "--config-path",
        "-cp",
        "--config-name",
        "-cn",
        "--config-dir",
        "-cd",
        "--experimental-rerun",
    }
)
# --info takes an optional value: the next argument only when it is one of these.
HYDRA_INFO_OPTIONS = frozenset({"--info", "-i"})
HYDRA_INFO_CHOICES = frozenset({"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"})
# Options that do not compose train.py's config, so a profile override would have nothing to apply to.
HYDRA_NO_APP_CONFIG = frozenset({"--hydra-help", "--version", "--shell-completion", "-sc"})
# Hydra accepts one of these modes per command; it rejects two with a ValueError and a traceback.
HYDRA_MODES = {
    "--run": "--run",
    "-r": "--run",
    "--multirun": "--multirun",
    "-m": "--multirun",
    "--cfg": "--cfg",
    "-c": "--cfg",
    "--info": "--info",
    "-i": "--info",
    "--shell-completion": "--shell-completion",
    "-sc": "--shell-completion",
}
CATALOG_WIDTH = 100


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(overrides, options)``: Hydra's options with their values, and the overrides, each in given order."""
    overrides: list[str] = []
    options: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("-"):
            overrides.append(arg)
            continue
        options.append(arg)
        takes_value = arg in HYDRA_VALUE_OPTIONS or (
            arg in HYDRA_INFO_OPTIONS and i < len(argv) and argv[i] in HYDRA_INFO_CHOICES
        )
        if takes_value and i < len(argv):
            options.append(argv[i])
            i += 1
    return overrides, options


def command_line(argv: Sequence[str]) -> list[str]:
    """The arguments train.py hands to Hydra: ``resume=`` expanded, the overrides (plus ``profile=cpu`` when
    no CUDA device is present and none was chosen), then Hydra's options.

    The profile is an override like any other, so ``.hydra/overrides.yaml``, ``resume=`` and the reproduce
    command record it.

    Raises:
        ResumeError: from :func:`lra.resume.expand_resume_argv`.
        ConfigError: two of Hydra's modes at once (``-m`` with ``--cfg job``, ...).
    """
    overrides, options = split_argv(expand_resume_argv(argv))
    modes = sorted(
        {HYDRA_MODES[option.split("=", 1)[0]] for option in options if option.split("=", 1)[0] in HYDRA_MODES}
    )
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
        text = line.lstrip("#").strip()
        if not text.startswith("@package"):
            lines.append(text)
    text = " ".join(lines)
    sentence = re.split(r"(?<=\.)\s", text, maxsplit=1)[0]
    if len(sentence) > CATALOG_WIDTH:
        sentence = sentence[: CATALOG_WIDTH - 3].rsplit(" ", 1)[0] + " ..."
    return sentence


def catalog(group: str) -> str:
    """One line per option of ``conf/<group>/``: its name and the first sentence of its comment.

    Used by the ``--help`` template (``${lra_catalog:attention}``), so a new YAML shows up there by itself.
    ``$`` is doubled because Hydra passes the template through ``string.Template``.
    """
    paths = sorted((CONF_DIR / group).glob("*.yaml"))
    if group == "attention":  # the registry's table order: the softmax baseline first
        paths = [CONF_DIR / group / f"{name}.yaml" for name in registered_attentions()]
    width = max((len(path.stem) for path in paths), default=0)
    lines = [f"  {path.stem:<{width}}  {_description(path)}".rstrip() for path in paths]
    return "\n".join(lines).replace("$", "$$")


def register_resolvers() -> None:
    """The resolvers train.py's config uses (only the help template, so far)."""
    OmegaConf.register_new_resolver("lra_catalog", catalog, replace=True)


class _DropMessages(logging.Filter):
    """Drops a logger's records whose message starts with one of ``prefixes``."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_library_noise() -> None:
    """Silence, each at its source, the library messages that say nothing to someone training a model.

    * Lightning's "💡 Tip: ... try installing litlogger / litmodels" (an advertisement logged at INFO on
      every fit; Lightning has no switch for it), dropped from that one logger.
    * torch's FutureWarning about ``isinstance(treespec, LeafSpec)``, raised from Lightning's own pytree code
      at every fit; nothing a user can change.
    """
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropMessages("💡 Tip:"))
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )
