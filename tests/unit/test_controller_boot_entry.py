from __future__ import annotations

from pathlib import Path

from tests.unit.test_controller_kit import AioClient, start


async def test_entry_script_chains_the_machine_script_with_its_mac(
    aiohttp_client: AioClient, tmp_path: Path
) -> None:
    h = await start(aiohttp_client, tmp_path, public_url="http://10.0.2.100:8080")
    response = await h.client.get("/boot.ipxe")
    assert response.status == 200
    text = await response.text()
    assert text.startswith("#!ipxe\n")
    assert "chain http://10.0.2.100:8080/boot/ipxe?mac=${net0/mac}" in text
    response = await h.client.get("/boot/ipxe", params={"mac": "52-54-00-AB-CD-EF"})
    script = await response.text()
    assert "sledge.mac=52:54:00:ab:cd:ef" in script  # normalized, for the agent's re-enrollment
    assert "kernel http://10.0.2.100:8080/boot/files/vmlinuz" in script
