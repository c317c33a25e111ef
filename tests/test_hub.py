"""Hub ids (`--model org/name`): transformers' cache without the network, and a fast one-line error
(with the way to use a local folder) when the hub is unreachable. No real hub is contacted: the
endpoint is a closed local port, and a cached model is a tiny random Llama laid out in the cache."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine import hub
from engine.errors import UserError
from tiny_models import WORDS, tiny_llama, word_tokenizer

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused
ROOT = Path(__file__).resolve().parent.parent


def run_cli(args, env_extra, tmp_path):
    env = {**os.environ, "HF_ENDPOINT": UNREACHABLE, "HF_HOME": str(tmp_path / "hf"),
           "CASCADE_READER_HOME": str(tmp_path / "home")}
    env.pop("HF_HUB_OFFLINE", None)
    env.update(env_extra)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    return proc, time.perf_counter() - start


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def put_in_hub_cache(hf_home: Path, repo_id: str) -> None:
    """A tiny random Llama and a word-level tokenizer, laid out as huggingface_hub caches a download."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    tokenizer = word_tokenizer()
    tokenizer.save_pretrained(snapshot)
    tiny_llama(len(tokenizer)).save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_unreachable_hub_is_a_fast_one_line_error_naming_the_local_folder_way(tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(" ".join(WORDS))
    proc, seconds = run_cli(["ask", str(doc), "-q", "Where was the ark?", "--model", "org/not-cached", "--quiet"],
                            {}, tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    [line] = error_lines(proc.stderr)
    assert "unreachable" in line and UNREACHABLE in line and "--model DIR" in line and "org/not-cached" in line
    assert "Traceback" not in proc.stderr
    # huggingface_hub's own retries take ~25 s per file (50 s for config + tokenizer); this includes
    # Python, torch and transformers starting on a busy 2-core machine
    assert seconds < 30, seconds


def test_the_reachability_probe_itself_is_quick(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.perf_counter()
    with pytest.raises(UserError, match="unreachable"):
        hub.access("org/surely-not-cached-here")
    assert time.perf_counter() - start < 2.0  # one refused connection, no retries


def test_offline_mode_without_the_model_says_how_to_use_a_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set; download it .* --model DIR"):
        hub.access("org/surely-not-cached-here")


@pytest.mark.parametrize("offline", ["", "1"])
def test_a_cached_hub_model_reads_and_answers_without_the_network(tmp_path, offline):
    put_in_hub_cache(tmp_path / "hf", "org/tiny")
    doc = tmp_path / "doc.txt"
    doc.write_text("\n\n".join(" ".join(WORDS) for _ in range(20)))
    env = {"HF_HUB_OFFLINE": offline} if offline else {}
    proc, _ = run_cli(["ask", str(doc), "-q", "the ark", "--model", "org/tiny", "--device", "cpu", "--dtype", "float32",
                       "--window", "64", "--sinks", "4", "--max-new-tokens", "3", "--json", "--quiet"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["model"] == "org/tiny" and out["device"] == "cpu" and out["doc_tokens"] == 20 * len(WORDS)
    assert isinstance(out["answer"], str) and out["peak_memory_mb"]["cpu"] > 0
