"""Shared pytest set-up: one intra-op thread per test process; helpers that run a script's
command line in this process; the compile_backend fixture of the --compile tests.

The suite runs on a 2-core CI machine; tiny models gain nothing from several threads and the
oversubscription (several processes x several threads) made them ~3x slower in practice.
Sub-processes started by tests (torchrun, the README pipeline) inherit OMP_NUM_THREADS.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402  (after the env var so the thread pool honours it)

torch.set_num_threads(1)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script, *argv):
    """Run `python <script> argv...` of the repo root inside this process (faster than a
    subprocess; the script's `if __name__ == "__main__":` block runs)."""
    import runpy
    import sys
    old = sys.argv
    sys.argv = [script, *map(str, argv)]
    try:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    finally:
        sys.argv = old


def user_error(script, *argv):
    """Run a script's command line in this process expecting a user error: training.run_main ends
    it with SystemExit("error: <one line>"). Returns that line."""
    import pytest
    with pytest.raises(SystemExit) as exit_info:
        run_script(script, *argv)
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def script_args(script, *argv):
    """The argparse Namespace that `python <script> argv...` hands to its main(): the script's
    `if __name__ == "__main__":` block runs up to its parse_args() call, and stops there."""
    import argparse

    class Parsed(Exception):
        pass

    real_parse = argparse.ArgumentParser.parse_args
    parsed = {}

    def parse_and_stop(parser, *a, **kw):
        parsed["args"] = real_parse(parser, *a, **kw)
        raise Parsed

    argparse.ArgumentParser.parse_args = parse_and_stop
    try:
        run_script(script, *argv)
    except Parsed:
        return parsed["args"]
    finally:
        argparse.ArgumentParser.parse_args = real_parse
    raise RuntimeError(f"{script} did not call parse_args()")


# --compile in tests. On a 2-core CPU inductor's C++ code generation takes about a minute per
# graph and AOTAutograd's joint-graph tracing most of a minute for the tiny training step, so CI
# runs the compile tests with dynamo's graph capture only (the "eager" backend runs the captured
# graphs with the ordinary ops): graph breaks, guards and recompilations (grad mode, batch
# sizes), in-place compilation and its state_dict keys, the RNG around tracing, resume. With
# SOFTVQ_SLOW_COMPILE_TESTS=1 the same tests also run with "aot_eager" (+ AOTAutograd:
# functionalised joint forward / backward graphs, in-place buffer updates) and with inductor.
# Inductor's own part in exactness (random ops drawn as in eager mode) has one small test that
# always compiles: test_data_training.py, test_compile_module_with_inductor_...
SLOW = pytest.mark.skipif(os.environ.get("SOFTVQ_SLOW_COMPILE_TESTS") != "1",
                          reason="minutes on a CPU; SOFTVQ_SLOW_COMPILE_TESTS=1 runs it")


@pytest.fixture(params=["eager", pytest.param("aot_eager", marks=SLOW), pytest.param("inductor", marks=SLOW)])
def compile_backend(request, monkeypatch):
    """torch.compile with the backend of the parameter in this process (and in subprocesses:
    torch's TORCH_COMPILE_OVERRIDE_BACKENDS), dynamo's caches reset before and after. Yields the
    backend's name. (torch's own config.patch: pytest's monkeypatch deletes a config module's
    entry on undo, which broke every later compile test.)"""
    import torch._dynamo
    override = "" if request.param == "inductor" else f">=0:{request.param}"
    monkeypatch.setenv("TORCH_COMPILE_OVERRIDE_BACKENDS", override)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(debug_backend_override=override):
        yield request.param
    torch._dynamo.reset()
