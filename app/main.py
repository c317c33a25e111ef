"""python launch.py [--host H] [--port P] [--model SPEC] [--device auto|cpu|cuda[:N]] [--share]
[--threads auto|N] [--pipeline auto|off] [--max-upload-mb N] [--max-busy N] [--idle-timeout-min N]"""

from __future__ import annotations

import argparse
import sys
import threading

import gradio as gr

from engine import pipeline, threads
from engine.errors import UserError

from . import sessions
from .ui import ASSETS, build_app, css, get_model, use_device


def main(argv=None, block: bool = True) -> gr.Blocks:
    """Start the app; block=False returns once it serves (scripts/load_test.py runs it in-process)."""
    p = argparse.ArgumentParser(prog="launch.py", description="Start the Cascade Reader web UI")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--model", default="smollm2",
                   help="smollm2 (default), gemma3, a model folder, a .gguf file or a hub id")
    p.add_argument("--share", action="store_true", help="also create a public Gradio link (off by default)")
    p.add_argument("--device", default="auto", help="auto (default: CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--threads", default="auto",
                   help="CPU threads for the model: auto (default: measured, re-checked every 10 s) or a number")
    p.add_argument("--pipeline", choices=["auto", "off"], default="auto",
                   help="read with the layers in two halves on two threads (auto, default, where it applies) or off")
    # limits that protect a shared machine (app/sessions.py)
    p.add_argument("--max-upload-mb", type=float, default=sessions.LIMITS.max_upload_mb,
                   help="largest upload accepted, in MB (default %(default)s)")
    p.add_argument("--max-busy", type=int, default=sessions.LIMITS.max_busy,
                   help="most sessions with model work in flight at once; the next one is told to try again "
                        "(default %(default)s)")
    p.add_argument("--idle-timeout-min", type=float, default=sessions.LIMITS.idle_timeout_s / 60,
                   help="free a session's loaded document after this many idle minutes; its snapshots stay "
                        "on disk (default %(default)s)")
    args = p.parse_args(argv)
    if args.max_upload_mb <= 0 or args.max_busy < 1 or args.idle_timeout_min <= 0:
        p.error("--max-upload-mb and --idle-timeout-min must be > 0, --max-busy >= 1")
    try:
        use_device(args.device)
        threads.configure(args.threads)
        pipeline.configure(args.pipeline)
    except UserError as e:  # before the server starts, in one line
        print(f"launch.py: {e}", file=sys.stderr)
        sys.exit(2)
    sessions.LIMITS = sessions.Limits(max_busy=args.max_busy, idle_timeout_s=args.idle_timeout_min * 60,
                                      max_upload_mb=args.max_upload_mb)
    sessions.start_reaper()

    def preload():  # so the first reader does not wait for the model; errors show up when reading
        try:
            get_model(args.model)
        except UserError as e:
            print(f"launch.py: {e}", file=sys.stderr)

    threading.Thread(target=preload, name="preload-model", daemon=True).start()
    demo = build_app(args.model)
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True,
                max_file_size=f"{args.max_upload_mb:g}mb",
                allowed_paths=[str(ASSETS)], css=css(), theme=gr.themes.Soft(primary_hue="blue"),
                footer_links=["gradio"], favicon_path=str(ASSETS / "icon.svg"), prevent_thread_lock=not block)
    return demo


if __name__ == "__main__":
    main()
