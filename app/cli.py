"""``python -m app`` / ``adaprelora-app``: the web app on 127.0.0.1:7860.

    python -m app                                 # the embedded demo model, ./adaprelora-workspace
    python -m app --workspace /data/lora --model-dir /data/models --auth alice:secret --auth bob:pw

Binding beyond loopback (``--host 0.0.0.0``) and Gradio's share links are opt-in. Logins come
from ``--auth user:pass`` (repeatable) or ``ADAPRELORA_APP_AUTH="user:pass,user2:pass2"``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

__all__ = ["main", "build_parser", "parse_auth", "launch"]

AUTH_ENV = "ADAPRELORA_APP_AUTH"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adaprelora-app", description="The adaprelora web app: upload photos, train a "
                                     "LoRA in a background worker, compare samples, download the files.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface; use with --auth)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also make a public Gradio share link (needs network)")
    parser.add_argument("--auth", action="append", default=[], metavar="USER:PASS",
                        help=f"turn on login (repeatable; or {AUTH_ENV}='user:pass,user2:pass2'); each user sees only their jobs")
    parser.add_argument("--workspace", default="./adaprelora-workspace", help="where jobs, uploads and outputs live")
    parser.add_argument("--model-dir", action="append", default=[], metavar="DIR",
                        help="a folder of base models (diffusers folders, .safetensors/.ckpt) users may pick; "
                             "<workspace>/models always counts")
    parser.add_argument("--max-file-mb", type=float, default=25.0, help="largest upload, per file")
    parser.add_argument("--max-upload-mb", type=float, default=300.0, help="largest set of photos, in all")
    parser.add_argument("--max-files", type=int, default=100, help="most photos in one job")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error (otherwise one line)")
    return parser


def parse_auth(values: list[str], env: str | None) -> list[tuple[str, str]]:
    pairs = list(values) + [v for v in (env or "").split(",") if v.strip()]
    out = []
    for pair in pairs:
        user, sep, password = pair.strip().partition(":")
        if not sep or not user or not password:
            raise ValueError(f"--auth / {AUTH_ENV} entries must look like user:password, got {pair.strip()[:40]!r}.")
        out.append((user, password))
    return out


def launch(args: argparse.Namespace, block: bool = True):
    """Build the workspace, the queue and the page, and serve it (Gradio's server, queue, auth and file serving)."""
    from .workspace import Workspace

    ws = Workspace.open(args.workspace)
    app_lock = ws.hold_app_lock()  # kept open (and locked) until the process ends; AppError: another app holds it
    # Gradio keeps uploads in its temp folder: inside the workspace, so photos never land elsewhere.
    os.environ["GRADIO_TEMP_DIR"] = str(ws.gradio_dir)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from starlette.middleware import Middleware

    from .scheduler import Scheduler
    from .served import ServedFilesGuard
    from .service import JobService
    from .ui import CSS, build_ui
    from .uploads import UploadLimits

    auth = parse_auth(args.auth, os.environ.get(AUTH_ENV))
    scheduler = Scheduler(ws)
    model_dirs = [Path(d).expanduser().resolve() for d in args.model_dir] + [ws.models_dir]
    service = JobService(ws, model_dirs, UploadLimits(args.max_file_mb, args.max_upload_mb, args.max_files), scheduler)
    service.served.reset()  # nothing uploaded or served before this start is served after it
    scheduler.start()
    demo = build_ui(service)
    demo.app_lock = app_lock
    demo.queue(default_concurrency_limit=1)
    print(f"Workspace: {ws.root}" + (f"; login on for {len(auth)} user(s)" if auth else ""), flush=True)
    return demo.launch(
        server_name=args.host, server_port=args.port, share=args.share, auth=auth or None,
        allowed_paths=[],  # nothing beyond Gradio's own folder is ever served
        blocked_paths=[str(ws.jobs_dir), *(str(d) for d in model_dirs)],
        # Gradio refuses a whole upload when one file is over its limit: its limit is the set's, so an
        # oversized photo reaches the app's own check, which names it and keeps the others
        max_file_size=f"{int(args.max_upload_mb * 1024)}kb", run_history=False,  # uploads may be faces
        footer_links=["api"], css=CSS, ssr_mode=False, quiet=False, prevent_thread_lock=not block,
        app_kwargs={"middleware": [Middleware(ServedFilesGuard, served=service.served)]},  # files: their user only
    )


def main(argv: list[str] | None = None) -> int:
    from adaprelora_diffusion.engine.command import EXIT_OK, report_error

    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        launch(args)
    except (Exception, KeyboardInterrupt) as err:  # one line and an exit status, as every command (engine.command)
        return report_error(err, debug=args.debug)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
