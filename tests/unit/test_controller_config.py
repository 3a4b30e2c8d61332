"""The controller's one Config: the environment is read in one place, flags override it."""

from __future__ import annotations

from pathlib import Path

from controller.cli import build_parser
from controller.cli.serve import config_from_args
from controller.config import DEFAULT_URL, from_environ


def test_environment_sets_the_defaults() -> None:
    config = from_environ(
        {
            "SLEDGE_DATA": "/srv/sledge",
            "SLEDGE_URL": "http://10.0.0.1:8470",
            "SLEDGE_TOKEN": "t0k",
            "SOURCE_DATE_EPOCH": "1735689600",
        },
        euid=1000,
    )
    assert config.data_dir == Path("/srv/sledge")
    assert config.controller_url == "http://10.0.0.1:8470"
    assert config.operator_token == "t0k"
    assert config.source_date_epoch == 1735689600
    assert "t0k" not in repr(config)  # a secret is never printed with the config


def test_defaults_without_environment() -> None:
    as_root = from_environ({}, euid=0)
    assert as_root.data_dir == Path("/var/lib/sledge")
    assert as_root.controller_url == DEFAULT_URL
    assert as_root.operator_token == "" and as_root.source_date_epoch is None
    user = from_environ({"HOME": "/home/op", "SOURCE_DATE_EPOCH": "yesterday"}, euid=1000)
    assert user.data_dir == Path("/home/op/.local/share/sledge")
    assert user.source_date_epoch is None  # not a number: ignored, as reproducible-builds tools do


def test_serve_flags_override_the_environment() -> None:
    base = from_environ({"SLEDGE_DATA": "/srv/env"}, euid=0)
    args = build_parser().parse_args(["serve", "--listen", "0.0.0.0:9000", "--data", "/srv/flag"])
    config = config_from_args(args, base)
    assert (config.host, config.port, config.data_dir) == ("0.0.0.0", 9000, Path("/srv/flag"))
    args = build_parser().parse_args(["serve"])
    assert config_from_args(args, base).data_dir == Path("/srv/env")


def test_the_announce_interval_is_a_serve_flag_and_must_be_positive() -> None:
    base = from_environ({}, euid=0)
    args = build_parser().parse_args(["serve", "--announce-interval", "0.5"])
    assert config_from_args(args, base).announce_seconds == 0.5
    args = build_parser().parse_args(["serve", "--announce-interval", "0"])
    try:
        config_from_args(args, base)
        raise AssertionError("an announce interval of 0 was accepted")
    except ValueError as exc:
        assert "--announce-interval: expected seconds > 0, got 0.0" in str(exc)
