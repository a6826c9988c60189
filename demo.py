"""Try the bot in a minute, offline: ``make demo`` (or ``python demo.py``).

Starts the Webex emulator from the tests on 127.0.0.1, the real bot against it
(app, ledger, workers), sends signed webhooks carrying sample files, and shows
what was saved, what was refused and the replies the bot posted. No token, no
network. Files land in ./demo-output/ (emptied at each run).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
import time
from pathlib import Path

import requests
from werkzeug.serving import make_server

from app import create_app
from config import format_size, load_settings
from jobs import failure_text
from tests.fakewebex import FakeWebex, PatternBody, Reply, webhook_payload
from webex import signature

OUT = Path("demo-output")
SECRET = "demo-webhook-secret"


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    with FakeWebex() as webex:
        settings = load_settings({
            "WEBEX_BOT_TOKEN": webex.token, "WEBEX_WEBHOOK_SECRET": SECRET, "WEBEX_API_URL": webex.api_url,
            "DOWNLOAD_DIR": str(OUT / "downloads"), "DATABASE_URL": f"sqlite:///{OUT / 'bot.sqlite3'}",
            "LOG_LEVEL": "CRITICAL"})  # keep the demo's own output readable
        app = create_app(settings)
        bot = app.extensions["filebot"]
        server = make_server("127.0.0.1", 0, app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        bot.start_workers()
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        hook_url = f"http://127.0.0.1:{server.server_port}/webhook"
        print(f"Webex emulator: {webex.api_url} (fake token, no network)")
        print(f"Bot:            {hook_url}, saving into ./{settings.download_dir}\n")

        report = webex.add_file(PatternBody(48_000, seed=1), name="Quarterly report.pdf",
                                content_type="application/pdf")
        umlaut = webex.add_file(b"Betrag;Datum\n12,50;2026-03-01\n", name=None, content_type="text/csv",
                                headers={"Content-Disposition": "attachment; filename=\"Ueberweisung.csv\"; "
                                         "filename*=UTF-8''%C3%9Cberweisung%20M%C3%A4rz%20%E2%9C%93.csv"})
        scanned = webex.add_file(PatternBody(300_000, seed=2), name="photos.zip", content_type="application/zip")
        webex.script(scanned, Reply(423, {"Retry-After": "1"}), Reply(423, {"Retry-After": "1"}))
        infected = webex.add_file(b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR", name="invoice.exe")
        webex.script(infected, Reply(410))
        sneaky = webex.add_file(b"#!/bin/sh\necho pwned\n", name="../../.bashrc")

        def send(label: str, payload: dict, forged: bool = False) -> None:
            body = json.dumps(payload).encode()
            sig = "0" * 40 if forged else signature(SECRET, body)
            started = time.perf_counter()
            r = requests.post(hook_url, data=body, headers={"X-Spark-Signature": sig,
                                                            "Content-Type": "application/json"}, timeout=5)
            ms = (time.perf_counter() - started) * 1000
            print(f"  {label:<58} -> {r.status_code} {r.json().get('status') or r.json().get('error')}"
                  f" ({ms:.1f} ms)")

        print("Webhooks sent:")
        first = webhook_payload("MSG-1", [report], person_email="alice@example.com", room_id="ROOM-alice")
        send("alice: Quarterly report.pdf", first)
        send("bob: a file named Überweisung März ✓.csv (RFC 5987)",
             webhook_payload("MSG-2", [umlaut], person_email="bob@example.com", room_id="ROOM-bob"))
        send("carol, in a group room: photos.zip (Webex scans it: 423 x2)",
             webhook_payload("MSG-3", [scanned], person_email="carol@example.com", room_id="ROOM-team",
                             room_type="group"))
        send("dave: invoice.exe (Webex flags it infected: 410)",
             webhook_payload("MSG-4", [infected], person_email="dave@example.com", room_id="ROOM-dave"))
        send("erin: a file named ../../.bashrc", webhook_payload("MSG-5", [sneaky], person_email="erin@example.com",
                                                                 room_id="ROOM-erin"))
        send("mallory: a file on another host (token must not go there)",
             webhook_payload("MSG-6", ["https://files.evil.example/steal"], person_email="mallory@example.com",
                             room_id="ROOM-mallory"))
        send("a forged webhook (wrong signature)", webhook_payload("MSG-7", [report]), forged=True)
        send("alice's webhook again (Webex redelivers)", first)

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(webex.posted) < 6:
            time.sleep(0.05)

        rows = bot.ledger.history(limit=100)
        print("\nSaved:")
        for r in sorted((r for r in rows if r["state"] == "saved"), key=lambda r: r["message_id"]):
            path = Path(r["final_path"])
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
            print(f"  {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}"
                  f"  ({format_size(r['size'])}, sha256 {digest}…)")
        print("Refused:")
        for r in sorted((r for r in rows if r["state"] == "failed"), key=lambda r: r["message_id"]):
            print(f"  from {r['person_email']}: {failure_text(r['reason'], r['detail'], settings.max_file_size)}"
                  f" [{r['reason']}]")
        print("Replies the bot posted:")
        for msg in webex.posted:
            thread = " (in thread)" if msg.get("parentId") else ""
            print(f"  to {msg['roomId']}{thread}: " + msg["markdown"].replace("\n", " / "))
        print(f"\nRequests to the emulator: {len(webex.requests)}; the redelivered and forged webhooks "
              "fetched nothing.\nLook around: ls -la demo-output/downloads; "
              "the ledger is demo-output/bot.sqlite3.")
        bot.stop_workers()
        server.shutdown()


if __name__ == "__main__":
    main()
