"""IPMI through ipmitool (Debian's), over RMCP+ (lanplus).

ipmitool rather than our own protocol code, and rather than pyghmi in-process: a subprocess
with a timeout is killed when the BMC does not answer, where a library thread would linger.
The password goes through the environment (-E reads IPMI_PASSWORD), never argv, which any
user on the controller could read in /proc.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from controller.power.address import BmcAddress
from controller.power.errors import BmcError
from controller.state.model import PowerState

# BMC address -> the cipher suite it accepted; shared by the drivers, which live for one call each
_SUITES: dict[str, str] = {}


class IpmiBmc:
    def __init__(self, address: BmcAddress, username: str, password: str, timeout: float) -> None:
        self.address = address
        self.name = str(address)
        self._username = username
        self._password = password
        self._timeout = timeout

    def _run(self, action: str, *args: str) -> str:
        # Cipher suite 17 (HMAC-SHA256, AES) first; a BMC without it (older ones, ipmi_sim) says
        # so at once and gets suite 3 (HMAC-SHA1, AES). Naming the suite spares ipmitool its
        # "Get Channel Cipher Suites" query, which such BMCs let time out.
        # The suite that worked is remembered per BMC: without that every poll of such a BMC
        # cost two sessions (counted at ipmi_sim, tests/integration/test_power_idle.py).
        remembered = _SUITES.get(self.name, "17")
        order = [remembered, *(s for s in ("17", "3") if s != remembered)]
        for suite in order[:-1]:
            try:
                return self._run_suite(suite, action, *args)
            except BmcError as exc:
                if "authentication algorithm" not in exc.words and "cipher" not in exc.words.lower():
                    raise
        return self._run_suite(order[-1], action, *args)

    def _run_suite(self, suite: str, action: str, *args: str) -> str:
        out = self._run_with(suite, action, *args)
        _SUITES[self.name] = suite
        return out

    def _run_with(self, suite: str, action: str, *args: str) -> str:
        tool = shutil.which("ipmitool")
        if tool is None:
            raise BmcError(self.name, action, "ipmitool is not installed on the controller (Debian ipmitool)")
        # -N/-R: ipmitool's own per-request timeout and retries, inside our overall deadline
        per_try = max(1, int(self._timeout / 3))
        argv = [tool, "-I", "lanplus", "-C", suite, "-H", self.address.host, "-p", str(self.address.port)]
        argv += ["-U", self._username, "-E", "-N", str(per_try), "-R", "2", *args]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "IPMI_PASSWORD": self._password}
        try:
            proc = subprocess.run(
                argv, env=env, capture_output=True, text=True, timeout=self._timeout, errors="replace"
            )
        except subprocess.TimeoutExpired:
            raise BmcError(self.name, action, f"no answer within {self._timeout:g} s") from None
        except OSError as exc:
            raise BmcError(self.name, action, f"ipmitool: {exc.strerror}") from None
        if proc.returncode != 0:
            words = (
                " ".join(proc.stderr.split()) or " ".join(proc.stdout.split()) or f"exit {proc.returncode}"
            )
            raise BmcError(
                self.name, action, words.replace(self._password, "***") if self._password else words
            )
        return proc.stdout

    def power_state(self) -> PowerState:
        out = self._run("power status", "chassis", "power", "status").lower()
        if "is on" in out:
            return PowerState.ON
        if "is off" in out:
            return PowerState.OFF
        raise BmcError(self.name, "power status", f"unexpected answer {out.strip()[:200]!r}")

    def power_on(self) -> None:
        self._run("power on", "chassis", "power", "on")

    def power_off(self) -> None:
        self._run("power off", "chassis", "power", "off")

    def power_cycle(self) -> None:
        # `chassis power cycle` is refused by a BMC whose machine is off: turn it on instead
        if self.power_state() is PowerState.ON:
            self._run("power cycle", "chassis", "power", "reset")
        else:
            self._run("power on", "chassis", "power", "on")

    def boot_from_network_once(self) -> None:
        self._run("set one-time network boot", "chassis", "bootdev", "pxe")
