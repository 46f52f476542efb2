"""``python -m ddp_train demo``: the real Gradio server, called through Gradio's own client and opened in a
real headless Chromium; its answers checked against ``predict --json``; its one-line failures."""

from __future__ import annotations

import importlib.util
import json
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .helpers import ROOT, assert_ok, clean_env, free_port, run_cli, run_cli_without

URL_LINE = re.compile(r"^ddp_train demo: .* at (http://127\.0\.0\.1:\d+/) ")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1200,900"]


# Every test here runs the CLI in a subprocess, trains (tiny_run) or imports gradio.
pytestmark = pytest.mark.slow


def _gradio_missing() -> str | None:
    """Why the server tests cannot run here, or None (found without importing gradio: collection stays fast)."""
    missing = [name for name in ("gradio", "gradio_client") if importlib.util.find_spec(name) is None]
    return f"{' and '.join(missing)} not installed: pip install -e '.[demo]' (.ci/run installs it)" if missing else None


needs_gradio = pytest.mark.skipif(_gradio_missing() is not None, reason=str(_gradio_missing()))


def _best(run: Path) -> str:
    return str(run / "checkpoints" / "best.pt")


class Server:
    """``python -m ddp_train demo`` in a subprocess; its stdout read line by line in a thread."""

    def __init__(self, checkpoint: str, port: int) -> None:
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "ddp_train", "demo", "--checkpoint", checkpoint,
                                      "--port", str(port), "--device", "cpu"], cwd=ROOT, env=clean_env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stdout: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.stdout.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def wait_for_url(self, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=deadline - time.monotonic())
            except queue.Empty:
                break
            if line is None:
                raise AssertionError(f"demo exited with {self.proc.wait()}: {self.proc.stderr.read()}")
            if match := URL_LINE.match(line):
                return match.group(1)
        raise AssertionError(f"no URL line within {timeout} s; stdout: {''.join(self.stdout)}")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 20) -> tuple[int, str]:
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        self.reader.join(10)
        return code, self.proc.stderr.read()


@pytest.fixture(scope="module")
def server(tiny_run):
    if _gradio_missing():
        pytest.skip(_gradio_missing())
    srv = Server(_best(tiny_run), free_port())
    try:
        srv.url = srv.wait_for_url()
        yield srv
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait()


@pytest.fixture(scope="module")
def test_images(tiny_run, tmp_path_factory):
    """A sample of the run's test split as PNG, and the same pixels in other modes and sizes."""
    from ddp_train.persistence.checkpoint import load_checkpoint
    from ddp_train.config import config_from_dict
    from ddp_train.data import build_splits, load_dataset

    ckpt = load_checkpoint(tiny_run / "checkpoints" / "best.pt")
    cfg = config_from_dict(ckpt["config"])
    test = build_splits(load_dataset(cfg.data), cfg)[2]
    folder = tmp_path_factory.mktemp("demo_images")
    rgb = Image.fromarray(test.source.load(int(test.indices[3])).permute(1, 2, 0).numpy())
    rgb.save(folder / "test3.png")
    rgb.convert("L").resize((50, 40)).save(folder / "gray.png")  # L, not square: converted and resized
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    rgba.resize((64, 64)).save(folder / "rgba.png")
    rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(folder / "palette.png")
    return [str(folder / n) for n in ("test3.png", "gray.png", "rgba.png", "palette.png")]


@needs_gradio
def test_client_answers_equal_predict_json(server, tiny_run, test_images):
    from gradio_client import Client, handle_file

    res = run_cli(["predict", "--checkpoint", _best(tiny_run), "--json", "--top-k", "3", *test_images], timeout=120)
    assert_ok(res)
    expected = json.loads(res.stdout)["results"]
    client = Client(server.url, verbose=False)
    for path, want in zip(test_images, expected):
        got = client.predict(handle_file(path), api_name="/predict")
        top = [(c["label"], c["confidence"]) for c in got["confidences"]]
        assert [name for name, _ in top] == [t["class"] for t in want["top_k"]], (path, got, want)
        assert np.allclose([p for _, p in top], [t["prob"] for t in want["top_k"]], rtol=0, atol=1e-5), (path, got)
        assert got["label"] == want["top_k"][0]["class"]


