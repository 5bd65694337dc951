"""engine.command (errors -> one line and an exit status, for every command) and engine.signals
(the first Ctrl-C/SIGTERM stops cleanly, a second Ctrl-C aborts)."""

import io
import os
import signal

import pytest

from adaprelora_diffusion.engine.checkpoints import CheckpointError, resolve_checkpoint
from adaprelora_diffusion.engine.command import (EXIT_FAILED, EXIT_SIGINT, EXIT_SIGTERM, EXIT_USAGE, error_line,
                                                 pop_debug_flag, report_error)
from adaprelora_diffusion.engine.divergence import DivergenceError
from adaprelora_diffusion.engine.errors import TrainingError
from adaprelora_diffusion.engine.signals import StopSignals


@pytest.mark.parametrize("err, status, line", [
    (ValueError("--rank must be >= 1."), EXIT_USAGE, "error: --rank must be >= 1."),
    (TrainingError("disk full; the previous checkpoint is intact."), EXIT_FAILED, "error: disk full; the previous checkpoint is intact."),
    (DivergenceError("training diverged by step 75"), EXIT_FAILED, "error: training diverged by step 75"),
    (OSError(28, "No space left on device"), EXIT_FAILED, "error: [Errno 28] No space left on device"),
    (KeyError("unet"), EXIT_FAILED, "error: KeyError: 'unet' (rerun with --debug for the traceback, and please report it)"),
    (RuntimeError(""), EXIT_FAILED, "error: RuntimeError (rerun with --debug for the traceback, and please report it)"),
    (KeyboardInterrupt(), EXIT_SIGINT, "aborted: the second Ctrl-C stopped the run mid-step"),
])
def test_each_error_is_one_line_and_a_status(err, status, line):
    stream = io.StringIO()
    assert report_error(err, stream=stream) == status
    assert stream.getvalue().startswith(line) and stream.getvalue().count("\n") == 1


def test_debug_prints_the_traceback_before_the_line():
    try:
        raise TrainingError("it broke")
    except TrainingError as err:
        stream = io.StringIO()
        report_error(err, debug=True, stream=stream)
    text = stream.getvalue()
    assert text.startswith("Traceback") and text.rstrip().endswith("error: it broke")


def test_a_checkpoint_error_reaches_the_command_as_written(tmp_path):
    """CheckpointError is a TrainingError: trainers pass it on, so its message is printed once, unwrapped."""
    with pytest.raises(CheckpointError) as caught:
        resolve_checkpoint(tmp_path, str(tmp_path / "nowhere"))
    assert isinstance(caught.value, TrainingError)
    line = error_line(caught.value)
    assert line.count("--resume_from_checkpoint") == 1 and line.startswith("error: --resume_from_checkpoint")


def test_the_debug_flag_is_taken_out_unless_it_carries_a_value_for_transformers():
    assert pop_debug_flag(["--lr", "1", "--debug"]) == (["--lr", "1"], True)
    assert pop_debug_flag(["--traceback", "--x"]) == (["--x"], True)  # the old name
    kept = ["--debug", "underflow_overflow", "--x"]
    assert pop_debug_flag(kept, values=("underflow_overflow",)) == (kept, False)
    assert pop_debug_flag(["--x"]) == (["--x"], False)


def test_sigterm_asks_to_stop_and_a_second_ctrl_c_aborts(capsys):
    with StopSignals() as stop:
        assert not stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop() and stop.exit_status == EXIT_SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)  # torchrun forwards it again: no second message, no abort
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert capsys.readouterr().err.count("SIGTERM: stopping after this step and saving a checkpoint") == 1
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_ctrl_c_exits_130():
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop() and stop.exit_status == EXIT_SIGINT
