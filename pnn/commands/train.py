"""``pnn train``: train a network on a simulated device or a station of instruments."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..catalog import DATASET_NAMES, DEVICE_NAMES, FEEDBACK_NAMES, RULE_NAMES


def parse_assignment(text: str) -> tuple[str, Any]:
    """Parse ``KEY=VALUE``; VALUE is read as a TOML value if it is one, else as a string.

    ``disabled=dac,adc`` becomes a list of stage names.
    """
    from ..errors import ConfigError  # noqa: PLC0415

    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"option {text!r} is not KEY=VALUE; write for example read_noise_std=0.05")
    if sys.version_info >= (3, 11):
        import tomllib  # noqa: PLC0415
    else:  # pragma: no cover
        import tomli as tomllib  # noqa: PLC0415
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    if key == "disabled" and isinstance(value, str):
        value = [name.strip() for name in value.split(",") if name.strip()]
    return key, value


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``pnn train``."""
    from ..cli import add_common_options  # noqa: PLC0415

    parser = subparsers.add_parser(
        "train",
        help="train a network and print its test accuracy",
        description=(
            "Train a physical network with a local learning rule and print its test accuracy. "
            "With no options, trains a simulated analog crossbar with direct feedback alignment "
            "on the embedded 7-vowel set. Settings come from the defaults, then --config, then "
            "the options given here."
        ),
    )
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASET_NAMES, help="dataset to train on (default: vowels, embedded)")
    data.add_argument("--data-dir", metavar="DIR", help="folder with the MNIST IDX files, gzipped or not")
    data.add_argument("--download", action="store_true", default=None,
                      help="download MNIST into the cache folder if missing, verified by SHA-256")
    data.add_argument("--n-train", type=int, metavar="N", help="use only the first N training examples")
    data.add_argument("--n-test", type=int, metavar="N", help="use only the first N test examples")

    hardware = parser.add_argument_group("device")
    hardware.add_argument("--device", metavar="NAME",
                          help=f"simulated device of the physical layers: {', '.join(DEVICE_NAMES)} (default: crossbar)")
    hardware.add_argument("--preset", metavar="NAME",
                          help="device preset, for example 'default' (realistic) or 'ideal' (every imperfection off)")
    hardware.add_argument("--device-option", action="append", metavar="KEY=VALUE", dest="device_options",
                          help="override one device setting, for example read_noise_std=0.05 or disabled=dac,adc; repeatable")
    hardware.add_argument("--station", metavar="FILE", help="station file (TOML) of instrument nodes to train instead of a simulator")

    calibration = parser.add_argument_group("calibration")
    calibration.add_argument("--calibrations", metavar="DIR",
                             help="calibration store folder (default: calibrations/ next to the station file)")
    calibration.add_argument("--calibration", choices=("use", "require", "off"),
                             help="calibration records of physical nodes: use the ones that exist, require one per "
                                  "node, or off (default: use)")
    calibration.add_argument("--allow-expired-calibration", action="store_true", default=None,
                             help="use an expired calibration record when no valid one exists (logged)")
    calibration.add_argument("--allow-identity-mismatch", action="store_true", default=None,
                             help="use a calibration record made for another device identity (logged)")
    calibration.add_argument("--twin-gradients", action="store_true", default=None,
                             help="compute the gradients of calibrated nodes through their digital twins")
    calibration.add_argument("--drift-check", type=int, metavar="EPOCHS",
                             help="check calibrated nodes for drift every EPOCHS epochs (default: 0, never)")
    calibration.add_argument("--drift-action", choices=("recalibrate", "pause", "warn"),
                             help="what a drift check does when a node is out of tolerance (default: recalibrate)")

    learning = parser.add_argument_group("learning")
    learning.add_argument("--rule", metavar="NAME", help=f"learning rule: {', '.join(RULE_NAMES)} (default: dfa)")
    learning.add_argument("--feedback", choices=FEEDBACK_NAMES, help="feedback path of the alignment rules (default: random)")
    learning.add_argument("--rule-option", action="append", metavar="KEY=VALUE", dest="rule_options",
                          help="set one option of the rule; repeatable")
    learning.add_argument("--hidden", type=int, nargs="*", metavar="N",
                          help="hidden layer widths, for example --hidden 256 256 (default: 64 64 on vowels, 256 256 on MNIST)")
    learning.add_argument("--activation", metavar="NAME", help="hidden nonlinearity: tanh, hardtanh, sigmoid (default: tanh)")
    learning.add_argument("--epochs", type=int, metavar="N", help="passes over the training set (default: 100 on vowels, 10 on MNIST)")
    learning.add_argument("--batch-size", type=int, metavar="N", help="examples per update (default: 8 on vowels, 64 on MNIST)")
    learning.add_argument("--lr", type=float, metavar="RATE",
                          help="base learning rate, in parameter units per unit gradient (default: 3e-3 on vowels, 1e-3 on MNIST)")
    learning.add_argument("--optimizer", choices=("adam", "sgd"), help="optimizer of every node (default: adam)")
    learning.add_argument("--momentum", type=float, help="SGD momentum, in [0, 1) (default: 0.9)")
    learning.add_argument("--weight-decay", type=float, help="weight decay per step, relative to the learning rate (default: 0)")
    learning.add_argument("--lr-schedule", choices=("cosine", "constant"), help="learning-rate schedule over the epochs (default: cosine)")
    learning.add_argument("--loss", choices=("cross_entropy", "mse"), help="loss on the outputs (default: cross_entropy)")
    learning.add_argument("--log-alignment", action="store_true", default=None,
                          help="log per epoch, for each hidden layer, the angle in degrees between the rule's "
                               "update and the backprop gradient through the nodes' models, on a fixed batch")
    learning.add_argument("--no-clip", action="store_false", dest="clip_updates", default=None,
                          help="stop with an error when an update would leave a parameter's limits, instead of clipping it")

    run = parser.add_argument_group("run")
    run.add_argument("--config", metavar="FILE", help="TOML file with any of these settings (underscores for dashes)")
    run.add_argument("--seed", type=int, help="seed of weights, device noise, feedback and batch order (default: 0)")
    run.add_argument("--out", metavar="DIR", help="run folder (default: runs/<date>-<time>-<dataset>-<rule>)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its last checkpoint; takes its settings from the folder")
    run.add_argument("--checkpoint-every", type=int, metavar="STEPS", help="extra checkpoint every STEPS updates (default: end of each epoch)")
    run.add_argument("--checkpoint-interval", type=float, metavar="S", dest="checkpoint_interval_s",
                     help="extra checkpoint when S seconds have passed since the last one; 0 turns it off (default: 60)")
    run.add_argument("--max-consecutive-invalid", type=int, metavar="N",
                     help="stop after N batches in a row without an update, from invalid measurements or instrument faults (default: 10)")
    run.add_argument("--retry-backoff", type=float, metavar="S", dest="retry_backoff_s",
                     help="pause after an instrument fault before trying the batch again, in seconds, doubled per fault in a row up to 30 s (default: 0.5)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--json", action="store_true", help="print the run summary as JSON after the accuracy line")
    add_common_options(parser)
    parser.set_defaults(func=run_train)


