"""``cahp export``: a saved classifier (pruned or not) to ONNX, checked against PyTorch in ONNX Runtime; or a
Llama-family or Gemma 3 causal LM (pruned or not) to GGUF, checked against transformers in llama.cpp."""

from __future__ import annotations

import argparse
from typing import Any

from cahp.commands import command
from cahp.commands.options import UsageError, add_command_parser, positive_float, positive_int
from cahp.gguf_export import OUTTYPES, TOLERANCES
from cahp.onnx_export import DEFAULT_TOLERANCE  # both light: they import the standard library and cahp.errors

#: The options that only ``--format onnx`` reads, and the one only ``--format gguf`` reads (as argparse dests).
_ONNX_ONLY = ("optimize", "opset", "max_length")
_GGUF_ONLY = ("outtype",)


def add_parser(sub: Any) -> None:
    """Add ``cahp export`` to the subcommands ``sub``."""
    about = (
        "export a saved classifier to ONNX (checked in ONNX Runtime), or a Llama or Gemma 3 causal LM to GGUF "
        "(checked in llama.cpp); pruned or not"
    )
    parser = add_command_parser(sub, "export", about)
    parser.add_argument(
        "--model",
        required=True,
        help="a saved model: a folder (pruned too), alias or hub id (onnx: a classifier; gguf: a causal LM)",
    )
    parser.add_argument(
        "--format",
        choices=["onnx", "gguf"],
        default="onnx",
        help="onnx: a classifier for ONNX Runtime; gguf: a Llama or Gemma 3 causal LM for llama.cpp",
    )
    parser.add_argument(
        "--out", required=True, metavar="FILE", help="the file to write (.onnx or .gguf; weights inside)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument(
        "--optimize",
        action="store_true",
        help="onnx: save ONNX Runtime's ORT_ENABLE_ALL optimized graph (may hold fusions for this CPU only)",
    )
    parser.add_argument(
        "--opset", type=positive_int, default=None, metavar="N", help="onnx: ONNX opset (default: the exporter's)"
    )
    parser.add_argument(
        "--max-length",
        type=positive_int,
        default=None,
        metavar="N",
        help="onnx: tokens per example of the check batches (default: 128, or the model's limit when lower)",
    )
    parser.add_argument(
        "--outtype",
        choices=OUTTYPES,
        default=None,
        help="gguf: the weights' encoding (default: f16; norms stay f32; q8_0 writes f16 where rows are not "
        "multiples of 32)",
    )
    parser.add_argument(
        "--tolerance",
        type=positive_float,
        default=DEFAULT_TOLERANCE,
        action=_GivenTolerance,
        metavar="X",
        help="largest absolute logit difference accepted; above it nothing is written (the default is onnx's; "
        f"gguf's depends on --outtype: {', '.join(f'{name} {value:g}' for name, value in TOLERANCES.items())})",
    )
    parser.set_defaults(tolerance_given=False)


class _GivenTolerance(argparse.Action):
    """``--tolerance``: stores the value and records that it was given (``tolerance_given``), since a GGUF export's
    default depends on ``--outtype``."""

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: Any = None) -> None:
        setattr(namespace, self.dest, values)
        namespace.tolerance_given = True


@command("export", uses_transformers=True)
def run(args: argparse.Namespace) -> int:
    """Export, check and describe the file written."""
    unused = _GGUF_ONLY if args.format == "onnx" else _ONNX_ONLY
    given = [name for name in unused if getattr(args, name) not in (None, False)]
    if given:
        options = ", ".join("--" + name.replace("_", "-") for name in given)
        raise UsageError(f"{options} {'does' if len(given) == 1 else 'do'} not apply to --format {args.format}")
    if args.format == "gguf":
        from cahp.gguf_export import describe as describe_gguf
        from cahp.gguf_export import export_gguf

        written = export_gguf(
            args.model,
            args.out,
            outtype=args.outtype or "f16",
            tolerance=args.tolerance if args.tolerance_given else None,
            overwrite=args.overwrite,
        )
        print(describe_gguf(written))
        return 0
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
