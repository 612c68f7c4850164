"""The ``particlewatch`` command line.

Each subcommand parses its arguments here and hands them to the ``main(args)`` of the stage
that owns it, imported only when used so that ``--help`` stays fast. Exit codes: 0 success,
1 failure (one line on stderr), 2 bad usage (argparse), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from particlewatch import __version__

SAMPLES_HELP = "au10, ps100, ps50, ps-bimodal, silica-capsules, au-rods, cubes, spheres-rods, empty"


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def _area(text: str) -> tuple[float, float, float, float]:
    parts = text.split(",")
    try:
        x0, y0, x1, y1 = (float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--area {text!r} must be four numbers X0,Y0,X1,Y1 in stage µm") from None
    return (x0, y0, x1, y1)


def _endpoint(text: str) -> str:
    if not text.startswith(("tcp://", "ipc://", "inproc://")):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a ZeroMQ endpoint such as tcp://127.0.0.1:5556")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="particlewatch",
        description="Acquisition and live nanoparticle size analysis beside SerialEM.")
    parser.add_argument("--version", action="version", version=f"particlewatch {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show full tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("session", help="simulated (or SerialEM) acquisition + live analysis + "
                       "dashboard; stops when the statistics converge")
    p.add_argument("--out", required=True, help="folder for frames and the report")
    p.add_argument("--sample", default="au10", help=f"simulated sample: {SAMPLES_HELP}")
    p.add_argument("--precision", type=_positive_float, default=0.01,
                   help="wanted 95%% CI half-width of each population's mean size, relative "
                        "to the mean (default 0.01 = ±1%%)")
    p.add_argument("--max-frames", type=_positive_int, default=None,
                   help="stop after this many frames even if not converged")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated specimen")
    p.add_argument("--backend", choices=("simulated", "serialem"), default="simulated")
    p.add_argument("--workers", type=_positive_int, default=None,
                   help="analysis worker processes (default: the number of cores)")
    p.add_argument("--stats", type=_endpoint, default=None,
                   help="PUB endpoint of the statistics stream (default tcp://127.0.0.1:5556)")
    p.add_argument("--size", type=_positive_int, default=None,
                   help="frame width in pixels of the simulated camera (default 2048)")
    p.add_argument("--no-dashboard", action="store_true", help="print progress lines instead")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow the statistics and acquisition streams to bind to addresses "
                        "other than 127.0.0.1 (give one with --stats)")
    p.set_defaults(handler="particlewatch.session")

    p = sub.add_parser("simulate", help="write simulated frames (MRC + .mdoc) and ground truth")
    p.add_argument("--sample", required=True, help=f"one of: {SAMPLES_HELP}")
    p.add_argument("--frames", type=_positive_int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=_positive_int, default=2048, help="frame width in pixels")
    p.add_argument("--pixel-nm", type=_positive_float, default=None,
                   help="pixel size in nm (default: chosen for the sample)")
    p.add_argument("--detector", choices=("bf", "haadf"), default=None,
                   help="bright-field TEM (dark particles) or HAADF-STEM (bright particles); "
                        "default: the sample's usual one")
    p.add_argument("--dose", type=_positive_float, default=None,
                   help="electrons per pixel (default: the sample's usual dose)")
    p.set_defaults(handler="particlewatch.simulators.cli")

    p = sub.add_parser("analyze", help="batch analysis of frames or folders")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--out", required=True)
    p.add_argument("--min-size-nm", type=_positive_float, default=None,
                   help="ignore particles smaller than this ECD")
    p.add_argument("--separate", choices=("uecs", "watershed", "none"), default="uecs")
    p.add_argument("--pixel-nm", type=_positive_float, default=None,
                   help="pixel size for frames whose file and .mdoc give none")
    p.add_argument("--polarity", choices=("auto", "dark", "bright"), default="auto",
                   help="particles darker (bright-field) or brighter (HAADF) than background")
    p.add_argument("--precision", type=_positive_float, default=0.01)
    p.set_defaults(handler="particlewatch.analysis.cli")

    p = sub.add_parser("watch", help="the daemon: analyse each complete new frame, stream stats")
    p.add_argument("folder", metavar="FOLDER")
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=_positive_int, default=None)
    p.add_argument("--stats", type=_endpoint, default="tcp://127.0.0.1:5556",
                   help="PUB endpoint for the statistics stream")
    p.add_argument("--control", type=_endpoint, default=None,
                   help="REP endpoint for status/stop (default: stats port + 1)")
    p.add_argument("--precision", type=_positive_float, default=0.01)
    p.add_argument("--pixel-nm", type=_positive_float, default=None)
    p.add_argument("--separate", choices=("uecs", "watershed", "none"), default="uecs")
    p.add_argument("--min-size-nm", type=_positive_float, default=None,
                   help="ignore particles smaller than this ECD")
    p.add_argument("--polarity", choices=("auto", "dark", "bright"), default="auto")
    p.add_argument("--polling", action="store_true",
                   help="poll the folder (for SMB/NFS shares where file events are lost)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow binding sockets to addresses other than 127.0.0.1")
    p.add_argument("--split-frames", action="store_true",
                   help="analyse frames of 2048x2048 px or more as strips on idle workers at "
                        "once (lower latency where workers have free cores)")
    p.set_defaults(handler="particlewatch.daemon.cli")

    p = sub.add_parser("worker", help="an analysis worker for a daemon, possibly on another host")
    p.add_argument("--connect", type=_endpoint, required=True,
                   help="the daemon's task endpoint, e.g. tcp://HOST:PORT")
    p.add_argument("--heartbeat-s", type=_positive_float, default=1.0,
                   help="seconds between heartbeats; the daemon gives a silent worker's "
                        "frames to others after 5 missed (default 1)")
    p.set_defaults(handler="particlewatch.daemon.cli")

    p = sub.add_parser("acquire", help="the acquisition controller alone")
    p.add_argument("--backend", choices=("simulated", "serialem"), default="simulated")
    p.add_argument("--out", required=True, help="folder the frames are saved into")
    p.add_argument("--sample", default="au10")
    p.add_argument("--area", type=_area, default=None,
                   help="stage area X0,Y0,X1,Y1 in µm (default: a 20 µm square at the centre); "
                        "write --area=-10,-10,10,10 when it starts with a minus sign")
    p.add_argument("--max-frames", type=_positive_int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-on", type=_endpoint, default=None,
                   help="SUB endpoint of a daemon's stream: stop when it says converged")
    p.add_argument("--detector", choices=("bf", "haadf"), default=None,
                   help="the imaging detector (bright-field TEM: dark particles; HAADF-STEM: "
                        "bright ones). With it the segment check looks for one contrast only "
                        "and skips bare film reliably; without it SerialEM runs learn the "
                        "contrast from the first occupied fields (the simulator knows its own)")
    p.add_argument("--serialem-ip", default="127.0.0.1")
    p.add_argument("--serialem-port", type=int, default=48888)
    p.set_defaults(handler="particlewatch.acquisition.cli")

    p = sub.add_parser("dashboard", help="terminal dashboard of a running session or daemon")
    p.add_argument("--connect", type=_endpoint, default=None, metavar="ENDPOINT",
                   help="the daemon's statistics endpoint (default tcp://127.0.0.1:5556, or "
                        "the one in DIR/daemon.json with --out)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="a session's or daemon's --out folder: find both streams from its "
                        "daemon.json and session.json (also when they appear later)")
    p.add_argument("--acquisition", type=_endpoint, default=None, metavar="ENDPOINT",
                   help="the session's acquisition-state endpoint (default: the statistics "
                        "port + 4, or the one in DIR/session.json with --out)")
    p.set_defaults(handler="particlewatch.dashboard")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        module = importlib.import_module(args.handler)
        return int(module.main(args) or 0)
    except KeyboardInterrupt:
        print("particlewatch: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the last line of defence: one line, not a traceback
        if args.debug or os.environ.get("PARTICLEWATCH_DEBUG"):
            raise
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"particlewatch {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
