"""`pyxf serve` as a real subprocess on a free loopback port, for the server tests."""

import signal
import socket
import subprocess
import sys
import time

import httpx
from helpers import child_process_options


STARTUP_TIMEOUT_S = 180
API_KEY = "test-key"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running `pyxf serve ARGS...`; .url is the base URL ("http://127.0.0.1:PORT")."""

    def __init__(self, args, api_key=None, log_path=None, env=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        command = [sys.executable, "-m", "pyxf", "serve", *map(str, args), "--port", str(self.port),
                   "--log-level", "warning"]
        if api_key:
            command += ["--api-key", api_key]
        child = child_process_options()
        child["env"].pop("PYXF_API_KEY", None)
        child["env"].update(env or {})
        self.log = open(log_path, "w+") if log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(command, stdout=self.log, stderr=self.log, **child)
        self._wait_until_healthy()

    def _wait_until_healthy(self):
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"pyxf serve exited with {self.process.returncode}:\n{self.log_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"pyxf serve did not become healthy in {STARTUP_TIMEOUT_S} s:\n{self.log_text()}")

    def log_text(self):
        if self.log is subprocess.DEVNULL:
            return ""
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def headers(self):
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def openai(self, **kwargs):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "none", max_retries=0, **kwargs)

    def async_openai(self, **kwargs):
        import openai

        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "none", max_retries=0, **kwargs)

    def stats(self, model):
        """The engine statistics /health reports for `model`."""
        return httpx.get(f"{self.url}/health", timeout=10).json()["engines"][model]

    def stop(self, sig=signal.SIGTERM, timeout=60):
        """Sends `sig`, waits for the exit; the return code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.log is not subprocess.DEVNULL:
            self.log.close()
        return self.process.returncode
