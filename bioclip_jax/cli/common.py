"""What several commands share: option groups, the config overrides, error handling and output helpers.

Imports only the standard library at module level: `bioclip-jax --help` must not start JAX."""

from __future__ import annotations

import contextlib
import sys

from bioclip_jax.errors import InputError

PYBIOCLIP_MODEL = "hf-hub:imageomics/bioclip-2"  # pybioclip's default --model

# What a user can cause by a value or a path; FileNotFoundError & co. name the path they could not use.
USER_ERRORS = (InputError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)

# Commands whose unknown arguments are config overrides (--config.KEY=VALUE) rather than errors.
TAKES_OVERRIDES = ("train", "demo", "plan", "finetune")


def add_model_options(p, weights_help: str) -> None:
    """pybioclip's --model/--pretrained/--device, our --arch, and the preprocessing choice."""
    p.add_argument("--model", default=PYBIOCLIP_MODEL,
                   help=f"{weights_help}; or, with --pretrained, the architecture (default {PYBIOCLIP_MODEL})")
    p.add_argument("--pretrained", help="weights file for the --model architecture (pybioclip's spelling)")
    p.add_argument("--arch", help="architecture of a bare weights file, e.g. ViT-B-16-quickgelu")
    p.add_argument("--device", help="cpu, cuda (or gpu) or tpu, optionally :INDEX (default: JAX's default device)")
    p.add_argument("--preprocess", choices=["pybioclip", "open_clip"], default="pybioclip",
                   help="pybioclip: squash to the input size, as pybioclip does for BioCLIP models (default); "
                        "open_clip: the model's own resize + center crop, for other models")


def add_distributed_options(p) -> None:
    """Multi-host flags: JAX detects TPU pod slices and SLURM itself; --coordinator for clusters it does not."""
    p.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() (TPU pod slices, SLURM: detected automatically)")
    p.add_argument("--coordinator", help="HOST:PORT of process 0, for clusters JAX does not detect")
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)


def initialize_distributed(args) -> None:
    """Multi-host: jax.distributed.initialize (TPU pod slices and SLURM are detected by JAX itself)."""
    if not (args.distributed or args.coordinator):
        return
    import jax

    if args.coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args.coordinator, num_processes=args.num_processes, process_id=args.process_id)
    else:
        jax.distributed.initialize()


def load_config(args):
    """--config plus the --config.KEY=VALUE overrides main left in args.overrides."""
    from bioclip_jax.train.config import load_config

    overrides = [o[len("--config."):] for o in args.overrides if o.startswith("--config.")]
    unknown = [o for o in args.overrides if not o.startswith("--config.")]
    if unknown:
        raise InputError(f"unrecognised arguments {unknown}; config overrides look like --config.train.lr=3e-4")
    return load_config(args.config, overrides)


def setup_logging() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def validation(config):
    """The periodic evaluation the trainer logs: validation loss and per-rank zero-shot on config.data.val."""
    if not config.data.val:
        return None
    from bioclip_jax.evaluate.zero_shot import validation_evaluator

    return validation_evaluator(config.data.val, config.eval.batch_size)


def model(args):
    """pybioclip's --model/--pretrained (an architecture and its weights file), or ours: --model WEIGHTS [--arch]."""
    from bioclip_jax.inference.classify import load_model

    if args.pretrained:
        return load_model(args.arch or args.model, args.pretrained, args.device)
    from bioclip_jax.inference.model import load, on_device

    return on_device(load(args.model, model=args.arch), args.device)


def classifier_model(args) -> dict:
    """The classifiers' model keywords: pybioclip's model_str/pretrained_str/device as given (what a --log records),
    or a loaded Model when --arch names the architecture of a bare weights file."""
    if args.arch:
        return {"model_str": model(args)}
    return {"model_str": args.model, "pretrained_str": args.pretrained, "device": args.device}


def report_failures(failures: dict[str, str]) -> int:
    for name, why in failures.items():
        print(f"bioclip-jax: skipped {name}: {why}", file=sys.stderr)
    return 1 if failures else 0


def emit(text: str, output: str | None) -> None:
    """To the --output file if given (checked before any work by io.check_output), else standard output."""
    if output:
        with open(output, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)


@contextlib.contextmanager
def warnings_as_lines(command: str):
    """The library's InputWarnings (a label file that does not exist, one label) as one line on standard error, every
    time (not once per process)."""
    import warnings

    from bioclip_jax.inference.io import InputWarning

    with warnings.catch_warnings():
        warnings.simplefilter("always", InputWarning)
        default = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, InputWarning):
                print(f"bioclip-jax {command}: warning: {message}", file=sys.stderr)
            else:
                default(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def run(args) -> int:
    """Runs the command's handler; bad input is one line and exit 2, a resource one line and exit 1."""
    from bioclip_jax import runtime
    from bioclip_jax.errors import ResourceError

    # Before anything starts JAX. Not for the planner: one malloc arena serialises the TPU compiler's threads
    # (measured with tools/bench_plan.py: docs/tpu.md).
    if args.command != "plan":
        runtime.tune_for_cpu()
    runtime.quiet_libtpu()
    try:
        return args.func(args)
    except USER_ERRORS as e:  # bad input: one clear line; anything else is a bug and keeps its traceback
        print(f"bioclip-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ResourceError as e:  # out of disk or device memory: what to do, in one line
        print(f"bioclip-jax {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before the training loop (which saves and returns on Ctrl-C) or in other commands
        print(f"\nbioclip-jax {args.command}: interrupted", file=sys.stderr)
        return 130
