"""`python -m endpoint_picker serve`: flags and environment variables -> PickerConfig, once.

Every PickerConfig field is a flag (`--queue-threshold`) and an environment variable
(`LORASERVE_PICKER_QUEUE_THRESHOLD`); a flag wins over the variable, the variable over the default.
`--http-endpoint` may be repeated (the variable takes a comma-separated list).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from endpoint_picker.config import PickerConfig
from loraserve.env_config import add_config_flags, config_from

ENV_PREFIX = "LORASERVE_PICKER_"
REPEATED = {"http_endpoints": "--http-endpoint"}


def picker_config_from(args: argparse.Namespace, environ=os.environ) -> PickerConfig:
    """flag > environment variable > PickerConfig default; raises ValueError naming the field."""
    return config_from(PickerConfig, args, ENV_PREFIX, environ)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m endpoint_picker", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve_parser = sub.add_parser("serve", help="run the endpoint picker (Envoy's ext_proc service)")
    add_config_flags(serve_parser, PickerConfig, ENV_PREFIX, "picker configuration", REPEATED)
    args = parser.parse_args(argv)
    try:
        config = picker_config_from(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from endpoint_picker.server import serve
    from loraserve.telemetry import setup_logging

    setup_logging("picker", config.log_level)
    asyncio.run(serve(config))
    return 0
