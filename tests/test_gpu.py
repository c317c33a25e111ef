"""The device path: what --device decides, and a whole session (read, recall, answer, cite, retention
view, snapshot) on each device this machine has. The CUDA cases are skipped without a GPU, with the
reason; scripts/gpu_check.sh runs them (and the engine and kernel test files) on one."""

import copy

import pytest
import torch

from engine import documents, kernels
from engine.cache import CacheConfig
from engine.devices import parse_device, peak_memory_mb
from engine.errors import UserError
from engine.models import LoadedModel, default_dtype
from engine.runtime import Engine
from engine.session import ReadingSession
from tiny_models import WORDS, tiny_llama, word_tokenizer

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh runs it)")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def test_bad_devices_are_one_line_errors():
    with pytest.raises(UserError, match="device must be auto, cpu, cuda or cuda:N, not 'tpu'"):
        parse_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available here.*use --device cpu"):
            parse_device("cuda")
    else:
        with pytest.raises(UserError, match="CUDA device"):
            parse_device(f"cuda:{torch.cuda.device_count()}")
    assert parse_device("CPU") == torch.device("cpu")


@pytest.mark.parametrize("command", [["ask", "missing.txt", "-q", "x"], ["bench", "--kernels"], ["eval", "passkey"]])
def test_the_cli_refuses_a_bad_device_before_anything_else(command, capsys):
    from engine.cli import main

    assert main([*command, "--device", "tpu"]) == 2  # before the missing document, a benchmark or a model load
    assert capsys.readouterr().err.strip() == "error: device must be auto, cpu, cuda or cuda:N, not 'tpu'"


def test_launch_refuses_a_bad_device_before_the_server_starts(capsys):
    pytest.importorskip("gradio", reason="the app needs gradio (a GPU machine may have only the engine's packages)")
    from app.main import main

    with pytest.raises(SystemExit) as stop:
        main(["--device", "cuda:x"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == "launch.py: device must be auto, cpu, cuda or cuda:N, not 'cuda:x'"


def test_auto_is_cuda_when_there_is_one_else_the_cpu():
    device = parse_device("auto")
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert set(peak_memory_mb(device)) == {"cpu"} | ({str(device)} if device.type == "cuda" else set())


@CUDA
def test_cuda_defaults_to_bfloat16_and_the_triton_kernels(monkeypatch):
    monkeypatch.delenv("CASCADE_KERNELS", raising=False)
    device = parse_device("auto")
    assert default_dtype(device) == torch.bfloat16
    assert kernels.backend(torch.empty(0, device=device)) == "triton"
    assert kernels.backend(torch.empty(0)) == "torch"


@CUDA
def test_reading_on_cuda_matches_the_cpu_and_stays_there():
    """The same tiny model on both devices (Triton kernels on CUDA, the torch reference on the CPU):
    the same logits while nothing is evicted, and nearly all the same tokens kept after evictions
    (a contest decided by a last-bit difference in fp32 sums may go the other way)."""
    ids = torch.randint(0, 64, (600,), generator=torch.Generator().manual_seed(0)).tolist()
    cpu_model = tiny_llama(64)
    runs = {}
    for device in ("cpu", "cuda"):
        model = copy.deepcopy(cpu_model).to(device)
        loaded = LoadedModel(model=model, tokenizer=None, spec="tiny", model_id="tiny", prompt_format="plain")
        engine = Engine(loaded, CacheConfig(sinks=4, window=64, cascades=4), stride=32)
        cache = engine.new_cache()
        logits = [engine.forward(torch.tensor([ids[i:i + 32]]), cache, logits="all") for i in range(0, 600, 32)]
        assert all(t.device.type == device for name in ("keys", "values", "score", "pos") for t in getattr(cache, name))
        runs[device] = (torch.cat(logits, 1).cpu(), torch.stack(cache.pos).cpu())
    (cpu_logits, cpu_pos), (gpu_logits, gpu_pos) = runs["cpu"], runs["cuda"]
    assert torch.allclose(cpu_logits[:, :64], gpu_logits[:, :64], atol=1e-4)
    assert (cpu_pos == gpu_pos).float().mean() > 0.99


@pytest.mark.parametrize("device", DEVICES)
def test_a_whole_session_runs_on_the_device(device, tmp_path):
    tokenizer = word_tokenizer()
    model = tiny_llama(len(tokenizer)).to(device)
    loaded = LoadedModel(model=model, tokenizer=tokenizer, spec="tiny", model_id="tiny-words", prompt_format="plain")
    text = "\n\n".join(" ".join(WORDS[i:] + WORDS[:i]) for i in range(40))
    document = documents.document_from_text(text, title="words")
    session = ReadingSession(loaded, CacheConfig(sinks=4, window=64, cascades="auto"), stride=32)
    session.read(document)
    assert session.doc_cache.keys[0].device.type == device
    answer = "".join(session.ask("where was the ark kept", max_new_tokens=4))
    result = session.answers[-1]
    assert isinstance(answer, str) and result.recalled  # BM25 found passages; they were re-read on the device
    assert result.citations and all(c.label for c in result.citations)  # scores and positions came back to the host
    held = session.retention()["positions"]  # [layers, kv_heads, slots] numpy
    assert held.shape[0] == 2 and held.max() < session.read_result.doc_tokens
    report = session.device_report()
    assert report["device"].startswith(device) and report["peak_memory_mb"]["cpu"] > 0
    if device == "cuda":
        assert report["peak_memory_mb"][report["device"]] > 0
    session.save(tmp_path / "snap")
    again = ReadingSession(loaded, CacheConfig(sinks=4, window=64, cascades="auto"), stride=32)
    again.load(tmp_path / "snap")
    assert again.doc_cache.keys[0].device.type == device
    assert "".join(again.ask("where was the ark kept", max_new_tokens=4)) == answer
