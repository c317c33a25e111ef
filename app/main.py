"""python launch.py [--host H] [--port P] [--model SPEC] [--device auto|cpu|cuda[:N]] [--share]"""

from __future__ import annotations

import argparse
import sys
import threading

import gradio as gr

from engine.errors import UserError

from .ui import ASSETS, build_app, css, get_model, use_device


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="launch.py", description="Start the Cascade Reader web UI")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--model", default="smollm2",
                   help="smollm2 (default), gemma3, a model folder, a .gguf file or a hub id")
    p.add_argument("--share", action="store_true", help="also create a public Gradio link (off by default)")
    p.add_argument("--device", default="auto", help="auto (default: CUDA when available), cpu, cuda or cuda:N")
    args = p.parse_args(argv)
    try:
        use_device(args.device)
    except UserError as e:  # before the server starts, in one line
        print(f"launch.py: {e}", file=sys.stderr)
        sys.exit(2)

    def preload():  # so the first reader does not wait for the model; errors show up when reading
        try:
            get_model(args.model)
        except UserError as e:
            print(f"launch.py: {e}", file=sys.stderr)

    threading.Thread(target=preload, name="preload-model", daemon=True).start()
    demo = build_app(args.model)
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True,
                allowed_paths=[str(ASSETS)], css=css(), theme=gr.themes.Soft(primary_hue="blue"),
                footer_links=["gradio"], favicon_path=str(ASSETS / "icon.svg"))


if __name__ == "__main__":
    main()
