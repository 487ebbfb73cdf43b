"""SGLang plugin: registers the ``blasst`` attention backend and its ``--blasst-*`` flags.

SGLang (>= 0.5.17) calls :func:`register` through the ``sglang.srt.plugins`` entry point from
``sglang.srt.plugins.load_plugins()``, which runs in every process that needs it: the launcher
(``sglang serve`` / ``python -m sglang.launch_server``), ``sglang.Engine`` and each scheduler process.

What it does, all through SGLang's public registration hooks:

- ``register_attention_backend("blasst")``: the factory that builds :class:`BlasstAttnBackend`;
- ``add_attention_backend_choices(["blasst"])``: ``--attention-backend blasst`` (and the prefill /
  decode variants) accept the name;
- three ``HookRegistry`` hooks on ``ServerArgs`` (SGLang's plugin hook mechanism; SGLang has no
  hook for plugin-owned flags): ``add_cli_args`` (after) adds the ``--blasst-*`` flags,
  ``from_cli_args`` (before) exports them to the environment that scheduler processes inherit,
  ``__post_init__`` (after) validates the settings, calibration included, before any model loads.
"""

from __future__ import annotations

import argparse
import logging

from .config import BlasstConfig, add_cli_args, export_cli_args

__all__ = ["BACKEND_NAME", "register", "create_backend", "check_server_args"]

logger = logging.getLogger(__name__)

#: The ``--attention-backend`` name.
BACKEND_NAME = "blasst"

_SERVER_ARGS = "sglang.srt.server_args.ServerArgs"
_registered = False


def create_backend(model_runner):
    """SGLang backend factory: ``ModelRunner -> BlasstAttnBackend``.

    Rejects what SGLang's triton backend rejects (cross attention); MLA models come here too and
    use the MLA forms of the kernels (see :mod:`blasst_sglang.backend`).
    """
    if model_runner.model_config.is_encoder_decoder:
        raise ValueError(
            "the blasst attention backend does not support cross attention (encoder-decoder models), "
            "like SGLang's triton backend it is built on; use another --attention-backend"
        )
    from .backend import BlasstAttnBackend

    return BlasstAttnBackend(model_runner, BlasstConfig.from_env())


def _add_cli_args(_result, parser: argparse.ArgumentParser) -> None:
    add_cli_args(parser)


def _export_cli_args(_cls, args: argparse.Namespace) -> None:
    export_cli_args(args)


def check_server_args(_result, server_args) -> None:
    """Validate the BLASST settings when a backend named ``blasst`` is selected; warn when they would be ignored.

    Runs after ``ServerArgs.__post_init__``, in the launcher or Engine process, before the model
    loads. Raises ``ValueError`` with the offending flag / environment variable.
    """
    config = BlasstConfig.from_env()
    backends = set(server_args.get_attention_backends())
    if BACKEND_NAME not in backends:
        if not config.is_default():
            logger.warning(
                "BLASST settings are ignored: the attention backends are %s, not %r (%s)",
                sorted(b for b in backends if b), BACKEND_NAME, config.describe(),
            )
        return
    if config.calibration is not None:
        model_config = server_args.get_model_config()
        config.scale_factor_tables(model_config.num_attention_layers, model_config.num_attention_heads)
    logger.info("BLASST attention: %s", config.describe())


def register() -> None:
    """Entry point of the ``sglang.srt.plugins`` group; idempotent."""
    global _registered
    if _registered:
        return
    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices

    register_attention_backend(BACKEND_NAME)(create_backend)
    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])
    HookRegistry.register(f"{_SERVER_ARGS}.add_cli_args", _add_cli_args, HookType.AFTER)
    HookRegistry.register(f"{_SERVER_ARGS}.from_cli_args", _export_cli_args, HookType.BEFORE)
    HookRegistry.register(f"{_SERVER_ARGS}.__post_init__", check_server_args, HookType.AFTER)
    _registered = True
