"""A battery of bad inputs to the command line, built on the fly: each gets exit code 2 and one line
naming the problem, before any of the document is read, never a traceback."""

import pytest
import torch

from engine import threads
from engine.cli import main
from engine.corpus import kjv_text

pytestmark = pytest.mark.real_model  # the cases past validation load the real default model


@pytest.fixture(scope="module")
def doc(tmp_path_factory):
    p = tmp_path_factory.mktemp("docs") / "genesis.txt"
    p.write_text(kjv_text(max_chars=3000))
    return p


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    return code, lines[-1] if lines else "", err


def cases(doc, tmp):
    (tmp / "a-file").write_text("x")
    (tmp / "empty.txt").write_text("")
    (tmp / "junk.pdf").write_bytes(b"%PDF-1.7 not really")
    (tmp / "long.txt").write_text(kjv_text(max_chars=60_000))
    ask = ["ask", doc, "-q", "Who made the heaven?"]
    return [
        (["ask", doc, "-q", "   "], "question is empty"),
        ([*ask, "--max-new-tokens", 0], "max-new-tokens must be >= 1"),
        ([*ask, "--max-new-tokens", -5], "max-new-tokens must be >= 1"),
        ([*ask, "--temperature", -1], "temperature must be >= 0"),
        ([*ask, "--temperature", "nan"], "temperature must be >= 0"),
        ([*ask, "--save", tmp / "a-file" / "snap"], "is a file, not a folder"),
        ([*ask, "--stride", 0], "stride must be >= 1 or auto, not 0"),
        ([*ask, "--window", 0], "window must be >= 1"),
        ([*ask, "--window", 2, "--cascades", 3], "window (2) is too small for 3 cascades"),
        ([*ask, "--window", 250, "--block", 16], "window (250) must be a multiple of the block (16)"),
        ([*ask, "--sinks", -1], "sinks must be >= 0"),
        ([*ask, "--beta", 2], "beta must be in (0, 1]"),
        ([*ask, "--threads", 0], "threads must be 'auto' or an integer >= 1"),
        ([*ask, "--threads", "many"], "threads must be 'auto' or an integer >= 1"),
        ([*ask, "--recall-tokens", -1], "recall-tokens must be >= 0"),
        ([*ask, "--recall-best", -1], "recall-best must be >= 0"),
        ([*ask, "--recall-narrow", -1], "recall-narrow must be >= 0"),
        ([*ask, "--repetition-penalty", 0.5], "repetition penalty must be >= 1"),
        ([*ask, "--summary-repetition-penalty", 0.9], "summary repetition penalty must be >= 1"),
        ([*ask, "--repetition-penalty-from", -1], "repetition-penalty-from must be >= 0"),
        ([*ask, "--recall-share", 1.5], "recall-share must be between 0 and 1"),
        ([*ask, "--summary-copy-tokens", 1], "summary copy limit must be 0 (none) or >= 2 tokens"),
        ([*ask, "--model", tmp / "no" / "such"], "no such folder or file"),
        ([*ask, "--load", tmp / "nothing"], "no snapshot there"),
        (["ask", tmp / "missing.txt", "-q", "x"], "missing.txt"),
        (["ask", tmp / "empty.txt", "-q", "x"], "empty.txt"),
        (["ask", tmp / "junk.pdf", "-q", "x"], "junk.pdf"),
        (["ask", tmp / "long.txt", "-q", "x", "--policy", "full"], "past the 8,192 that"),
        (["eval", "passkey", "--recall", "on", "--recall-tokens", -1, "--out", tmp / "pk"], "recall-tokens must be >= 0"),
        (["eval", "passkey", "--focus-share", 0.5, "--out", tmp / "pk"], "--focus-share needs --focus"),
        (["eval", "passkey", "--focus", "--focus-share", -1, "--out", tmp / "pk"], "a share in (0, 1]"),
    ]


def test_every_bad_input_is_one_line_before_reading(doc, tmp_path, capsys):
    for argv, expected in cases(doc, tmp_path):
        code, last, err = run(capsys, *argv)
        assert code == 2, (argv, last)
        assert last.startswith("error: ") and expected in last, (argv, last)
        assert "Traceback" not in err


def test_threads_auto_measures_and_a_number_is_kept():
    before = torch.get_num_threads()
    try:
        threads.configure(1)
        assert torch.get_num_threads() == 1 and threads.report()["threads"] == 1
        threads.configure("auto")
        threads._state["max"] = max(2, threads._state["max"])  # two candidates even on a one-core runner
        threads.tick()  # the first tick measures: every candidate timed, the chosen one in use
        probe = threads.report()["thread_probes_ms"][-1]
        assert set(probe) == set(threads.candidates()) and all(t > 0 for t in probe.values())
        assert torch.get_num_threads() in threads.candidates()
    finally:
        threads._state.update(mode=None, max=None)
        torch.set_num_threads(before)
