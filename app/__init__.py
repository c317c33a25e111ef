"""Cascade Reader web UI (Gradio). UI only: model work goes through the engine package."""
