"""Optional dependencies (extras.py, pyproject's optional-dependencies): each missing one is a
one-line message with its pip line, and the core path (train, predict) imports none of them."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from alexnet.errors import AlexNetError


def hide(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """Make ``import module`` raise ImportError, as when the package is not installed."""
    for name in list(sys.modules):
        if any(name == m or name.startswith(m + ".") for m in modules):
            monkeypatch.delitem(sys.modules, name)
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)  # None in sys.modules: import raises ImportError


def test_figures_without_matplotlib_name_the_plots_extra(monkeypatch):
    from alexnet.tools import visualize

    hide(monkeypatch, "matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg")
    with pytest.raises(AlexNetError, match=r"^drawing figures .* needs matplotlib: pip install 'alexnet\[plots\]'$"):
        visualize.curves_figure({"run": [{"epoch": 1, "train_loss": 1.0}]})
    from alexnet.experiments.common import pyplot

    with pytest.raises(AlexNetError, match=r"pip install 'alexnet\[plots\]'"):
        pyplot()


def test_caffemodel_without_protobuf_names_the_caffe_extra(monkeypatch, tmp_path):
    from alexnet.tools.caffe import read_caffemodel

    hide(monkeypatch, "google.protobuf", "google.protobuf.message")
    path = tmp_path / "bvlc_alexnet.caffemodel"
    path.write_bytes(b"\x00" * 16)
    with pytest.raises(AlexNetError, match=r"needs protobuf: pip install 'alexnet\[caffe\]'$"):
        read_caffemodel(path)


def test_onnx_export_without_onnx_names_the_export_extra(monkeypatch):
    from alexnet.tools import export

    hide(monkeypatch, "onnx", "onnxruntime")
    with pytest.raises(AlexNetError, match=r"^ONNX export needs onnx: pip install 'alexnet\[export\]'$"):
        export._onnx_modules()


# Run in a fresh interpreter so that nothing imported by other tests counts.
CORE_PATH = textwrap.dedent(
    """
    import sys
    from alexnet.cli import main

    train, predict = sys.argv[1:sys.argv.index("--")], sys.argv[sys.argv.index("--") + 1:]
    assert main(train) == 0 and main(predict) == 0
    # What was imported, not what was looked for: torch's compiler probes find_spec("onnx").
    # protobuf comes with tensorboard (core); what must not load is the Caffe reader.
    extras = ("matplotlib", "scipy", "onnx", "onnxruntime", "fastapi", "uvicorn", "multipart", "playwright")
    loaded = sorted({m.split(".")[0] for m in sys.modules} & set(extras))
    assert not loaded and "alexnet.tools.caffe" not in sys.modules, loaded
    """
)


def test_train_and_predict_import_no_extra(tmp_path):
    from conftest import SUBPROCESS_ENV, TINY, write_tree

    data = write_tree(tmp_path / "data", train=4, val=2)
    run = tmp_path / "run"
    train = ["train", "--data", str(data), "--out", str(run), "--epochs", "1", *TINY]
    image = next((data / "val").rglob("*.jpg"))
    predict = ["predict", str(run / "last.pt"), str(image)]
    result = subprocess.run(
        [sys.executable, "-c", CORE_PATH, *train, "--", *predict],
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
