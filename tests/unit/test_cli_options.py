"""The command line as operators type it: global options after the verb too, a wrong --log-level named, and a
closed pipe (`| head`) ending quietly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from injector.cli import build_parser, main


@pytest.mark.parametrize("argv", [
    ["--config", "c.toml", "--log-level", "debug", "--log-json", "status"],
    ["status", "--config", "c.toml", "--log-level", "debug", "--log-json"],
    ["--log-level", "info", "status", "--config", "c.toml", "--log-level", "DEBUG", "--log-json"],
])
def test_global_options_are_taken_before_or_after_the_verb(argv: list[str]):
    args = build_parser().parse_args(argv)
    assert (args.config, args.log_level, args.log_json) == ("c.toml", "DEBUG", True)


def test_global_options_after_a_nested_action_and_their_defaults_when_absent():
    args = build_parser().parse_args(["dlq", "list", "--config", "c.toml"])
    assert (args.config, args.log_level, args.log_json) == ("c.toml", "INFO", False)
    args = build_parser().parse_args(["--config", "a.toml", "dlq", "list"])
    assert args.config == "a.toml", "a verb without the option keeps the program's value"


def test_an_unknown_log_level_is_a_usage_error_naming_the_choices(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as exc:
        main(["--log-level", "loud", "status"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'LOUD'" in err and "DEBUG" in err and "Traceback" not in err


def test_a_closed_pipe_ends_the_command_quietly(tmp_path: Path):
    config = tmp_path / "c.toml"
    config.write_text('[broker]\nurls = ["amqp://guest:guest@127.0.0.1:5672//"]\n')
    read, write = os.pipe()
    os.close(read)  # the reader (`head`) is gone before the first line
    try:
        done = subprocess.run([sys.executable, "-m", "injector.cli", "--config", str(config), "broker",
                               "definitions"], stdout=write, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write)
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_demo_broker_auto_tries_the_broker_the_environment_names_first():
    from injector.testbed.demo import DEFAULT_AMQP, auto_url

    assert auto_url({}) == DEFAULT_AMQP
    assert auto_url({"RUCIO_INJECTOR_BROKER_URL": "amqp://u:p@rabbit:5673/v, amqp://u:p@other//"}) == \
        "amqp://u:p@rabbit:5673/v"


def test_every_option_of_every_verb_has_help_and_the_description_is_for_users():
    import argparse

    from injector.cli import _subparsers

    parser = build_parser()
    assert "Rucio" in (parser.description or "") and "parse →" not in (parser.description or "")
    missing = [f"{p.prog} {a.option_strings or a.dest}" for p in [parser, *_subparsers(parser)] for a in p._actions
               if not isinstance(a, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction))
               and not a.help]
    assert not missing, missing


def test_the_demo_writes_the_configuration_it_runs_with_as_a_file_the_verbs_load(tmp_path: Path):
    import tomllib

    from injector.config import load, parse
    from injector.testbed.demo import DemoBroker, _config, toml_text

    broker = DemoBroker("amqp://guest:guest@127.0.0.1:5672//", "127.0.0.1", 61613, "RabbitMQ")
    buffer = tmp_path / "bü ffer\x7f\"q"  # odd characters in the path survive the TOML
    path = tmp_path / "injector.toml"
    path.write_text(toml_text(_config(broker, "abc123", buffer)))
    assert tomllib.loads(path.read_text()) == _config(broker, "abc123", buffer)
    assert load(path, env={}) == parse(_config(broker, "abc123", buffer), source="<demo>")


@pytest.mark.parametrize("verb", [["status"], ["dlq", "list"], ["reconcile"], ["publish", "--flush"], ["ingest"],
                                  ["broker", "setup"], ["config", "check"]])
def test_with_log_json_a_failure_is_a_json_line_with_the_same_keys_in_every_verb(
        verb: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str], root_logging: None) -> None:
    from injector import exits
    from injector.cli import main

    code = main([*verb, "--config", str(tmp_path / "missing.toml"), "--log-json"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == exits.BAD_CONFIG and len(lines) == 1, lines
    record = json.loads(lines[0])
    assert set(record) == {"ts", "level", "logger", "msg", "exit_code"}, record
    assert record["level"] == "error" and record["exit_code"] == exits.BAD_CONFIG
    assert record["msg"] == f"rucio-injector {verb[0]}: config file {tmp_path / 'missing.toml'} does not exist"
