"""The operator's power commands against a real `sledge serve` and a real ipmi_sim BMC:
`sledge machine bmc`, `sledge power`, `sledge machines`, and `sledge bmc rotate-key` while the
controller runs. The planted password must appear in no output, log or database byte."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.cli import main
from controller.power import vault
from tests.integration.test_controller_serve import Server, server, sledge
from tests.integration.test_power_emulators import PASSWORD, Emulator, ipmi

__all__ = ["server"]  # the fixture, used by name below


@pytest.fixture
def ipmi_bmc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    yield from ipmi(tmp_path_factory.mktemp("ipmi"))


def test_power_commands_and_key_rotation_through_a_running_controller(
    capsys: pytest.CaptureFixture[str], server: Server, ipmi_bmc: Emulator, tmp_path: Path
) -> None:
    server.start()
    machine_id, _ = server.enroll()
    secret = tmp_path / "bmc-password"
    secret.write_text(PASSWORD + "\n")
    outputs = []

    def run(*args: str) -> str:
        rc, out, err = sledge(capsys, server, *args)
        outputs.append(out + err)
        assert rc == 0, err
        return out

    shown = run(
        "machine", "bmc", machine_id, ipmi_bmc.address, "--user", "admin", "--password-file", str(secret)
    )
    assert f"BMC {ipmi_bmc.address} as admin" in shown
    assert "power on" in run("power", "on", machine_id)
    assert (ipmi_bmc.state / "power").read_text().strip() == "1"
    table = run("machines")
    assert "POWER" in table.splitlines()[0] and " on " in table.splitlines()[1]
    assert f"bmc       {ipmi_bmc.address} as admin; power on" in run("machine", "show", machine_id)

    sealed_before = server.call("GET", f"/v1/machines/{machine_id}/bmc", token=server.operator)[1]
    old_key = (server.data / vault.KEY_FILE).read_text()
    assert main(["bmc", "rotate-key", "--data", str(server.data)]) == 0  # on the data directory itself
    rotated = capsys.readouterr().out
    outputs.append(rotated)
    assert "1 BMC password(s) re-sealed" in rotated
    assert (server.data / vault.KEY_FILE).read_text() != old_key
    assert len((server.data / vault.KEY_FILE).read_text().splitlines()) == 1
    assert "power off" in run("power", "off", machine_id)  # the running controller opens the new seal
    assert (ipmi_bmc.state / "power").read_text().strip() == "0"
    assert "power off" in run("power", "status", machine_id)
    assert sealed_before["address"] == ipmi_bmc.address

    rc, _, err = sledge(capsys, server, "machine", "bmc", machine_id, ipmi_bmc.address, "--user", "admin")
    assert rc == 1 and "expected --user and --password-file" in err

    server.stop()
    for text in [*outputs, (server.data.parent / "serve.log").read_text()]:
        assert PASSWORD not in text
    for f in server.data.rglob("state.db*"):
        assert PASSWORD.encode() not in f.read_bytes()
