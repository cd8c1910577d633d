"""What the browser tests need besides pytest: Debian's Chromium and a throw-away JupyterLab
server (the steps a person takes in it are in ``pages.py``).

Public names: ``ensure_chromium``, ``CHROMIUM_ARGS``, ``LabServer``, ``copy_tree``.

Lessons written into the code (each one cost a failing run):
- JupyterLab refuses to start as root without ``--allow-root``.
- The server serves a temporary copy of the notebooks, with its own config, runtime, data,
  settings and workspace folders, so autosave never rewrites the course's files.
- The user settings turn off the "Jupyter news?" toast, and ``--LanguageServerManager.autodetect
  =False`` stops jupyter-lsp from calling npm at start-up.
- Chromium is Debian's (``dpkg -L chromium``); Playwright never downloads a browser.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    # On a closed network Chromium's own calls home would hang: make them fail at once.
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
]


def ensure_chromium() -> str:
    """Install Debian's ``chromium`` when ``/usr/bin/chromium`` is absent; return its binary's path.

    The path comes from the package's own file list (``dpkg -L chromium``): the real binary
    ``/usr/lib/chromium/chromium`` rather than the ``/usr/bin`` shell wrapper.
    """
    if not Path("/usr/bin/chromium").exists():
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
        subprocess.run([*sudo, "apt-get", "update"], check=True, env=env)
        subprocess.run([*sudo, "apt-get", "install", "-y", "chromium"], check=True, env=env)
    files = subprocess.run(["dpkg", "-L", "chromium"], capture_output=True, text=True,
                           check=True).stdout.split()
    binaries = [f for f in files if Path(f).name == "chromium" and Path(f).is_file()
                and os.access(f, os.X_OK)]
    if not binaries:
        raise RuntimeError(f"dpkg -L chromium lists no executable named chromium: {files[:20]}")
    binaries.sort(key=lambda f: not f.startswith("/usr/lib/"))  # the real binary first
    return binaries[0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write_user_settings(settings_dir: Path) -> None:
    """Turn off the news toast and the update check, and render every cell (no windowing), so
    what the test looks for is in the page and nothing covers it."""
    settings = {
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings":
            {"fetchNews": "false", "checkForUpdates": False},
        "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    }
    for name, value in settings.items():
        path = settings_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))


class LabServer:
    """A JupyterLab server on 127.0.0.1, a free port and a random token, serving ``root``.

    ``root`` should hold a *copy* of what is served. Extra environment (``COURSE_QUICK=1``)
    reaches every kernel the server starts. ``stop()`` ends the server by its own PID.
    """

    def __init__(self, root: Path, state_dir: Path, extra_env: dict[str, str] | None = None):
        self.root, self.state_dir = Path(root), Path(state_dir)
        self.extra_env = dict(extra_env or {})
        self.port, self.token = _free_port(), secrets.token_hex(16)
        self.proc: subprocess.Popen | None = None
        self.log_path = self.state_dir / "jupyterlab.log"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _env(self) -> dict[str, str]:
        """The server's environment: private Jupyter folders under ``state_dir`` + ``extra_env``."""
        dirs = {name: self.state_dir / name.lower() for name in (
            "JUPYTER_CONFIG_DIR", "JUPYTER_RUNTIME_DIR", "JUPYTER_DATA_DIR",
            "JUPYTERLAB_SETTINGS_DIR", "JUPYTERLAB_WORKSPACES_DIR")}
        for path in dirs.values():
            path.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, **{k: str(v) for k, v in dirs.items()}, **self.extra_env)
        env.pop("JUPYTER_TOKEN", None)
        return env

    def trust(self, notebooks: list[Path]) -> None:
        """Sign notebooks in this server's own notary database (``jupyter trust``), as a
        learner's ``make lab`` does for the course's notebooks."""
        if notebooks:
            subprocess.run([sys.executable, "-m", "jupyter", "trust", *map(str, notebooks)],
                           env=self._env(), check=True, capture_output=True)

    def start(self, timeout: float = 90.0) -> "LabServer":
        env = self._env()
        _write_user_settings(Path(env["JUPYTERLAB_SETTINGS_DIR"]))
        cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser",
               "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}",
               "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
               f"--ServerApp.root_dir={self.root}", "--LanguageServerManager.autodetect=False"]
        if os.geteuid() == 0:
            cmd.append("--allow-root")
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, env=env, cwd=self.root, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited ({self.proc.returncode}):\n{self.log()}")
            try:
                self.api("status")
                return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"JupyterLab not ready after {timeout} s:\n{self.log()}")

    def api(self, path: str):
        url = f"{self.base_url}/api/{path}?token={self.token}"
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.load(response)

    def shutdown_kernels(self) -> None:
        """End every kernel session this server holds (DELETE /api/sessions/<id>)."""
        for session in self.api("sessions"):
            url = f"{self.base_url}/api/sessions/{session['id']}?token={self.token}"
            urllib.request.urlopen(urllib.request.Request(url, method="DELETE"), timeout=30)

    def url(self, notebook: str) -> str:
        return f"{self.base_url}/lab/tree/{notebook}?reset&token={self.token}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        """SIGTERM to the server's PID (it shuts its kernels down), SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


def copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"),
                    dirs_exist_ok=True)
