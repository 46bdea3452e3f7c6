# An `aforo` command running in its own process, its output read as it comes, and
# stopped as a user would with Ctrl-C.
import signal
import subprocess
import sys
import threading
import time

WAIT_S = 30.0


class Command:
    def __init__(self, args, cwd, env):
        self.output = []
        self.process = subprocess.Popen([sys.executable, "-m", "control_plane.cli", *args], cwd=cwd, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read_output, daemon=True)
        self._reader.start()

    def _read_output(self):
        for line in self.process.stdout:
            self.output.append(line.rstrip("\n"))

    def line_with(self, text, timeout_s=WAIT_S):
        """The first line of output holding `text`, waiting for it within a bound."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.output):
                if text in line:
                    return line
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"the command never said {text!r}:\n" + "\n".join(self.output))

    def interrupt(self):
        """Ctrl-C (SIGINT), then wait for the exit; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def exit_status(self, timeout_s=WAIT_S):
        """The exit status of a command that ends by itself, with its output read to the end."""
        status = self.process.wait(timeout_s)
        self._reader.join(timeout_s)
        return status
