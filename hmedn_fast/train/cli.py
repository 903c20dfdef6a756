"""``hmedn train``: command-line front end of :class:`hmedn_fast.train.trainer.Trainer`.

Every :class:`~hmedn_fast.train.config.TrainConfig` option is a flag (``--steps-per-epoch``,
``--memory-budget 8GiB``, ``--resume``, ...); model constructor overrides are ``--set key=value`` (values read
as Python literals, e.g. ``--set widths=(8,16,32,64) --set norm=instance``). Multi-GPU:
``torchrun --nproc_per_node=2 -m hmedn_fast.train.cli ...`` (or ``hmedn train`` under torchrun). Also runnable as
``python -m hmedn_fast.train.cli ...``. Exit status 2 for bad options or data (the message names the file), 3
when training stopped on non-finite losses.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import sys
from typing import Any, Sequence

from hmedn_fast.train.memory import LEVELS
from hmedn_fast.train.config import MEMORY_FORMATS, PRECISIONS, SCHEDULES, TrainConfig
from hmedn_fast.train.trainer import NonFiniteLossError, jsonable

_HELP = {
    "data": "'phantom', an MSD folder (imagesTr/, labelsTr/) or a PNG folder (images/, labels/)",
    "out": "run folder: checkpoints, logs, split.json, curves.png",
    "model": "model name (hmedn_fast.models.list_models())",
    "num_classes": "classes incl. background (default: from the data)",
    "slices": "2D model on 3D data: adjacent slices stacked as channels",
    "slice_axis": "2D model on 3D data: axis the slices are cut along",
    "patch_size": "training patch, one size per spatial axis (default: whole cases)",
    "batch_size": "batch per process (global batch = this x number of processes)",
    "schedule": "learning-rate schedule: poly, cosine or constant",
    "precision": "auto (bf16 on CUDA), fp32, bf16 or fp16",
    "memory_budget": "e.g. 8GiB or 0.5 (of the GPU): plan checkpointing/batch/patch by trial steps",
    "memory_format": "layout of weights and batches: auto (channels-last on CUDA), channels_last or contiguous",
    "compile": "torch.compile the model for the training steps (slow first steps, faster after)",
    "cudnn_benchmark": "let cuDNN time its convolution algorithms (CUDA)",
    "cuda_graph": "capture the training step in a CUDA graph and replay it (CUDA, one process, fp32/bf16)",
    "sync_bn": "several CUDA processes: BatchNorm over the global batch (SyncBatchNorm; disables the lean blocks)",
    "checkpointing": "fixed activation checkpointing level: " + ", ".join(LEVELS),
    "checkpoint_every": "also save last.pt every N steps inside an epoch (0: epoch ends only)",
    "max_nonfinite": "stop after this many skipped non-finite steps",
    "resume": "continue from OUT/last.pt exactly",
    "threads": "torch CPU threads",
}
_AUTO = {  # what a None default means
    "cuda_graph": "auto: on for one process on CUDA with fp32/bf16 and no --compile",
    "checkpointing": "auto: planned with --memory-budget, else lean on CUDA and none on the CPU",
}
_CHOICES = {"schedule": SCHEDULES, "precision": PRECISIONS, "checkpointing": LEVELS, "memory_format": MEMORY_FORMATS}


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"--set takes key=value (a model constructor argument), got {text!r}")
    return key, _literal(value)


def _optional_number(kind):
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)
    return parse


def configure(parser: argparse.ArgumentParser) -> None:
    """Add one flag per TrainConfig option (plus ``--set``) to ``parser``."""
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name == "overrides":
            parser.add_argument("--set", dest="overrides", action="append", type=_override, default=[],
                                metavar="KEY=VALUE", help="model constructor override (repeatable)")
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        kw: dict[str, Any] = {"dest": f.name, "help": _HELP.get(f.name, f.name.replace("_", " "))}
        if isinstance(default, bool) or f.name == "cuda_graph":
            kw.update(action=argparse.BooleanOptionalAction, default=default)
        elif f.name in ("patch_size", "betas"):
            kw.update(nargs="+", type=float if f.name == "betas" else int, default=default)
        elif f.name in _CHOICES:
            kw.update(choices=_CHOICES[f.name], default=default)
        elif isinstance(default, int) or f.name in ("num_classes", "max_cases", "threads"):
            kw.update(type=_optional_number(int) if default is None else int, default=default)
        elif isinstance(default, float) or f.name == "grad_clip":
            kw.update(type=_optional_number(float), default=default)
        else:
            kw.update(type=str, default=default)
        kw["help"] += f" (default: {_AUTO.get(f.name, default) if default is None else default})"
        parser.add_argument(flag, **kw)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``train`` on an ``argparse`` subparsers object (sets ``func=run``)."""
    parser = subparsers.add_parser("train", help="train a model (phantom, MSD NIfTI or PNG data)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    configure(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Train with the parsed options; returns the exit status (see the module doc)."""
    from hmedn_fast.train.distributed import shutdown
    from hmedn_fast.train.trainer import Trainer

    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    options["overrides"] = dict(args.overrides)
    if options["patch_size"] is not None:
        options["patch_size"] = tuple(options["patch_size"])
    trainer = None
    try:
        trainer = Trainer(TrainConfig(**options))
        if trainer.ctx.is_main:
            print(f"hmedn train: {trainer.describe()}", file=sys.stderr, flush=True)
        result = trainer.fit()
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"hmedn train: error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteLossError as exc:
        print(f"hmedn train: stopped: {exc}", file=sys.stderr)
        return 3
    finally:
        if trainer is not None:
            shutdown(trainer.ctx)
    if trainer.ctx.is_main:
        summary = {"best": result["best"], "out": result["out"],
                   "last_epoch": result["history"][-1] if result["history"] else None,
                   "memory_plan": trainer.memory_plan}
        print(json.dumps(jsonable(summary), allow_nan=False))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hmedn_fast.train.cli [options]``: the ``train`` subcommand on its own."""
    parser = argparse.ArgumentParser(prog="hmedn train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
