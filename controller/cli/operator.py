"""The operator's commands: machines, machine show, images, deploy, erase, verify, reboot, jobs,
cancel, events (logs), watch. They talk to a running controller over its HTTP API.

Tables by default, `--json` for scripts; any error is one line on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.progress import ProgressBar, human_bytes
from agent.protocol import CloudInit, DiskHints, EraseMode, JobKind, JobParams, PowerAction, ProtocolError
from controller.api import views
from controller.auth import AuthError, operator_token_path, read_operator_token
from controller.cli import power as power_cli
from controller.config import Config
from controller.errors import ControllerError
from controller.jobs import JobState
from controller.trust.fingerprint import Fingerprint

COMMANDS = (
    "machines",
    "machine",
    "images",
    "deploy",
    "erase",
    "verify",
    "reboot",
    "jobs",
    "cancel",
    "events",
    "logs",
    "watch",
    "power",
)
Json = dict[str, Any]


class CliError(ControllerError):
    """Anything that ends a command: printed as one line."""


@dataclass(frozen=True)
class Client:
    url: str
    token: str
    timeout: float = 30.0

    def _open(self, method: str, path: str, body: Json | None, timeout: float | None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url.rstrip("/") + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.token}")
        request.add_header("Content-Type", "application/json")
        try:
            return urllib.request.urlopen(request, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read())["error"]
            except (ValueError, KeyError, TypeError):
                message = f"HTTP {exc.code} {exc.reason}"
            raise CliError(message) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise CliError(
                f"controller {self.url}: {reason} (is `sledge serve` running? --controller URL)"
            ) from None

    def call(self, method: str, path: str, body: Json | None = None) -> Json:
        with self._open(method, path, body, None) as response:
            reply: Json = json.loads(response.read() or b"{}")
            return reply

    def stream(self, path: str) -> Iterator[Json]:
        """Server-sent events as dicts, until the server closes the stream."""
        with self._open("GET", path, None, 3600.0) as response:
            for raw in response:
                line = raw.decode().rstrip("\n")
                if line.startswith("data: "):
                    yield json.loads(line[6:])


def _token(args: argparse.Namespace, config: Config) -> str:
    if config.operator_token and not args.token_file:
        return config.operator_token
    path = args.token_file or operator_token_path(args.data or config.data_dir)
    try:
        return read_operator_token(path)
    except FileNotFoundError:
        raise CliError(
            f"operator token {path}: not found (start `sledge serve` once, or --token-file)"
        ) from None
    except (OSError, AuthError) as exc:
        raise CliError(str(exc)) from None


def add_parsers(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--controller", default=None, help="controller URL (default: $SLEDGE_URL, else this machine)"
    )
    common.add_argument("--data", type=Path, default=None, help="data directory holding operator.token")
    common.add_argument("--token-file", type=Path, default=None)
    common.add_argument("--json", action="store_true", help="print JSON instead of a table")
    disk = argparse.ArgumentParser(add_help=False)
    disk.add_argument("--disk", type=_hints, default=None, help="root device hints: serial=X,size=>= 100,...")
    wait = argparse.ArgumentParser(add_help=False)
    wait.add_argument(
        "--wait", action="store_true", help="follow the job to its end (exit 1 unless it succeeds)"
    )

    sub.add_parser("machines", parents=[common], help="list machines")
    p = sub.add_parser("machine", parents=[common], help="one machine")
    msub = p.add_subparsers(dest="machine_cmd", required=True)
    msub.add_parser("show", parents=[common], help="show a machine with its inventory").add_argument(
        "machine"
    )
    msub.add_parser(
        "accept", parents=[common], help="accept a quarantined machine's new hardware (see `machine show`)"
    ).add_argument("machine", help="id, MAC or hostname")
    msub.add_parser(
        "expect", parents=[common], help="let a MAC enroll once even with `sledge serve --discovery closed`"
    ).add_argument("machine", metavar="MAC")
    p = msub.add_parser("set", parents=[common], help="change a machine's settings (see docs/controller.md)")
    p.add_argument("machine", help="id, MAC or hostname (a MAC not seen yet: `machine expect` it first)")
    p.add_argument(
        "--kernel-args",
        required=True,
        help='appended to its agent boot\'s kernel command line, e.g. "sledge.shell=1" ("" clears them)',
    )
    power_cli.add_bmc_parsers(msub, common)
    power_cli.add_power_parser(sub, common)
    p = sub.add_parser("images", parents=[common], help="list registered images")
    p.add_argument("--register", metavar="NAME[:VERSION]", help="register an image from the chunk store")
    p = sub.add_parser("deploy", parents=[common, disk, wait], help="write an image to a machine's disk")
    p.add_argument("machine", help="id, MAC or hostname")
    p.add_argument("image", help="NAME[:VERSION]")
    for name in ("user-data", "meta-data", "network-config"):
        p.add_argument(f"--{name}", type=Path, help=f"cloud-init {name} file for a NoCloud seed on the disk")
    p = sub.add_parser("erase", parents=[common, disk, wait], help="erase a machine's disk")
    p.add_argument("machine")
    p.add_argument(
        "--mode",
        choices=[m.value for m in EraseMode],
        default=EraseMode.METADATA.value,
        help="metadata: signatures and both GPT copies; full: every byte (BLKZEROOUT)",
    )
    p = sub.add_parser("verify", parents=[common, disk, wait], help="check a disk against an image (drift)")
    p.add_argument("machine")
    p.add_argument("image")
    p = sub.add_parser("reboot", parents=[common, wait], help="reboot (or power off) a machine")
    p.add_argument("machine")
    p.add_argument("--poweroff", action="store_true")
    p = sub.add_parser("jobs", parents=[common], help="list jobs, newest first")
    p.add_argument("--machine", default=None)
    p.add_argument("--state", default=None, help=",".join(s.value for s in JobState))
    p.add_argument("--limit", type=int, default=50)
    sub.add_parser("cancel", parents=[common], help="cancel a job").add_argument("job")
    for name in ("events", "logs"):
        p = sub.add_parser(name, parents=[common], help="a job's events")
        p.add_argument("job")
        p.add_argument("--follow", "-f", action="store_true")
    p = sub.add_parser("watch", parents=[common], help="follow every event as it happens")
    p.add_argument("--job", default=None)


def _hints(text: str) -> DiskHints:
    try:
        return DiskHints.parse(text)
    except ProtocolError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run(args: argparse.Namespace, config: Config) -> int:
    try:
        client = Client(args.controller or config.controller_url, _token(args, config))
        return _COMMANDS[args.cmd](client, args)
    except CliError as exc:
        print(shown(f"sledge: {exc}"), file=sys.stderr)
        return 1
    except ProtocolError as exc:
        print(shown(f"sledge: the controller's reply does not match this sledge: {exc}"), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


# -- output --------------------------------------------------------------------------------------------


# control characters (but the newline and the tab) as escapes: ESC, CR, BEL and the C1 codes from an
# agent's event, a hostname or a peer's status line quoted in a drop would drive the operator's terminal
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0)) if chr(c) not in "\n\t"}


def shown(text: str) -> str:
    """Text the controller relays (much of it an agent's, untrusted) as a terminal may show it."""
    return text.translate(_CONTROL)


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def ago(t: float | None) -> str:
    if t is None:
        return "never"
    s = max(0.0, time.time() - t)
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.0f}h ago"


