"""``python -m ddp_train demo --checkpoint PATH``: a local web page that classifies images (Gradio).

An image input (upload, paste or drag; any mode and size) and the top-k classes with their
probabilities, computed by ``predict``'s own code path (:class:`ddp_train.predict.Classifier`:
the uploaded file as it arrived -> the training data's reader, :mod:`ddp_train.data.images`, at
the model's channels and size -> the checkpoint's evaluation transform and normalisation ->
softmax), so the page, ``predict`` and training read a file the same way, and an unsupported
mode or a decompression bomb is a one-line error on the page. The
page shows the run's name, dataset, class names and test accuracy (``metrics.json`` in the run
folder, when present) and one example per class from the run's own test split when its data is
on this machine.

Gradio is an optional extra (``pip install 'ddp_train[demo]'``). The server binds to 127.0.0.1
unless ``--host`` says otherwise; analytics and share links are off, and the page loads nothing
from the internet. Ctrl-C (or SIGTERM, SIGUSR1) stops it with exit code 0.
"""

from __future__ import annotations

import errno
import html
import json
import os
import re
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..resilience.signals import StopFlag
from .common import SubcommandParser, add_weights_option, fail
from .evaluate import default_run_dir

INSTALL = "pip install 'ddp_train[demo]' (or: pip install 'gradio>=6')"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_EXAMPLES = 10  # one per class, in class order
# Small images (28x28, 32x32) shown scaled up to the input box, with visible pixels.
CSS = "#image .image-frame, #image .image-frame img {width: 100%; height: 100%; object-fit: contain; " \
      "image-rendering: pixelated}"


def _parser() -> SubcommandParser:
    p = SubcommandParser(
        prog="ddp_train demo",
        usage="python -m ddp_train demo --checkpoint PATH [--port N] [--host 127.0.0.1] [--top-k K] [--device DEVICE] "
              "[--weights trained|ema]",
        description="Serve a web page (Gradio) that classifies uploaded, pasted or dragged images with a trained "
                    "model, exactly as predict does, and shows the run's classes and test accuracy. "
                    f"Needs gradio: {INSTALL}. Ctrl-C stops it.",
        epilog="""examples:
  python -m ddp_train demo --checkpoint runs/demo/checkpoints/best.pt              # http://127.0.0.1:7860/
  python -m ddp_train demo --checkpoint runs/demo/checkpoints/model.pth --port 8000 --top-k 5
  python -m ddp_train demo --checkpoint runs/demo/checkpoints/best.pt --host 0.0.0.0   # reachable from the network""",
    )
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a full checkpoint (checkpoints/best.pt, last.pt, step-*.pt), or model.pth with best.pt "
                        "or last.pt beside it")
    p.add_argument("--port", type=int, default=7860, metavar="N", help="TCP port to serve on (default 7860)")
    p.add_argument("--host", default="127.0.0.1", metavar="ADDR",
                   help="address to bind (default 127.0.0.1: this machine only); 0.0.0.0 serves the page, "
                        "without any login, to everyone who can reach this machine")
    p.add_argument("--top-k", type=int, default=3, metavar="K", help="classes to show (default 3)")
    p.add_argument("--device", default="auto", metavar="DEVICE",
                   help="auto (the first CUDA GPU if there is one, else the CPU), cpu, cuda, cuda:1, ...")
    add_weights_option(p)
    return p


# --------------------------------------------------------------------------- what the page shows


def run_info(trained: Any) -> dict[str, Any]:
    """Run name, dataset, classes and (from ``metrics.json`` in the run folder) the test result."""
    run_dir = default_run_dir(trained.path)
    meta = trained.dataset
    info: dict[str, Any] = {
        "run": str(trained.config.get("run_name") or (run_dir.name if run_dir else trained.path.stem)),
        "dataset": meta.name, "classes": trained.classes,
        "input": f"{meta.channels}x{meta.image_size}x{meta.image_size}",
        "checkpoint": str(trained.path), "step": trained.global_step, "test": None, "weights": trained.kind,
    }
    metrics = run_dir / "metrics.json" if run_dir else None
    if metrics is not None and metrics.is_file():
        try:
            test = json.loads(metrics.read_text()).get("test")
            if isinstance(test, dict) and isinstance(test.get("acc"), (int, float)):
                info["test"] = test
        except (OSError, ValueError) as e:
            print(f"ddp_train: demo: not showing the test accuracy: {metrics} cannot be read ({e})", file=sys.stderr)
    return info


