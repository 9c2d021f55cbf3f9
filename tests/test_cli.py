import subprocess
import sys

from openldm.cli import build_parser, main


def test_help_lists_every_command(capsys):
    parser = build_parser()
    text = parser.format_help()
    for name in ("models", "samplers", "demo", "toy", "generate", "evaluate"):
        assert name in text


def test_every_flag_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.dest != "help":
                assert action.help, f"openldm {name} {action.option_strings} has no help text"


def test_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "openldm.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "models" in out.stdout


def test_user_error_is_one_line_exit_2(capsys):
    assert main(["models", "--kind", "no_such_kind"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_such_kind" in err[0]
