"""Clear this bot's presence sessions when it shuts down (Python, stdlib only).

Call clear_presence_sessions() from your bot's graceful-shutdown path (a
SIGTERM handler, atexit, your framework's on_shutdown hook). It asks
presence-reaper to clear every session tracked for OWNER and waits (at most
30 s on the daemon's side) for Graph's answers.
"""
import json
import os
import sys
import urllib.request

REAPER = os.environ.get("PRESENCE_REAPER_URL", "http://127.0.0.1:7740")
OWNER = os.environ.get("BOT_OWNER", "my-bot")


def clear_presence_sessions(owner: str = OWNER, timeout: float = 35.0) -> dict:
    req = urllib.request.Request(
        f"{REAPER}/v1/clear-all?wait=true",
        data=json.dumps({"owner": owner}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.load(resp)  # {"cleared": n, "dropped": n, "failed": n, "pending": n}


if __name__ == "__main__":
    counts = clear_presence_sessions()
    print(f"cleared {counts['cleared']}, dropped {counts['dropped']}, "
          f"failed {counts['failed']}, pending {counts['pending']}")
    sys.exit(0 if counts["failed"] == 0 and counts["pending"] == 0 else 1)
