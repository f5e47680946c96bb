"""``cahp export``: a saved classifier (pruned or not) to ONNX, checked against PyTorch in ONNX Runtime."""

from __future__ import annotations

import argparse
from typing import Any

from cahp.commands import command
from cahp.commands.options import add_command_parser, positive_float, positive_int


def add_parser(sub: Any) -> None:
    """Add ``cahp export`` to the subcommands ``sub``."""
    about = "export a saved classifier (pruned or not) to ONNX, checked against PyTorch in ONNX Runtime"
    parser = add_command_parser(sub, "export", about)
    parser.add_argument("--model", required=True, help="a saved classifier: a folder (pruned too), alias or hub id")
    parser.add_argument("--format", choices=["onnx"], default="onnx", help="the output format")
    parser.add_argument("--out", required=True, metavar="FILE.onnx", help="the file to write (weights inside)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument(
        "--optimize",
        action="store_true",
        help="save ONNX Runtime's ORT_ENABLE_ALL optimized graph (may hold fusions for this CPU only)",
    )
    parser.add_argument(
        "--opset", type=positive_int, default=None, metavar="N", help="ONNX opset (default: the exporter's)"
    )
    parser.add_argument(
        "--max-length",
        type=positive_int,
        default=None,
        metavar="N",
        help="tokens per example of the check batches (default: 128, or the model's limit when lower)",
    )
    parser.add_argument(
        "--tolerance",
        type=positive_float,
        default=1e-4,
        metavar="X",
        help="largest absolute logit difference to PyTorch accepted; above it nothing is written",
    )


@command("export", uses_transformers=True)
def run(args: argparse.Namespace) -> int:
    """Export, check and describe the file written."""
    from cahp.onnx_export import describe, export_classifier

    result = export_classifier(
        args.model,
        args.out,
        optimize=args.optimize,
        opset=args.opset,
        max_length=args.max_length,
        tolerance=args.tolerance,
        overwrite=args.overwrite,
    )
    print(describe(result))
    return 0