def emit(args: argparse.Namespace, data: object, text: str) -> int:
    print(json.dumps(data, indent=2) if args.json else shown(text))
    return 0


def progress(job: views.JobView) -> str:
    if job.total:
        return f"{100 * (job.done or 0) / job.total:.0f}% of {human_bytes(job.total)}"
    return ""


MACHINE_EVENTS_SHOWN = 10  # of the 20 the view carries (`--json` has them all)


def event_line(e: views.EventView) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(e.at))
    seq = f"#{e.seq}" if e.seq is not None else "ctl"
    done = f" [{human_bytes(e.done or 0)}/{human_bytes(e.total)}]" if e.total else ""
    return shown(f"{stamp} {e.job_id or e.machine_id} {seq:>5} {e.kind:<8} {e.message}{done}")


# -- commands ------------------------------------------------------------------------------------------


def machines(c: Client, args: argparse.Namespace) -> int:
    reply = c.call("GET", "/v1/machines")
    rows = [
        (m.id, m.state, m.hostname, ",".join(m.macs), m.desired_image, m.power or "-", ago(m.last_seen))
        for m in views.MachineList.from_wire(reply).machines
    ]
    header = ("ID", "STATE", "HOSTNAME", "MACS", "IMAGE", "POWER", "SEEN")
    return emit(args, reply["machines"], table(rows, header))


