"""Run the command line in-process, as the CLI tests do: exit code, stdout and stderr."""

import torch

from resnet_lessons import cli


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``resnet-lessons ARGV`` with its output captured; the torch thread count is restored afterwards (the
    command line sets it for its own run)."""
    threads = torch.get_num_threads()
    try:
        code = cli.main([str(a) for a in argv])
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    return code, captured.out, captured.err
