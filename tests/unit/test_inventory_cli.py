"""`sledge-agent inventory` and `sledge-agent select-disk`, run through the real entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.cli import main
from agent.hardware.inventory import Inventory, Roots, collect
from agent.hardware.probes import RecordedProbes
from tests.trees import machine_trees


@pytest.fixture
def server_inventory(tmp_path: Path) -> Path:
    root = machine_trees() / "server"
    inv = collect(
        Roots(root / "sys", root / "proc", root / "dev"), RecordedProbes.load(root / "probes.json").probes()
    )
    path = tmp_path / "server.json"
    path.write_text(json.dumps(inv.to_wire()))
    return path


def test_inventory_prints_json_of_this_machine(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inventory"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # one line unless --pretty
    inv = Inventory.from_wire(json.loads(out))
    assert inv.cpu.threads >= 1
    assert main(["inventory", "--pretty"]) == 0
    pretty = capsys.readouterr().out
    assert pretty.startswith('{\n  "version": 1,') and Inventory.from_wire(json.loads(pretty)).cpu == inv.cpu


def test_select_disk_from_saved_inventory(server_inventory: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["select-disk", "--inventory", str(server_inventory), "--hints", '{"serial": "ZC1A2B3C"}'])
    assert rc == 0
    chosen = json.loads(capsys.readouterr().out)
    assert (chosen["name"], chosen["path"], chosen["tran"]) == ("sdb", "/dev/sdb", "sas")


def test_select_disk_default_is_the_smallest_fixed_disk(
    server_inventory: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["select-disk", "--inventory", str(server_inventory)]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "sda"


@pytest.mark.parametrize(
    ("hints", "message"),
    [
        ('{"model": "<in> p5600"}', "2 disks match"),
        ('{"serial": "nope"}', "no usable disk matches"),
        ('{"sise": 100}', "root device hint 'sise'"),
        ('{"size": "1.5"}', "root device hint 'size': expected a positive integer"),
        ('{"serial": "abc"', "--hints: expected JSON"),
        ('["serial"]', "root device hint '(hints)'"),
    ],
)
def test_select_disk_errors_exit_1(
    server_inventory: Path, capsys: pytest.CaptureFixture[str], hints: str, message: str
) -> None:
    assert main(["select-disk", "--inventory", str(server_inventory), "--hints", hints]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err


def test_select_disk_refuses_a_bad_inventory_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["select-disk", "--inventory", str(tmp_path / "missing.json")]) == 1
    assert "missing.json" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 1, "disks": []}')
    assert main(["select-disk", "--inventory", str(bad)]) == 1
    assert "missing keys" in capsys.readouterr().err


def test_select_disk_on_this_machine_names_what_it_saw(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["select-disk", "--hints", '{"serial": "no-such-serial-on-any-machine"}']) == 1
    err = capsys.readouterr().err
    assert "no usable disk matches the root device hints" in err and "/dev/" in err
