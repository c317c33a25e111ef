"""python launch.py [--host H] [--port P] [--model SPEC] [--share]"""

from __future__ import annotations

import argparse

from .ui import ASSETS, build_app


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="launch.py", description="Start the Cascade Reader web UI")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--model", default="smollm2", help="smollm2 (default), gemma3, a model folder, a .gguf file or a hub id")
    p.add_argument("--share", action="store_true", help="create a public Gradio link (off by default)")
    args = p.parse_args(argv)
    demo = build_app(args.model)
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, allowed_paths=[str(ASSETS)],
                css=demo.css_text, show_error=True)


if __name__ == "__main__":
    main()
