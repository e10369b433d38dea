# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Start the MONAI Label server on a studies folder, serving monai-proto's bundles.

    python -m monai_proto.apps.monailabel --studies /path/to/studies [--bundles bundles] [--port 8000]

Runs ``monailabel.main start_server`` with this package's app; binds to 127.0.0.1 unless ``--host`` says
otherwise; needs no network. Extra ``--conf key value`` pairs go to the app.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from monai_proto.apps.monailabel import APP_DIR, default_bundles_dir, find_bundles


def server_command(args: argparse.Namespace) -> list[str]:
    """The ``monailabel.main start_server`` command line for ``args``."""
    bundles = os.path.abspath(args.bundles)
    find_bundles(bundles, args.models)  # fail here, with the folder named, rather than in the server
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", APP_DIR]
    studies = args.studies if args.studies.startswith(("http://", "https://")) else os.path.abspath(args.studies)
    cmd += ["--studies", studies, "--host", args.host, "--port", str(args.port)]
    conf = {"bundles": bundles, "models": args.models, "preload": "false", **dict(args.conf or [])}
    for k, v in conf.items():
        cmd += ["--conf", k, v]
    return cmd


def run_server(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", required=True, help="folder of NIfTI/NRRD studies, or a DICOMweb URL")
    ap.add_argument("--bundles", default=default_bundles_dir(), help="folder of bundles (default: %(default)s)")
    ap.add_argument("--models", default="all", help="comma-separated bundle names to serve (default: all)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--conf", nargs=2, action="append", metavar=("KEY", "VALUE"), help="app config")
    args = ap.parse_args(argv)
    if not args.studies.startswith(("http://", "https://")) and not os.path.isdir(args.studies):
        ap.error(f"studies folder {args.studies} does not exist.")
    try:
        import monailabel  # noqa: F401
    except ImportError:
        ap.error('MONAI Label is not installed: pip install -e ".[label]" (see README, "MONAI Label and 3D Slicer").')
    return subprocess.call(server_command(args))


if __name__ == "__main__":
    sys.exit(run_server())