@needs_gradio
@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="Chromium not installed (apt-get install chromium; .ci/run installs it)")
def test_page_renders_in_headless_chromium(server, tiny_run, tmp_path):
    from ddp_train.persistence.checkpoint import load_checkpoint

    classes = load_checkpoint(tiny_run / "checkpoints" / "best.pt")["dataset"]["classes"]

    def chromium(*args: str) -> subprocess.CompletedProcess:
        profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"  # a fresh, empty one each time
        return subprocess.run(["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                               "--virtual-time-budget=8000", *args, server.url],
                              capture_output=True, text=True, timeout=60)

    net_log = tmp_path / "net.json"
    dom = chromium("--dump-dom", f"--log-net-log={net_log}")
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    # Everything the page itself asked for (fonts, scripts, styles, API calls) came from the demo server:
    # no CDN, no web fonts. Chromium's own background requests have no page initiator and are not counted.
    log = json.loads(net_log.read_text())
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    origin = server.url.rstrip("/")
    asked = [e["params"]["url"] for e in log["events"]
             if e["type"] == start_job and e.get("params", {}).get("initiator") == origin]
    assert len(asked) > 10 and all(url.startswith(origin + "/") for url in asked), sorted(set(asked))
    assert 'data-testid="image"' in page and 'type="file"' in page, page[-2000:]  # the image input
    listed = re.search(r"<p id=\"classes\">classes: ([^<]*)</p>", page)
    assert listed and listed.group(1).split(", ") == classes, page[-2000:]
    assert "test accuracy" in page and "synthetic" in page
    shot = tmp_path / "page.png"
    res = chromium(f"--screenshot={shot}")
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    with Image.open(shot) as im:
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.shape == (900, 1200, 3)
    # Not blank: text and example thumbnails make many colours and a real spread.
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200 and pixels.std() > 20


@needs_gradio
def test_ctrl_c_stops_cleanly(server):
    code, stderr = server.stop(signal.SIGINT)
    assert code == 0, stderr
    assert "Traceback" not in stderr, stderr
    assert server.stdout[-1].startswith("ddp_train demo: stopped (SIGINT)")


def test_without_gradio_says_how_to_install_it(tiny_run):
    res = run_cli_without("gradio", ["demo", "--checkpoint", _best(tiny_run), "--port", str(free_port())])
    assert res.returncode == 2 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "demo needs gradio" in lines[0] and "pip install 'ddp_train[demo]'" in lines[0], \
        res.stderr


def test_bad_checkpoint_gets_predict_s_one_line_errors(tmp_path, capsys):
    from ddp_train.commands import predict

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint\n" * 10)
    png = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(png)
    bad = [str(tmp_path / "missing.pt"), str(garbage)]
    demos = [subprocess.Popen([sys.executable, "-m", "ddp_train", "demo", "--checkpoint", ckpt, "--port",
                               str(free_port())], cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for ckpt in bad]
    for ckpt, proc in zip(bad, demos):
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 2 and stdout == "" and len(stderr.strip().splitlines()) == 1, stderr
        assert stderr.startswith("ddp_train: error: --checkpoint: ") and ckpt in stderr
        assert predict.main(["--checkpoint", ckpt, str(png)]) == 2  # predict's own entry point, in this process
        assert stderr == capsys.readouterr().err  # the same line


def test_port_in_use_is_one_line(tiny_run):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = run_cli(["demo", "--checkpoint", _best(tiny_run), "--port", str(port)], timeout=120)
    assert res.returncode == 2 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and f"port {port} on 127.0.0.1 is in use" in lines[0], res.stderr


@needs_gradio
def test_gradio_s_own_port_error_is_one_line(monkeypatch):
    """The port taken between the check and the launch: Gradio's OSError becomes the same kind of line."""
    import gradio as gr

    from ddp_train.config import UserError
    from ddp_train.commands.demo import serve

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    with gr.Blocks(analytics_enabled=False) as page:
        gr.HTML("x")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(UserError, match=rf"^cannot serve on 127\.0\.0\.1:{port}: Cannot find empty port in "
                                            rf"range: {port}-{port}; pick another with --port N$"):
            serve(page, "127.0.0.1", port, [])
