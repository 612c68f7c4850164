"""``particlewatch watch`` and ``particlewatch worker``.

``python -m particlewatch.daemon.cli watch ...`` accepts the same arguments plus tuning
options (timeouts, an injected analysis function) used by tests and benchmarks.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from .pipeline import Daemon
from .worker import HEARTBEAT_S, load_callable, result_endpoint_for, run_worker

log = logging.getLogger("particlewatch.daemon")

#: ``--split-frames``: frames of at least this many pixels go to the workers as strips.
SPLIT_MIN_PX = 2048 * 2048

#: Tuning options of ``python -m particlewatch.daemon.cli watch`` and their defaults.
TUNING = {"analyze": None, "worker_mode": "process", "settle_s": 0.25,
          "stall_timeout_s": 60.0, "task_timeout_s": 600.0, "max_attempts": 3,
          "rescan_s": 2.0, "histogram_interval_s": 5.0, "seed": 0, "min_size_nm": None,
          "polarity": "auto"}


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")


def watch(args: argparse.Namespace) -> int:
    """Run the daemon in this thread until SIGINT/SIGTERM or a ``stop`` request."""
    tuning = {key: getattr(args, key, default) for key, default in TUNING.items()}
    daemon = Daemon(args.folder, args.out, workers=args.workers, stats_endpoint=args.stats,
                    control_endpoint=args.control, precision=args.precision,
                    pixel_nm=args.pixel_nm, separate=args.separate, polling=args.polling,
                    allow_remote=args.allow_remote,
                    strip_min_px=SPLIT_MIN_PX if getattr(args, "split_frames", False) else None,
                    **tuning)

    def _stop(signum, frame):
        log.info("signal %d: stopping", signum)
        daemon._stop.set()

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        log.info("watching %s; stats %s, control %s", daemon.folder,
                 daemon.endpoints["stats"], daemon.endpoints["control"])
        daemon.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def worker(args: argparse.Namespace) -> int:
    """Serve tasks of the daemon whose task endpoint is ``--connect`` (results: port + 1)."""
    analyze = getattr(args, "analyze", None)
    run_worker(args.connect, result_endpoint_for(args.connect),
               analyze=load_callable(analyze) if analyze else None,
               heartbeat_s=getattr(args, "heartbeat_s", None) or HEARTBEAT_S)
    return 0


def main(args: argparse.Namespace) -> int:
    """Entry point of ``particlewatch watch`` / ``particlewatch worker``."""
    _setup_logging()
    if args.command == "worker":
        return worker(args)
    return watch(args)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m particlewatch.daemon.cli``: ``watch``/``worker`` with the
    options of ``particlewatch`` plus tuning options for tests and benchmarks."""
    parser = argparse.ArgumentParser(prog="python -m particlewatch.daemon.cli")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("watch")
    p.add_argument("folder")
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--stats", default="tcp://127.0.0.1:5556")
    p.add_argument("--control", default=None)
    p.add_argument("--precision", type=float, default=0.01)
    p.add_argument("--pixel-nm", type=float, default=None)
    p.add_argument("--min-size-nm", type=float, default=None)
    p.add_argument("--separate", choices=("uecs", "watershed", "none"), default="uecs")
    p.add_argument("--polarity", choices=("auto", "dark", "bright"), default="auto")
    p.add_argument("--polling", action="store_true")
    p.add_argument("--allow-remote", action="store_true")
    p.add_argument("--split-frames", action="store_true")
    p.add_argument("--analyze", default=None, help="package.module:function")
    p.add_argument("--worker-mode", choices=("process", "thread"), default="process")
    for key in ("settle_s", "stall_timeout_s", "task_timeout_s", "rescan_s",
                "histogram_interval_s"):
        p.add_argument("--" + key.replace("_", "-"), type=float, default=TUNING[key])
    p.add_argument("--max-attempts", type=int, default=TUNING["max_attempts"])
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("worker")
    p.add_argument("--connect", required=True)
    p.add_argument("--heartbeat-s", type=float, default=HEARTBEAT_S)
    p.add_argument("--analyze", default=None, help="package.module:function")
    return parser


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
