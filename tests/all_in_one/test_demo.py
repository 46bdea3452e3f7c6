# `aforo up --demo`, the README's first command: on an empty folder it shows a
# customer going from allowed to warned (a signed webhook) to throttled to blocked,
# and stops cleanly on Ctrl-C. It listens on its fixed ports (8070, 8080, 9090, 8001).
import os

from running_command import Command


def test_the_demo_walks_a_customer_from_allowed_to_blocked(tmp_path):
    demo = Command(["up", "--demo", "--folder", str(tmp_path / "demo")], tmp_path, dict(os.environ))
    try:
        assert "[200, 200, 200, 200, 200] (allowed)" in demo.line_with("5 more requests through the proxy")
        assert "level 0 -> 1" in demo.line_with("webhook (signature verified)")
        throttled = demo.line_with("6 requests at once")
        assert "'200 throttled'" in throttled and "'429'" in throttled
        assert "429 Margin Limit Exceeded, Retry-After" in demo.line_with("blocked requests never reach the API")
        assert not [line for line in demo.output if "stopped early" in line or "Traceback" in line]
    finally:
        status = demo.interrupt()
    assert status == 0, "\n".join(demo.output)
    assert not [line for line in demo.output if "Traceback" in line], "\n".join(demo.output)