def write_examples(trained: Any, folder: Path, limit: int = MAX_EXAMPLES) -> list[tuple[str, str]]:
    """The first test-split image of each class (up to ``limit``) as PNGs in ``folder``: [(path, class)].

    Reads the run's data as its config describes it (never downloading); raises UserError when
    the data is not here or has no test split.
    """
    import numpy as np

    from ..config import config_from_dict
    from ..data import build_splits, load_dataset

    cfg = config_from_dict(trained.config, ["data.download=false"])
    dataset = load_dataset(cfg.data)
    if list(dataset.classes) != trained.classes:
        raise UserError(f"the data in {cfg.data.root} has other classes than the checkpoint")
    test = build_splits(dataset, cfg)[2]
    if test is None:
        raise UserError(f"{dataset.name} has no test split here")
    labels = np.asarray(test.labels)
    out = []
    for c, name in enumerate(trained.classes[:limit]):
        where = np.flatnonzero(labels == c)
        if not len(where):
            continue
        pixels = test.source.load(int(test.indices[where[0]])).permute(1, 2, 0).numpy()  # HxWxC
        path = folder / f"{len(out):02d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png"
        example_image(pixels).save(path)
        out.append((str(path), name))
    return out


def example_image(pixels: Any) -> Any:
    """A PIL image that the shared reader reads back as ``pixels`` (H x W x C, a test-split sample).

    uint8 pixels are saved as they are; float ones (an image deeper than 8 bits, grey, in 0..1) as
    16-bit grey (I;16), which reads back as value / 65535: the sample to within 1/131070.
    """
    import numpy as np
    from PIL import Image

    if pixels.dtype == np.uint8:
        return Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
    return Image.fromarray(np.round(pixels[:, :, 0].astype(np.float64) * 65535).astype(np.uint16))


def info_html(info: dict[str, Any]) -> str:
    e = html.escape
    test = info["test"]
    if test:
        weights = f", {e(str(test['weights']))} weights" if test.get("weights") else ""
        count = f" on {int(test['count'])} images" if isinstance(test.get("count"), int) else ""
        accuracy = f"<b>test accuracy {100 * float(test['acc']):.2f}%</b>{count}{weights}"
    else:
        accuracy = "test accuracy: not recorded (no metrics.json with a test result beside the checkpoint)"
    step = f", step {info['step']}" if info["step"] is not None else ""
    return (f"<h2>ddp_train demo: {e(info['run'])}</h2>"
            f"<p>dataset <b>{e(info['dataset'])}</b> ({len(info['classes'])} classes, input {info['input']}) "
            f"&middot; {accuracy}<br><code>{e(info['checkpoint'])}</code>{step}, "
            f"{e(str(info.get('weights', 'trained')))} weights</p>"
            f"<p id='classes'>classes: {e(', '.join(info['classes']))}</p>")


def build_page(classifier: Any, info: dict[str, Any], examples: list[tuple[str, str]], k: int) -> Any:
    """The Gradio Blocks: run info, image in, top-k label out, test-split examples."""
    import gradio as gr

    def classify(path: str | None) -> dict[str, float] | None:
        """Top-k classes of one image file, through predict's code path."""
        if path is None:
            return None
        entry = classifier.classify([path], k)[0]
        if "error" in entry:
            raise gr.Error(entry["error"].removeprefix(f"{path}: "))
        return {t["class"]: t["prob"] for t in entry["top_k"]}

    with gr.Blocks(title=f"ddp_train demo: {info['run']}", analytics_enabled=False) as page:
        gr.HTML(info_html(info))
        with gr.Row():
            with gr.Column():
                # type="filepath" with image_mode=None hands over the uploaded file untouched, so the
                # conversion (mode, size) is predict's, not Gradio's.
                image = gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                 label="image (upload, paste or drag)", value=examples[0][0] if examples else None,
                                 height=320, elem_id="image")
            label = gr.Label(num_top_classes=k, label=f"top {k}", elem_id="prediction")
        image.change(classify, image, label, api_name="predict")
        if examples:
            gr.Examples([[p] for p, _ in examples], image, label="one test-split image per class (in class order: "
                        + ", ".join(name for _, name in examples) + ")", cache_examples=False)
            page.load(classify, image, label, api_visibility="private")
    return page