def machine(c: Client, args: argparse.Namespace) -> int:
    ref = urllib.parse.quote(args.machine, safe="")
    if args.machine_cmd == "bmc":
        return power_cli.machine_bmc(c, args)
    if args.machine_cmd == "accept":
        reply = c.call("POST", f"/v1/machines/{ref}/accept")
        m = views.MachineDetail.from_wire(reply)
        bound = fingerprint_line(m.fingerprint) if m.fingerprint else "-"
        return emit(args, reply, f"{m.id}: accepted, now {m.state}; fingerprint {bound}")
    if args.machine_cmd == "expect":
        reply = c.call("POST", f"/v1/machines/{ref}/expect")
        e = views.MachineView.from_wire(reply)
        return emit(args, reply, f"{e.id}: expected ({', '.join(e.macs)}); it may enroll once")
    if args.machine_cmd == "set":
        patch = views.MachinePatch(kernel_args=args.kernel_args)
        reply = c.call("PATCH", f"/v1/machines/{ref}", patch.to_wire())
        s = views.MachineView.from_wire(reply)
        return emit(args, reply, f"{s.id}: kernel args {s.kernel_args or '(none)'} from its next agent boot")
    reply = c.call("GET", f"/v1/machines/{ref}")
    m = views.MachineDetail.from_wire(reply)
    inv = m.inventory
    system = f"{inv.system.vendor or ''} {inv.system.product or ''}" if inv else ""
    hints = ",".join(f"{k}={v}" for k, v in m.disk_hints.items) or "-"
    lines = [
        f"machine   {m.id}  ({m.state})",
        f"hostname  {m.hostname}",
        f"macs      {', '.join(m.macs)}",
        f"uuid      {m.system_uuid}",
        f"system    {system}",
        f"serial    {(inv.system.serial if inv else None) or '-'}",
        f"memory    {human_bytes(inv.memory.total if inv else 0)}",
        f"image     {m.desired_image or '-'}   disk hints {hints}",
        f"boot args {m.kernel_args or '-'}",
        f"seen      {ago(m.last_seen)}   inventories {len(m.inventory_history)}",
    ]
    if m.fingerprint:
        lines.append(f"bound     {fingerprint_line(m.fingerprint)}")
    if m.bmc:
        lines.append(f"bmc       {m.bmc.address} as {m.bmc.username}; power {m.bmc.power}")
        if m.bmc.power_error:
            lines.append(f"          last poll: {m.bmc.power_error}")
    elif m.bmc_suggested:
        lines.append(f"bmc       none set; the agent found {m.bmc_suggested} (use: `sledge machine bmc`)")
    q = m.quarantine
    if q:
        lines += [
            f"QUARANTINED since {ago(q.at)}: a registration from {q.address} reported different hardware",
            f"  seen    {fingerprint_line(q.fingerprint)}",
            *(f"  change  {change}" for change in q.changes),
            f"  no jobs until `sledge machine accept {m.macs[0] if m.macs else m.id}`",
        ]
    disks = [(d.name, human_bytes(d.size), d.model, d.serial, d.tran) for d in (inv.disks if inv else ())]
    if disks:
        lines += ["", table(disks, ("DISK", "SIZE", "MODEL", "SERIAL", "TRAN"))]
    jobs_ = [(j.id, j.kind, j.state, j.attempts, j.reason) for j in m.jobs]
    if jobs_:
        lines += ["", table(jobs_, ("JOB", "KIND", "STATE", "ATTEMPTS", "REASON"))]
    if m.events:  # its own, outside any job: quarantine, accept, BMC, removal from a peer swarm
        lines += ["", "events (newest last)", *(event_line(e) for e in m.events[-MACHINE_EVENTS_SHOWN:])]
    return emit(args, reply, "\n".join(lines))


def fingerprint_line(f: Fingerprint) -> str:
    return str(f)


def images(c: Client, args: argparse.Namespace) -> int:
    if args.register:
        reply = c.call("POST", "/v1/images", views.ImageRegister(args.register).to_wire())
        image = views.ImageView.from_wire(reply)
        return emit(args, reply, f"registered {image.name}:{image.version} {image.digest}")
    reply = c.call("GET", "/v1/images")
    rows = [
        (i.name, i.version, human_bytes(i.image_size), human_bytes(i.data_size), i.digest[:16])
        for i in views.ImageList.from_wire(reply).images
    ]
    return emit(args, reply["images"], table(rows, ("NAME", "VERSION", "SIZE", "DATA", "DIGEST")))


