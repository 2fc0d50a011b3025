"""Convert an mmsegmentation or erfnet_pytorch ERFNet checkpoint into ours.

    python scripts/convert_checkpoint.py --from mmseg IN.pth OUT.pth
    python scripts/convert_checkpoint.py --from erfnet_pytorch erfnet_pretrained.pth OUT.pth

The result loads with ``erfnet.load_model(OUT.pth)``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from erfnet.convert import SOURCES, convert_checkpoint
from erfnet.errors import UserError, cli_main
from erfnet.model import count_parameters
from erfnet.outputs import check_outputs, output_file, same_file


# fmt: off
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--from", dest="source", required=True, choices=SOURCES,
                   help="format of IN: mmseg (erfnet_fcn_*_cityscapes) or erfnet_pytorch"
                   " (Eromera's)")
    p.add_argument("input", type=Path, help="foreign checkpoint (.pth)")
    p.add_argument("output", type=Path, help="where to write our checkpoint (.pth)")
    return p
# fmt: on


def main(argv: list[str] | None = None) -> int:
    return cli_main(get_args_parser, run, argv)


def run(args: argparse.Namespace) -> None:
    if same_file(args.input, args.output):  # also a hard link or another spelling of it
        raise UserError(f"output path must differ from the input: {args.output} is {args.input}")
    check_outputs(output_file("output", args.output), [("", args.input)])  # before the load
    model = convert_checkpoint(args.input, args.output, args.source)
    print(
        f"converted {args.source} checkpoint {args.input} -> {args.output}: "
        f"head={model.config['head']}, classes={model.num_classes}, "
        f"params={count_parameters(model):,}"
    )


if __name__ == "__main__":
    main()
