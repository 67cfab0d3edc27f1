"""The ``segtrain`` command: one absl flag set per subcommand.

    segtrain train --gin_file=gin/quickstart.gin [--gin_param='train.num_steps = 100'] --model_dir=D
        [--strategy=auto|one_device|mirrored|multi_worker] [--cpu_replicas=N]
        [--precision=float32|mixed_float16|mixed_bfloat16] [--xla] [--profile_steps=A,B]
    segtrain evaluate --model_dir=D [--split=test] [--checkpoint=best|latest|ckpt-N] [--batch_size=N]
        [--mode=whole|slide --crop_size=H,W --stride=H,W] [--scales=0.75,1.0,1.25 --flip] [--postprocess=dense_crf]
    segtrain evaluate --export=E [--split=test]      # an export of any format, in its own runtime
    segtrain predict --model_dir=D --input=FILES_GLOB_OR_DIR --output=OUT [--probabilities] [--strict]
        [--mode/--crop_size/--stride/--scales/--flip/--postprocess as evaluate]
    segtrain predict --export=E --input=... --output=OUT
    segtrain export --model_dir=D --output=E [--format=saved_model|tflite|onnx] [--quantize=float16|dynamic|int8]
        [--image_size=H,W] [--calibration_images=N] [--opset=N] [--evaluate_split=S] [--probabilities] [--overwrite]
    segtrain explain --model_dir=D --input=... --class=NAME [--layer=L|list] [--box=Y0,X0,Y1,X1] [--activations]
        [--output=O] [--checkpoint=best|latest|ckpt-N]
    segtrain prepare --dataset=voc2012 --source_dir=RAW --data_dir=OUT [--num_workers=K] [--splits=train,val]
        [--skip_bad_examples] [--overwrite] [--gin_param='datasets.voc2012_aug.sbd_dir = "..."']
    segtrain prepare --dataset=voc2012 --data_dir=OUT --verify [--splits=train,val]
    segtrain data-service --port=P [--dispatcher=HOST:PORT] [--host=NAME]
    segtrain list [--models|--backbones [--details]]
    segtrain weights list | fetch NAME [NAME ...]   # ImageNet weights of the backbones, in the Keras cache
    segtrain doctor [the flags of `segtrain train`]     # a pre-flight check, started the way the job starts
    segtrain tune --gin_file=gin/quickstart.gin --space=tune.yaml --model_dir=D [--num_trials=20] [--parallel=N]
        [--pruner=median|hyperband|none] [--seed=0]     # a search over gin bindings, each trial a run

A flag belongs to the commands that use it: given to another command it is an error that says
which commands take it. ``segtrain <command> --help`` lists a command's flags.
"""

from __future__ import annotations

import difflib
import os
import sys
import warnings

# Set before TensorFlow loads; a value already in the environment wins.
#   TF_CPP_MIN_LOG_LEVEL      TensorFlow's C++ log lines are noise on a console, its E-level ones too (a CPU
#                             machine's "failed call to cuInit", oneDNN's "supports DT_UINT8 only on
#                             platforms with AVX-512"): what matters reaches the user as an error.
#                             --verbosity brings them back.
#   TF_CPU_ALLOCATOR_USE_BFC  TensorFlow's default CPU allocator maps fresh pages for each large tensor:
#                             under a tf.distribute strategy (one_device, mirrored, multi_worker) a CPU
#                             training step spent half its time in the kernel's page faults. The BFC
#                             allocator keeps its memory and reuses it (benchmarks/RESULTS.md).
TF_ENVIRONMENT = {"TF_CPP_MIN_LOG_LEVEL": "3", "TF_CPU_ALLOCATOR_USE_BFC": "true"}
_CHOSEN = {name for name in TF_ENVIRONMENT if name in os.environ}  # set by the user: theirs
for _name, _value in TF_ENVIRONMENT.items():
    os.environ.setdefault(_name, _value)

from absl import flags  # noqa: E402

COMMANDS = {
    "train": "train the experiment of gin files and bindings into a run directory",
    "doctor": "check a job before it runs: start it as the job starts, with the flags of train",
    "tune": "search gin bindings with Optuna: each trial a run under one directory, the best as a gin file",
    "evaluate": "evaluate a trained run on a split (its best or latest checkpoint)",
    "predict": "segment your own images with a trained run: class, colour and overlay PNGs",
    "export": "write a trained run as a TF SavedModel for serving (uint8 images or encoded bytes in)",
    "explain": "Grad-CAM heat maps of a class (and a layer's activations) on your images",
    "prepare": "check a dataset's raw files once and store them for fast reading",
    "data-service": "a tf.data service dispatcher (or, with --dispatcher, a worker) that makes training input",
    "list": "show every registered plugin and its arguments",
    "weights": "list or fetch the backbones' ImageNet weights (`segtrain weights fetch resnet50 ...`)",
}
USAGE = (f"usage: segtrain {{{'|'.join(COMMANDS)}}} [flags]\n"
         + "".join(f"  {name:<13} {what}\n" for name, what in COMMANDS.items())
         + "`segtrain <command> --help` lists a command's flags.")


# Each command's module: its flags (define_flags) and what it does with them (main).
MODULES = {"train": "train", "doctor": "doctor", "tune": "tune", "evaluate": "evaluate", "predict": "predict", "export": "export",
           "explain": "explain", "prepare": "prepare", "data-service": "data_service", "list": "listing",
           "weights": "weights"}


# Set by run(): import TensorFlow quietly before the first command module (which loads it).
_QUIET_IMPORT = False


def command_module(command: str):
    """The module of ``command``; the first one imported loads TensorFlow (quietly, from run())."""
    import importlib

    if _QUIET_IMPORT and "tensorflow" not in sys.modules:
        import_tensorflow_quietly()
    return importlib.import_module(f"segtrain.commands.{MODULES[command]}")