def _job(c: Client, args: argparse.Namespace, kind: JobKind, image: str = "", **params: Any) -> int:
    if getattr(args, "disk", None) is not None:
        params["disk"] = args.disk
    body = views.JobCreate(args.machine, kind, image, JobParams(**params))
    reply = c.call("POST", "/v1/jobs", body.to_wire())
    job = views.JobView.from_wire(reply)
    if not args.wait:
        return emit(args, reply, job.id)
    print(f"{job.id}: {kind} on {job.machine_id}", file=sys.stderr)
    return wait_for(c, args, job.id)


def wait_for(c: Client, args: argparse.Namespace, job_id: str) -> int:
    bar: ProgressBar | None = None
    for e in c.stream(f"/v1/events/stream?job={job_id}"):
        event = views.EventView.from_wire(e)
        if event.total:
            bar = bar or ProgressBar(event.total, job_id)
            bar.update(event.done or 0)
        elif not args.json:
            print(event_line(event), file=sys.stderr)
        reply = c.call("GET", f"/v1/jobs/{job_id}")
        job = views.JobDetail.from_wire(reply)
        if job.state.terminal:
            if bar:
                bar.close()
            emit(args, reply, f"{job_id}: {job.state}" + (f" ({job.reason})" if job.reason else ""))
            return 0 if job.state is JobState.SUCCEEDED else 1
    raise CliError(f"job {job_id}: the controller closed the event stream before the job ended")


def deploy(c: Client, args: argparse.Namespace) -> int:
    seed = CloudInit(
        *(
            path.read_text() if path is not None else ""
            for path in (args.user_data, args.meta_data, args.network_config)
        )
    )
    return _job(c, args, JobKind.DEPLOY, args.image, cloud_init=seed)


def erase(c: Client, args: argparse.Namespace) -> int:
    return _job(c, args, JobKind.ERASE, erase_mode=EraseMode(args.mode))


def verify(c: Client, args: argparse.Namespace) -> int:
    return _job(c, args, JobKind.VERIFY, args.image)


def reboot(c: Client, args: argparse.Namespace) -> int:
    return _job(c, args, JobKind.REBOOT, power=PowerAction.POWEROFF if args.poweroff else PowerAction.REBOOT)


def jobs(c: Client, args: argparse.Namespace) -> int:
    query = {
        k: v for k, v in (("machine", args.machine), ("state", args.state), ("limit", str(args.limit))) if v
    }
    reply = c.call("GET", "/v1/jobs?" + urllib.parse.urlencode(query))
    rows = [
        (j.id, j.machine_id, j.kind, j.state, j.attempts, progress(j), ago(j.updated_at), j.reason)
        for j in views.JobList.from_wire(reply).jobs
    ]
    return emit(
        args,
        reply["jobs"],
        table(rows, ("JOB", "MACHINE", "KIND", "STATE", "TRIES", "PROGRESS", "UPDATED", "REASON")),
    )


def cancel(c: Client, args: argparse.Namespace) -> int:
    reply = c.call("POST", f"/v1/jobs/{urllib.parse.quote(args.job, safe='')}/cancel")
    job = views.JobView.from_wire(reply)
    return emit(args, reply, f"{job.id}: {job.state}")


def events(c: Client, args: argparse.Namespace) -> int:
    reply = c.call("GET", f"/v1/jobs/{urllib.parse.quote(args.job, safe='')}")
    job = views.JobDetail.from_wire(reply)
    if args.follow:
        return wait_for(c, args, job.id)
    return emit(args, reply["events"], "\n".join(event_line(e) for e in job.events))


def watch(c: Client, args: argparse.Namespace) -> int:
    path = "/v1/events/stream" + (f"?job={urllib.parse.quote(args.job)}" if args.job else "")
    for e in c.stream(path):
        print(json.dumps(e) if args.json else event_line(views.EventView.from_wire(e)), flush=True)
    return 0


_COMMANDS = {
    "machines": machines,
    "machine": machine,
    "images": images,
    "deploy": deploy,
    "erase": erase,
    "verify": verify,
    "reboot": reboot,
    "jobs": jobs,
    "cancel": cancel,
    "events": events,
    "logs": events,
    "watch": watch,
    "power": power_cli.power,
}
