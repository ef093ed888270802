"""``agent-os log``: read a flight recorder: query it, follow new records, verify its hash chain,
export it. It opens the recorder read-only (no writer lock, no retention), beside the service
writing it.

Records are printed one JSON object a line (``Record.as_dict()``), oldest first. Exit codes: 0;
1 the chain is broken (``--verify``) or the recorder cannot be read; 2 bad usage.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from datetime import datetime, timedelta
from typing import Any, Final

import click

from agent_os.services._process import FiniteRange
from agent_os.services.control_plane_service._options import RECORDER_FORMS, RecorderParam, read_key_file

BROKEN: Final = 1
_AGO: Final = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNITS: Final = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


class SinceParam(click.ParamType[datetime]):
    """``--since``: an ISO 8601 time (naive: local time) or an age: ``30s``, ``10m``, ``2h``, ``7d``."""

    name = "time"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> datetime:
        if isinstance(value, datetime):
            return value
        text = str(value).strip()
        ago = _AGO.fullmatch(text)
        if ago:
            try:
                return datetime.now().astimezone() - timedelta(**{_UNITS[ago[2]]: float(ago[1])})
            except OverflowError:  # an age before the year 1
                self.fail(f"{text!r} reaches back before the year 1", param, ctx)
        try:
            return datetime.fromisoformat(text)
        except ValueError:
            self.fail(f"{text!r} is neither an ISO 8601 time nor an age like 10m, 2h, 7d", param, ctx)


@click.command()
@click.option(
    "--recorder",
    type=RecorderParam(),
    default="sqlite:///flight_recorder.db",
    show_default=True,
    help=f"The recorder to read: {RECORDER_FORMS} (not memory).",
)
@click.option("--agent", "agent_id", default=None, help="Only this agent's records (its id).")
@click.option("--event-type", "event_types", multiple=True, help="Only records of this type (repeatable).")
@click.option(
    "--since", type=SinceParam(), default=None, help="From this time: ISO 8601, or an age (10m, 2h)."
)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the newest N records.")
@click.option("--follow", "-f", is_flag=True, help="Then print new records as they come, until Ctrl-C.")
@click.option(
    "--interval", type=FiniteRange(min=0.01), default=0.5, show_default=True, help="--follow's poll (s)."
)
@click.option("--verify", is_flag=True, help="Check the hash chain instead; exit 1 when it is broken.")
@click.option(
    "--export", "export_format", type=click.Choice(["json", "csv"]), help="Write records to --output."
)
@click.option("--output", type=click.Path(dir_okay=False, writable=True), help="The --export file.")
@click.option(
    "--key-file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="The recorder's encryption key (32 raw bytes or 64 hex) when its records are encrypted.",
)
def main(
    recorder: str,
    agent_id: str | None,
    event_types: tuple[str, ...],
    since: datetime | None,
    limit: int | None,
    follow: bool,
    interval: float,
    verify: bool,
    export_format: str | None,
    output: str | None,
    key_file: str | None,
) -> None:
    """Query a flight recorder (one JSON record a line, oldest first), follow it, verify its
    hash chain (exit 1 when broken) or export it (json or csv)."""
    if (export_format is None) != (output is None):
        raise click.UsageError("--export and --output go together")
    modes = [m for m, on in (("--verify", verify), ("--export", export_format), ("--follow", follow)) if on]
    if len(modes) > 1:
        raise click.UsageError(f"{' and '.join(modes)} cannot be combined")
    if (verify or export_format) and (agent_id or event_types or limit):
        raise click.UsageError(f"{modes[0]} takes the whole recorder (--since for --export), not filters")
    key = None
    if key_file is not None:
        try:
            key = read_key_file(key_file)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="'--key-file'") from None
    with contextlib.suppress(KeyboardInterrupt):  # --follow ends with Ctrl-C
        asyncio.run(
            _run(
                recorder,
                key,
                agent_id,
                list(event_types) or None,
                since,
                limit,
                follow,
                interval,
                verify,
                export_format,
                output,
            )
        )


async def _run(
    spec: str,
    key: bytes | None,
    agent_id: str | None,
    event_types: list[str] | None,
    since: datetime | None,
    limit: int | None,
    follow: bool,
    interval: float,
    verify: bool,
    export_format: str | None,
    output: str | None,
) -> None:
    from agent_os.control_plane.errors import ControlPlaneError
    from agent_os.services.control_plane_service._options import reader_from_spec

    try:
        recorder = reader_from_spec(spec, encryption_key=key)
        async with recorder:
            if verify:
                result = await recorder.verify()
                click.echo(
                    json.dumps(
                        {
                            "ok": result.ok,
                            "checked": result.checked,
                            "first_bad_seq": result.first_bad_seq,
                            "reason": result.reason,
                        }
                    )
                )
                if not result.ok:
                    raise SystemExit(BROKEN)
                return
            if export_format is not None and output is not None:
                count = await recorder.export(export_format, output, start_time=since)  # type: ignore[arg-type]
                click.echo(f"exported {count} records to {output}", err=True)
                return
            records = await recorder.query(event_types, agent_id, start_time=since, limit=limit, order="desc")
            last = None
            for record in reversed(records):
                click.echo(json.dumps(record.as_dict(), ensure_ascii=False, default=str))
                last = record
            while follow:
                await asyncio.sleep(interval)
                start = last.timestamp if last is not None else since
                newer = await recorder.query(event_types, agent_id, start_time=start)
                for record in newer:
                    if last is None or record.seq > last.seq:
                        click.echo(json.dumps(record.as_dict(), ensure_ascii=False, default=str))
                        last = record
    except ControlPlaneError as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from None