# Options that map one-to-one onto TrainConfig fields.
_FIELDS = (
    "dataset", "data_dir", "download", "n_train", "n_test", "device", "preset", "station", "rule",
    "feedback", "hidden", "activation", "epochs", "batch_size", "lr", "optimizer", "momentum",
    "weight_decay", "lr_schedule", "loss", "clip_updates", "seed", "out", "checkpoint_every",
    "checkpoint_interval_s", "max_consecutive_invalid", "retry_backoff_s", "calibrations", "calibration",
    "allow_expired_calibration", "allow_identity_mismatch", "twin_gradients", "drift_check", "drift_action",
    "log_alignment",
)


def run_train(args: argparse.Namespace) -> int:
    """Run ``pnn train`` with parsed arguments; return the exit code."""
    from ..config import TrainConfig, config_from_mapping, load_config_file  # noqa: PLC0415
    from ..errors import ConfigError  # noqa: PLC0415
    from ..experiment import train  # noqa: PLC0415

    given = {name: getattr(args, name) for name in _FIELDS if getattr(args, name) is not None}
    if args.device_options:
        given["device_options"] = dict(parse_assignment(text) for text in args.device_options)
    if args.rule_options:
        given["rule_options"] = dict(parse_assignment(text) for text in args.rule_options)

    if args.resume:
        if given or args.config:
            raise ConfigError(
                f"--resume takes every setting from the run folder; remove {', '.join('--' + k.replace('_', '-') for k in given) or '--config'}"
            )
        summary = train(resume=args.resume, progress=not args.quiet)
    else:
        base = load_config_file(args.config) if args.config else TrainConfig()
        if base.device_options and "device_options" in given:
            given["device_options"] = {**base.device_options, **given["device_options"]}
        config = config_from_mapping(given, source="command line", base=base)
        summary = train(config, progress=not args.quiet)

    print(f"test accuracy: {summary['test_accuracy']:.4f}")
    if summary.get("alignment_degrees"):
        angles = ", ".join(f"{name} {angle:.1f} deg" for name, angle in summary["alignment_degrees"].items())
        print(f"angle to backprop, last epoch: {angles}")
    print(f"run folder: {summary['run_dir']}", file=sys.stderr)
    if args.json:
        print(json.dumps(summary, indent=2))
    return 0
