"""A dead Telegram transport is visible to health checks and `valor doctor` (issue 20).

The status comes from the transport itself: Telethon's real client against the loopback
Telegram loses its network, and ``system_health`` (through a real MCP client) and the doctor
read what the transport wrote to ``telegram/status.json``. A bridge that stopped is not an
outage; a logged-out account alerts at once.
"""

from __future__ import annotations

import json
import time

from servers import load_server
from servers.core.doctor import BROKEN, OFF, OK, check_telegram_connection
from servers.core.health import score_report, transport_status
from servers.core.settings import get_settings
from tests.support import call, configure, wait_until_async
from tests.test_monitoring_health import _report
from tests.test_telegram_service import bot_env, server, transport_for

__all__ = ["bot_env", "server"]  # fixtures shared with the transport tests


def write_status(settings, **fields) -> None:
    status = {
        "connected": False,
        "since": time.time(),
        "last_error": "",
        "reconnects": 0,
        "logged_out": False,
        **fields,
    }
    path = settings.data_dir / "telegram" / "status.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(status))


def doctor_says(settings) -> tuple[str, str]:
    status = check_telegram_connection(settings)
    return status.state, status.detail


def alerts_of(report: dict) -> dict[str, dict]:
    return {alert["metric"]: alert for alert in report["alerts"]}


def transport_alerts_in(settings) -> list:
    """The alerts a health report scored now would carry for the transport."""
    report = _report(
        telegram=transport_status(settings.data_dir),
        telegram_down_alert_seconds=settings.telegram_down_alert_seconds,
    )
    return [a for a in score_report(report).alerts if a.metric.startswith("telegram_")]


async def test_a_lost_connection_alerts_past_the_threshold_and_clears_on_reconnect(
    bot_env, server, monkeypatch
):
    configure(monkeypatch, VALOR_TELEGRAM_DOWN_ALERT_SECONDS="0.5")
    settings = get_settings()
    transport = transport_for(settings, server)
    await transport.start()
    monitoring = load_server("monitoring-tools")
    healthy = (await call(monitoring, "system_health", {})).structured_content
    assert healthy["telegram"]["connected"] and "telegram_down_seconds" not in alerts_of(healthy)

    server.down = True
    transport.reconnect_delays = (0.2,)
    transport.client._sender.lose_network()  # Telethon's retries run out; Valor's watchdog on
    await wait_until_async(lambda: not transport.health.connected, timeout=10)
    await wait_until_async(
        lambda: (transport_status(settings.data_dir).down_seconds or 0) >= 0.5, timeout=10
    )
    report = (await call(monitoring, "system_health", {})).structured_content
    alert = alerts_of(report)["telegram_down_seconds"]
    assert alert["severity"] == "warning" and "unreachable for" in alert["message"]
    assert report["telegram"]["down"] and report["status"] == "degraded"
    state, detail = doctor_says(settings)
    assert state == BROKEN and "unreachable for" in detail

    server.down = False  # the watchdog reconnects: the alert clears
    await wait_until_async(lambda: transport.health.connected, timeout=15)
    report = (await call(monitoring, "system_health", {})).structured_content
    assert "telegram_down_seconds" not in alerts_of(report)
    assert doctor_says(settings)[0] == OK
    await transport.close()
    # a bridge that stopped is not an outage
    assert transport_status(settings.data_dir).stopped
    assert doctor_says(settings) == (
        OK,
        f"the bridge is not running (stopped at {transport_status(settings.data_dir).changed_at})",
    )
    assert not transport_alerts_in(settings)


def test_a_short_drop_is_not_an_alert_and_a_long_one_is_critical(bot_env):
    write_status(bot_env, since=time.time() - 60, last_error="connection lost")
    assert not transport_alerts_in(bot_env)  # under the default 300 s
    write_status(bot_env, since=time.time() - 400, last_error="connection lost")
    [alert] = transport_alerts_in(bot_env)
    assert (alert.metric, alert.severity, alert.threshold) == (
        "telegram_down_seconds",
        "warning",
        300,
    )
    assert alert.message.startswith("Telegram has been unreachable for 6 min")
    write_status(bot_env, since=time.time() - 1300)
    [alert] = transport_alerts_in(bot_env)
    assert (alert.severity, alert.penalty, alert.threshold) == ("critical", 40, 1200)


def test_a_logged_out_account_alerts_at_once(bot_env):
    write_status(bot_env, logged_out=True, last_error="Telegram refused the bot token")
    [alert] = transport_alerts_in(bot_env)
    assert alert.metric == "telegram_logged_out" and alert.severity == "critical"
    assert "valor login" in alert.recommended_action
    state, detail = doctor_says(bot_env)
    assert state == BROKEN and "logged out" in detail


def test_no_bridge_yet_and_an_unreadable_status(bot_env):
    assert transport_status(bot_env.data_dir) is None
    assert doctor_says(bot_env)[0] == OFF
    path = bot_env.data_dir / "telegram" / "status.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{half")
    status = transport_status(bot_env.data_dir)
    assert not status.connected and "unreadable" in status.last_error