# --------------------------------------------------------------------------- serving


def port_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be served on (in use, bad address), or None."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        return f"--host {host}: not an address of this machine ({e.strerror})"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
        try:
            s.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is in use; pick another with --port N"
            return f"cannot serve on {host}:{port}: {e.strerror or e}"
    return None


def serve(page: Any, host: str, port: int, allowed: list[str]) -> str:
    """Start the server in the background; its URL. Raises UserError when it cannot start."""
    try:
        _, url, _ = page.launch(server_name=host, server_port=port, share=False, inbrowser=False, quiet=True,
                                prevent_thread_lock=True, show_error=True, allowed_paths=allowed, ssr_mode=False,
                                mcp_server=False, pwa=False, enable_monitoring=False, css=CSS)
    except OSError as e:  # Gradio: "Cannot find empty port in range: N-N. ..."
        raise UserError(f"cannot serve on {host}:{port}: {str(e).split('. ')[0]}; pick another with --port N") from None
    return url


def start(args: Any, examples_dir: Path) -> tuple[Any, str]:
    """Load the model, check the port, build and launch the page: (page, the line that gives its URL).

    Raises UserError with the one line to print (bad checkpoint, port in use, no gradio).
    """
    from .predict import Classifier

    classifier = Classifier.load(args.checkpoint, args.device, args.weights)  # predict's checks and messages
    problem = port_problem(args.host, args.port)
    if problem:
        raise UserError(problem)
    # Before Gradio is imported: it reads this once. No telemetry, no version check.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the Hugging Face hub
    try:
        import gradio  # noqa: F401
    except ImportError as e:
        raise UserError(f"demo needs gradio, which is not installed ({e}); install it with: {INSTALL}") from None
    info = run_info(classifier.trained)
    try:
        examples = write_examples(classifier.trained, examples_dir)
    except (UserError, OSError) as e:
        examples = []
        print(f"ddp_train: demo: no examples from the test split ({str(e).splitlines()[0][:200]})",
              file=sys.stderr, flush=True)
    page = build_page(classifier, info, examples, min(args.top_k, len(classifier.classes)))
    url = serve(page, args.host, args.port, [str(examples_dir)])
    where = "this machine only" if args.host in LOOPBACK else \
        f"bound to {args.host}: anyone who can reach this machine on port {args.port} can use it, without login"
    return page, f"ddp_train demo: {info['run']} on {classifier.device} at {url} ({where}"


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.top_k < 1:
        return fail(f"--top-k: expected an integer >= 1, got {args.top_k}")
    if not 0 < args.port < 65536:
        return fail(f"--port: expected 1-65535, got {args.port}")
    began = time.monotonic()
    # Ctrl-C and SIGTERM are recorded from here on (no KeyboardInterrupt, no traceback) and end the
    # wait below; one that arrives during set-up stops the server as soon as it is up.
    with StopFlag() as stop, tempfile.TemporaryDirectory(prefix="ddp_train-demo-") as examples_dir:
        try:
            page, line = start(args, Path(examples_dir))
        except UserError as e:
            return fail(str(e))
        try:
            print(f"{line}; started in {time.monotonic() - began:.1f} s; Ctrl-C stops it)", flush=True)
            while stop.signum is None:
                time.sleep(0.2)
            print(f"ddp_train demo: stopped ({stop.name})", flush=True)
        finally:
            page.close(verbose=False)
    return 0
