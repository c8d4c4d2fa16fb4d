"""Shared check of the CLI's bad-input behaviour (tests/test_bad_input.py,
tests/test_run_safety.py)."""

from sparsejax.harness.cli import main


def fails(capsys, argv, *expected):
    """``main(argv)`` exits with 2 and prints one line holding every ``expected`` text,
    with no traceback."""
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]