def command_flags(command: str) -> flags.FlagValues:
    """A fresh absl FlagValues of ``command``, defined by the command's own module."""
    fv = flags.FlagValues()
    command_module(command).define_flags(fv)
    return fv


def flag_sets() -> dict[str, flags.FlagValues]:
    """Every command's flags (to name the commands a misplaced flag belongs to)."""
    return {name: command_flags(name) for name in COMMANDS}


class UsageError(Exception):
    """A command line that cannot be run; the message says why (exit status 2)."""


def parse(argv: list[str]) -> tuple[str, flags.FlagValues | None]:
    """(command, its parsed flags) of ``argv``; flags None when only help was asked for.

    Raises:
      UsageError: no or an unknown command, a flag of another command, a bad flag value.
    """
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        if len(argv) >= 2:
            return "help", None
        raise UsageError(USAGE)
    command = argv[1]
    if command not in COMMANDS:
        raise UsageError(f"unknown command {command!r}.\n{USAGE}")
    if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv[2:]):
        return command, None
    fv = command_flags(command)  # only this command's module: a command line that parses imports no other
    try:
        rest = fv([f"segtrain {command}", *argv[2:]])
    except flags.UnrecognizedFlagError as e:
        name = e.flagname
        owners = [c for c, other in flag_sets().items()
                  if name in other or (name.startswith("no") and name[2:] in other)]
        if owners:
            raise UsageError(f"--{name} is not a flag of `segtrain {command}`; it belongs to "
                             + " and ".join(f"`segtrain {c}`" for c in owners)
                             + f". `segtrain {command} --help` lists the flags of {command}.") from None
        close = difflib.get_close_matches(name, [f for f in fv if not f.startswith("help")], n=1)
        hint = f" Did you mean --{close[0]}?" if close else ""
        raise UsageError(f"unknown flag --{name} for `segtrain {command}`.{hint} `segtrain {command} --help` "
                         f"lists its flags.") from None
    except flags.Error as e:
        raise UsageError(f"{e} (`segtrain {command} --help` lists the flags).") from None
    positional = getattr(command_module(command), "POSITIONAL", None)
    if positional:  # a command of words (`segtrain weights fetch resnet50`): they become its flag
        fv[positional].value = rest[1:]
    elif len(rest) > 1:
        raise UsageError(f"`segtrain {command}` takes flags only; unexpected argument(s): {' '.join(rest[1:])}. "
                         f"Did you mean a flag such as --model_dir={rest[1]}?")
    return command, fv


def help_text(command: str) -> str:
    if command == "help":
        return USAGE
    help_ = command_flags(command).get_help(prefix="  ", include_special_flags=False)
    # absl groups flags under a line naming the defining module: leave that line out.
    lines = [line[2:] for line in help_.splitlines() if line.startswith("    ")]
    return f"usage: segtrain {command} [flags]: {COMMANDS[command]}.\n\nflags:\n" + "\n".join(lines)


def main(argv: list[str]) -> int:
    try:
        command, fv = parse(argv)
    except UsageError as e:
        print(f"error: {e}" if not str(e).startswith("usage:") else str(e), file=sys.stderr)
        return 2
    if fv is None:
        print(help_text(command))
        return 0
    from absl import logging

    # TensorFlow's INFO lines (checkpoint sharding, all-reduce plans) drown the progress line;
    # --verbosity=0 brings them back.
    verbosity = fv["verbosity"].value if "verbosity" in fv else None
    logging.set_verbosity(logging.WARNING if verbosity is None else verbosity)
    from segtrain.errors import SegtrainError, user_message

    try:
        return _run(command, fv)
    except Exception as e:
        from registry import RegistryError

        # A user error raised while a tf.function traces arrives wrapped in autograph's error:
        # the error it was handling is the user's.
        cause = e
        while cause is not None and not isinstance(cause, (SegtrainError, RegistryError)):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:  # user errors: the message alone
            print(f"{getattr(cause, 'prefix', 'error: ')}{user_message(cause)}", file=sys.stderr, flush=True)
            code = getattr(cause, "exit_code", 1)
            if getattr(cause, "hard_exit", False):
                from segtrain.io import remove_process_tempdir

                sys.stdout.flush()
                remove_process_tempdir()  # os._exit skips atexit
                os._exit(code)
            return code
        raise


def _run(command: str, fv: flags.FlagValues) -> int:
    return command_module(command).main(fv)


def run() -> None:
    """Console-script entry point."""
    from segtrain.errors import SegtrainWarning

    plain = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *args, **kwargs: (
        f"warning: {message}\n" if issubclass(category, SegtrainWarning) else plain(message, category, *args, **kwargs)
    )
    flags.FLAGS.mark_as_parsed()  # absl's own flags keep their defaults; ours are per command
    from segtrain.io import use_process_tempdir

    use_process_tempdir()  # autograph's generated files go, however the process ends
    if "TF_CPP_MIN_LOG_LEVEL" not in _CHOSEN:
        if any(arg.startswith("--verbosity") for arg in sys.argv[2:]):
            os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
        else:
            global _QUIET_IMPORT
            _QUIET_IMPORT = True
    sys.exit(main(sys.argv))


def import_tensorflow_quietly() -> None:
    """Imports TensorFlow with the C++ side's stderr (file descriptor 2) closed for the import.

    Loading its libraries prints absl's "All log messages before absl::InitializeLog()" and
    INFO lines (oneDNN, cudart_stub) whatever TF_CPP_MIN_LOG_LEVEL says, before TensorFlow reads
    it. An import that fails still raises its Python error, which prints after the descriptor
    is back.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


if __name__ == "__main__":
    run()
