"""The measured footprint report (schema compress-report/2), `compress report` and `compress compare`.

Every reported figure is checked against an independent computation in the test: file sizes from
os.stat, gzip/zstd sizes by compressing the files here, parameter counts from the ONNX graph with
onnx.numpy_helper, accuracy re-measured in onnxruntime, MACs by hand for LeNet-300-100 on 8x8.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import models
from compressor import checkpoint
from compressor.data import load_dataset
from exporters import measure, report as reporting

LENET_MACS = 64 * 300 + 300 * 100 + 100 * 10
LENET_PARAMS = 64 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
DEAD = 60  # fc1 neurons the sparse checkpoint zeroes (physically removed at export)
FLOAT = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE}

# The golden structure of compress-report/2: changing it needs a schema bump and docs/report.md.
GOLDEN = {
    "": ["schema", "created", "command", "versions", "model", "method", "data", "training", "physical_removal",
         "size", "layers", "compute", "runtime", "quality", "timings", "null_reasons"],
    "model": ["name", "source", "input_shape", "num_classes"],
    "method": ["name", "settings"],
    "data": ["spec", "name", "seed", "train_size", "val_size", "test_size", "test_fingerprint"],
    "training": ["config", "epochs", "best_epoch", "stopped_because", "wall_seconds", "history"],
    "size": ["file_bytes", "files", "gzip9_bytes", "zstd19_bytes", "opset", "encoding", "runtime_sparse",
             "tensor_encodings", "decode_ops_after_load", "params_original", "dense_fp32_bytes_original",
             "params_total", "dense_fp32_bytes", "params_nonzero", "remaining_fraction", "prunable_sparsity",
             "params_source", "onnx"],
    "size.onnx": ["stored_float_elements", "stored_float_nonzero", "stored_constant_bytes",
                  "runtime_float_elements", "runtime_float_nonzero", "runtime_constant_bytes"],
    "compute": ["macs_original", "macs_exported", "macs_nonzero_weights", "onnx_graph_macs",
                "onnx_graph_macs_nonzero_weights", "source"],
    "runtime": ["process", "platform", "session_options", "create_seconds", "memory", "latency"],
    "runtime.latency": ["b1", "b64"],
    "runtime.memory": ["source", "hwm_reset_before_create", "process_rss_bytes_before_runtime",
                       "runtime_init_rss_delta_bytes", "baseline_rss_bytes", "session_rss_delta_bytes",
                       "session_peak_delta_bytes", "first_run_batch", "first_run_rss_delta_bytes",
                       "first_run_peak_delta_bytes", "after_latency_rss_delta_bytes", "trimmed_rss_delta_bytes"],
    "quality": ["onnx_test_accuracy", "torch_test_accuracy", "val_accuracy", "max_abs_diff", "parity_tolerance",
                "parity_samples", "baseline"],
    "timings": ["load_s", "train_s", "prune_s", "shrink_s", "export_s", "measure_s"],
}
GOLDEN_LAYER = ["name", "type", "shape_before", "shape_after", "params_before", "params", "nonzero", "remaining_fraction",
                "format", "tensors", "encoded_bytes", "dense_bytes_before", "dense_bytes", "bytes_vs_dense", "note"]
KINDS = ["dense", "sparse", "external-torch", "external-ours"]


# -- fixtures: three exports and four reports, made once ----------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, digits) -> dict:
    """A dense digits run, a sparse export (checkpoint with zeroed weights and dead neurons), a model
    exported by plain torch.onnx.export, and `compress report` on it and on the sparse export."""
    from compressor.cli import main

    d = tmp_path_factory.mktemp("report")
    main(["lenet300", "--method", "none", "--data", "digits", "--epochs", "2", "--out", str(d / "dense.onnx"),
          "--save-checkpoint", str(d / "dense.pt"), "-q"])

    # Sparse, with fixed patterns so exactly DEAD neurons die whatever the trained values: fc1 keeps
    # every 10th weight of each row (90 % zero), its first DEAD neurons are dead (row and bias);
    # fc2 is a checkerboard (half zero, no row or column empty).
    model = models.build("lenet300", (1, 8, 8), 10)
    model.load_state_dict(torch.load(d / "dense.pt", weights_only=True)["state_dict"])
    with torch.no_grad():
        rows, cols = torch.meshgrid(torch.arange(300), torch.arange(64), indexing="ij")
        model.fc1.weight[(cols - rows) % 10 != 0] = 0
        model.fc1.weight[:DEAD] = 0
        model.fc1.bias[:DEAD] = 0
        rows, cols = torch.meshgrid(torch.arange(100), torch.arange(300), indexing="ij")
        model.fc2.weight[(rows + cols) % 2 == 0] = 0
    checkpoint.save_model(d / "sparse.pt", model, arch="lenet300", input_shape=(1, 8, 8), num_classes=10)
    main([str(d / "sparse.pt"), "--method", "none", "--epochs", "0", "--data", "digits", "--out", str(d / "sparse.onnx"),
          "--baseline-report", str(d / "dense.report.json"), "-q"])

    # A model this tool did not write: plain torch.onnx.export (static batch of 1).
    plain = models.build("lenet300", (1, 8, 8), 10).eval()
    plain.load_state_dict(torch.load(d / "dense.pt", weights_only=True)["state_dict"])
    torch.onnx.export(plain, (digits.test.x[:1],), str(d / "plain.onnx"), dynamo=True, verbose=False)
    main(["report", str(d / "plain.onnx"), "--data", "digits"])
    main(["report", str(d / "sparse.onnx"), "--data", "digits", "--out", str(d / "sparse-ext.report.json")])

    paths = {"dense": d / "dense.report.json", "sparse": d / "sparse.report.json",
             "external-torch": d / "plain.report.json", "external-ours": d / "sparse-ext.report.json"}
    onnx_files = {"dense": d / "dense.onnx", "sparse": d / "sparse.onnx", "external-torch": d / "plain.onnx",
                  "external-ours": d / "sparse.onnx"}
    return {"dir": d, "sparse_model": model, "paths": paths, "onnx": onnx_files,
            "reports": {k: json.loads(p.read_text()) for k, p in paths.items()}}


def _get(r: dict, path: str):
    cur = r
    for part in path.split(".") if path else []:
        cur = cur[part]
    return cur


def _dense_equivalent(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters, non-zeros) of the sparse model after the DEAD fc1 neurons are removed."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    keep = torch.ones(300, dtype=torch.bool)
    keep[:DEAD] = False
    sd["fc1.weight"], sd["fc1.bias"], sd["fc2.weight"] = sd["fc1.weight"][keep], sd["fc1.bias"][keep], sd["fc2.weight"][:, keep]
    return sum(v.numel() for v in sd.values()), sum(int(torch.count_nonzero(v)) for v in sd.values())


# -- schema --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_schema_has_the_golden_keys(runs: dict, kind: str) -> None:
    r = runs["reports"][kind]
    assert r["schema"] == "compress-report/2"
    for section, keys in GOLDEN.items():
        try:
            value = _get(r, section)
        except TypeError:  # inside a null section
            value = None
        if value is None:
            allowed = {"training"} if kind.startswith("external") else set()
            if not Path("/proc/self/status").exists():
                allowed.add("runtime.memory")
            assert section in allowed, f"{kind}: {section} is null"
            continue
        assert list(value) == keys, f"{kind}: {section or 'top level'} keys changed"
    assert r["layers"], kind
    for layer in r["layers"]:
        assert list(layer) == GOLDEN_LAYER
    assert {k: v for k, v in reporting.REQUIRED_KEYS.items() if k != "layers[]"} == \
        {k: tuple(v) for k, v in GOLDEN.items() if k != "runtime.memory"}
    assert reporting.REQUIRED_KEYS["layers[]"] == tuple(GOLDEN_LAYER)
    assert tuple(GOLDEN["runtime.memory"]) == reporting.MEMORY_KEYS


@pytest.mark.parametrize("kind", KINDS)
def test_every_null_says_why(runs: dict, kind: str) -> None:
    r = runs["reports"][kind]
    reasons = r["null_reasons"]
    for section, keys in GOLDEN.items():
        try:
            value = _get(r, section)
        except (KeyError, TypeError):
            value = None
        if value is None:
            assert any(section == k or section.startswith(k + ".") for k in reasons), f"{kind}: {section} is null without a reason"
            continue
        for key in keys:
            if value[key] is None:
                path = f"{section}.{key}" if section else key
                assert any(path == k or path.startswith(k + ".") for k in reasons), f"{kind}: {path} is null without a reason"
    for path in reasons:  # and every reason is about a field that is null (or a caveat on one)
        if path != "runtime.memory.hwm_reset_before_create":
            assert reporting.get(r, path) is None, f"{kind}: {path} has a null reason but a value"


# -- size ------------------------------------------------------------------------------------------


def _files(onnx_path: Path) -> list[Path]:
    sidecars = [p for p in onnx_path.parent.iterdir() if p.name.startswith(onnx_path.name + ".") and not p.name.endswith(".tmp")]
    return [onnx_path, *sorted(sidecars)]


@pytest.mark.parametrize("kind", KINDS)
def test_file_and_compressed_bytes(runs: dict, kind: str) -> None:
    import zstandard

    r, path = runs["reports"][kind], runs["onnx"][kind]
    files = _files(path)
    assert r["size"]["files"] == [f.name for f in files]
    assert r["size"]["file_bytes"] == sum(os.stat(f).st_size for f in files)
    blobs = [f.read_bytes() for f in files]
    assert r["size"]["gzip9_bytes"] == sum(len(gzip.compress(b, compresslevel=9, mtime=0)) for b in blobs)
    assert r["size"]["zstd19_bytes"] == sum(len(zstandard.ZstdCompressor(level=19).compress(b)) for b in blobs)
    if kind == "external-torch":
        assert len(files) == 2  # torch's exporter writes a .data sidecar; it is counted


@pytest.mark.parametrize("kind", KINDS)
def test_parameters_counted_from_the_onnx_graph(runs: dict, kind: str) -> None:
    r, proto = runs["reports"][kind], onnx.load(str(runs["onnx"][kind]))
    elements = nonzero = 0
    for t in proto.graph.initializer:
        if t.data_type in FLOAT:
            a = numpy_helper.to_array(t)
            elements, nonzero = elements + a.size, nonzero + int(np.count_nonzero(a))
    for node in proto.graph.node:  # COO sparse constants count their dense shape
        for a in node.attribute:
            if node.op_type == "Constant" and a.type == onnx.AttributeProto.SPARSE_TENSOR:
                elements += int(np.prod(a.sparse_tensor.dims))
                nonzero += int(np.count_nonzero(numpy_helper.to_array(a.sparse_tensor.values)))
    onnx_sizes = r["size"]["onnx"]
    assert (onnx_sizes["stored_float_elements"], onnx_sizes["stored_float_nonzero"]) == (elements, nonzero)
    if kind in ("dense", "external-torch"):
        assert elements == LENET_PARAMS
        want = (elements, nonzero)
    else:
        want = _dense_equivalent(runs["sparse_model"])
        assert elements < want[0]  # stored compactly
    # what onnxruntime materialises: the dense layers (decode subgraphs folded)
    assert (onnx_sizes["runtime_float_elements"], onnx_sizes["runtime_float_nonzero"]) == want
    assert (r["size"]["params_total"], r["size"]["params_nonzero"]) == want
    assert r["size"]["dense_fp32_bytes"] == 4 * want[0]


def test_sparse_size_fields_and_layer_table(runs: dict) -> None:
    r = runs["reports"]["sparse"]
    model = runs["sparse_model"]
    size = r["size"]
    assert size["params_original"] == LENET_PARAMS and size["dense_fp32_bytes_original"] == 4 * LENET_PARAMS
    total, nonzero = _dense_equivalent(model)
    assert size["remaining_fraction"] == pytest.approx(nonzero / LENET_PARAMS)
    assert r["physical_removal"]["applied"]
    layers = {x["name"]: x for x in r["layers"]}
    assert layers["fc1"]["shape_before"] == [300, 64] and layers["fc1"]["shape_after"] == [300 - DEAD, 64]
    assert layers["fc2"]["shape_before"] == [100, 300] and layers["fc2"]["shape_after"] == [100, 300 - DEAD]
    assert layers["fc3"]["shape_after"] == [10, 100]
    removal = {x["name"]: x for x in r["physical_removal"]["layers"]}
    for name in ("fc1", "fc2"):
        assert removal[name]["before"] == layers[name]["shape_before"] and removal[name]["after"] == layers[name]["shape_after"]
    assert layers["fc1"]["nonzero"] == int(torch.count_nonzero(model.fc1.weight)) + int(torch.count_nonzero(model.fc1.bias))
    assert layers["fc1"]["params_before"] == 64 * 300 + 300 and layers["fc1"]["dense_bytes_before"] == 4 * (64 * 300 + 300)
    # stored bytes: recomputed from the file's initializers (decode buffers of the weight + the dense bias)
    proto = onnx.load(str(runs["onnx"]["sparse"]))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    fc1_bytes = sum(a.nbytes for n, a in inits.items() if n.startswith("decode/fc1.weight/")) + inits["fc1.bias"].nbytes
    assert layers["fc1"]["format"] in ("bitmask", "csr", "rel", "coo")
    assert layers["fc1"]["encoded_bytes"] == fc1_bytes
    assert layers["fc1"]["bytes_vs_dense"] == pytest.approx(fc1_bytes / (4 * (64 * 300 + 300)))
    assert layers["fc3"]["format"] == "dense" and layers["fc3"]["encoded_bytes"] == 4 * (100 * 10 + 10)
    enc = {e["name"]: e for e in size["tensor_encodings"]}
    assert enc["fc1.weight"]["format"] == layers["fc1"]["format"]


# -- compute -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_macs_hand_computed(runs: dict, kind: str) -> None:
    c = runs["reports"][kind]["compute"]
    model = runs["sparse_model"]
    if kind in ("dense", "external-torch"):
        exported = nonzero_only = LENET_MACS
    else:
        keep = 300 - DEAD
        exported = 64 * keep + keep * 100 + 100 * 10
        # Linear: each non-zero weight is one multiply-accumulate per sample; the dead neurons'
        # outgoing weights (fc2 columns) are removed with them
        nonzero_only = (int(torch.count_nonzero(model.fc1.weight)) + int(torch.count_nonzero(model.fc2.weight[:, DEAD:]))
                        + int(torch.count_nonzero(model.fc3.weight)))
    assert c["macs_exported"] == exported and c["onnx_graph_macs"] == exported
    assert c["macs_nonzero_weights"] == nonzero_only and c["onnx_graph_macs_nonzero_weights"] == nonzero_only
    assert c["macs_original"] == (None if kind.startswith("external") else LENET_MACS)


# -- runtime -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_runtime_memory_and_latency(runs: dict, kind: str) -> None:
    rt = runs["reports"][kind]["runtime"]
    assert rt["session_options"]["intra_op_num_threads"] == 1
    assert rt["session_options"]["enable_cpu_mem_arena"] is True and "enable_mem_pattern" in rt["session_options"]
    assert rt["create_seconds"] > 0
    batches = [1] if kind == "external-torch" else [1, 64]  # torch's plain export fixes the batch at 1
    for b in (1, 64):
        lat = rt["latency"][f"b{b}"]
        if b not in batches:
            assert lat is None and "fixed batch of 1" in runs["reports"][kind]["null_reasons"][f"runtime.latency.b{b}"]
            continue
        assert lat["batch"] == b and lat["runs"] >= measure.MIN_RUNS
        assert lat["p90_s"] >= lat["p50_s"] > 0
    if not Path("/proc/self/status").exists():
        assert rt["memory"] is None and runs["reports"][kind]["null_reasons"]["runtime.memory"]
        return
    mem = rt["memory"]
    assert mem["first_run_batch"] == max(batches)
    for key in ("runtime_init_rss_delta_bytes", "baseline_rss_bytes", "session_rss_delta_bytes", "session_peak_delta_bytes",
                "first_run_rss_delta_bytes", "first_run_peak_delta_bytes"):
        assert isinstance(mem[key], int) and mem[key] > 0, key
    assert mem["session_peak_delta_bytes"] >= mem["session_rss_delta_bytes"]
    assert mem["first_run_peak_delta_bytes"] >= mem["first_run_rss_delta_bytes"]
    assert mem["first_run_peak_delta_bytes"] >= mem["session_peak_delta_bytes"]


def test_memory_is_null_with_a_reason_without_proc(monkeypatch: pytest.MonkeyPatch, runs: dict, tmp_path: Path) -> None:
    """On a platform without /proc the child reports no memory figure, never a made-up one."""
    monkeypatch.setattr(measure, "_status", lambda: None)
    monkeypatch.setattr(measure, "BUDGET_S", 0.01)
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((4, 1, 8, 8), np.float32))
    got = measure.child(str(runs["onnx"]["dense"]), str(x), [1], 1)
    assert got["memory"] is None and "memory is not measured" in got["memory_unavailable"]
    assert got["latency"]["b1"]["p50_s"] > 0


def test_measuring_process_imports_no_torch(runs: dict, tmp_path: Path) -> None:
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((2, 1, 8, 8), np.float32))
    code = ("import runpy, sys; sys.argv = ['m', sys.argv[1], '--inputs', sys.argv[2], '--batches', '1'];"
            "import exporters.measure as m; m.BUDGET_S = 0.01; m.main(sys.argv[1:]); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(runs["onnx"]["dense"]), str(x)], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], check=True).stdout.split()
    assert out[-1] == "False"


# -- quality -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_onnx_accuracy_recomputed(runs: dict, kind: str, digits) -> None:
    sess = ort.InferenceSession(str(runs["onnx"][kind]), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    x = digits.test.x.numpy()
    logits = np.concatenate([sess.run(None, {name: x[i: i + 1]})[0] for i in range(len(x))])
    accuracy = float((logits.argmax(1) == digits.test.y.numpy()).mean())
    q = runs["reports"][kind]["quality"]
    assert q["onnx_test_accuracy"] == pytest.approx(accuracy)
    if kind.startswith("external"):
        assert q["torch_test_accuracy"] is None and q["max_abs_diff"] is None
    else:
        assert q["torch_test_accuracy"] == pytest.approx(accuracy, abs=1 / len(x) + 1e-9)
        assert q["max_abs_diff"] <= q["parity_tolerance"]


def test_baseline_report_is_copied_in(runs: dict) -> None:
    dense, sparse = runs["reports"]["dense"], runs["reports"]["sparse"]
    base = sparse["quality"]["baseline"]
    assert base["method"] == "none" and base["report"] == str(runs["paths"]["dense"])
    assert base["onnx_test_accuracy"] == dense["quality"]["onnx_test_accuracy"]
    assert base["file_bytes"] == dense["size"]["file_bytes"] and base["gzip9_bytes"] == dense["size"]["gzip9_bytes"]
    assert base["onnx_test_accuracy_delta"] == pytest.approx(sparse["quality"]["onnx_test_accuracy"] - base["onnx_test_accuracy"])
    assert dense["quality"]["baseline"] is None


def test_baseline_report_on_another_test_set_is_refused(runs: dict, run_cli, tmp_path: Path) -> None:
    other = dict(runs["reports"]["dense"], data=dict(runs["reports"]["dense"]["data"], test_fingerprint="0" * 16))
    path = tmp_path / "other.report.json"
    path.write_text(json.dumps(other))
    res = run_cli(str(runs["dir"] / "sparse.pt"), "--method", "none", "--epochs", "0", "--data", "digits",
                  "--out", str(tmp_path / "x.onnx"), "--baseline-report", str(path), "-q")
    assert res.code == 2 and "different test set" in res.err and not (tmp_path / "x.onnx").exists()


def test_external_report_agrees_with_the_pipeline_on_the_same_file(runs: dict) -> None:
    ours, ext = runs["reports"]["sparse"], runs["reports"]["external-ours"]
    for path in ("size.file_bytes", "size.gzip9_bytes", "size.zstd19_bytes", "size.params_total", "size.params_nonzero",
                 "size.onnx.stored_float_elements", "compute.macs_exported", "compute.macs_nonzero_weights",
                 "quality.onnx_test_accuracy", "data.test_fingerprint"):
        assert reporting.get(ext, path) == reporting.get(ours, path), path
    assert ext["method"]["name"] == "external" and ext["model"]["source"] == "onnx"
    assert [x["format"] for x in ext["layers"]] == [x["format"] for x in ours["layers"]]


# -- history, Markdown and HTML ------------------------------------------------------------------


def test_history_has_errors_per_epoch(runs: dict) -> None:
    history = runs["reports"]["dense"]["training"]["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(0 <= h["val_error"] <= 1 and 0 <= h["test_error"] <= 1 for h in history)


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.figures: dict[str, list[str]] = {}
        self.current: str | None = None
        self.links: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "figure":
            self.current = a.get("id")
            self.figures[self.current] = []
        if tag == "img" and self.current:
            self.figures[self.current].append(a.get("src", ""))
        for key in ("src", "href"):
            if key in a and not a[key].startswith(("data:", "#")):
                self.links.append(a[key])

    def handle_endtag(self, tag: str) -> None:
        if tag == "figure":
            self.current = None


@pytest.mark.parametrize("kind", KINDS)
def test_markdown_and_self_contained_html(runs: dict, kind: str) -> None:
    json_path = runs["paths"][kind]
    md = json_path.with_suffix(".md").read_text()
    r = runs["reports"][kind]
    assert f"{r['size']['file_bytes']:,} bytes" in md and "compress-report/2" in md
    page = _Page()
    page.feed(json_path.with_suffix(".html").read_text())
    page.close()
    want = ["fig-layer-remaining", "fig-layer-bytes"] + (["fig-training"] if kind == "dense" else [])
    assert sorted(page.figures) == sorted(want)
    for fig_id, srcs in page.figures.items():
        assert len(srcs) == 1 and srcs[0].startswith("data:image/png;base64,"), fig_id
        png = base64.b64decode(srcs[0].split(",", 1)[1], validate=True)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000, fig_id
    assert page.links == []  # nothing external
    assert "html" in page.tags and "table" in page.tags


def test_html_renders_in_headless_chromium(runs: dict, tmp_path: Path) -> None:
    browser = next((b for b in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(b).exists()), None)
    if browser is None:
        pytest.skip("no /usr/bin/chromium on this machine: the HTML is only checked with html.parser")
    shot = tmp_path / "page.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}", "--window-size=1200,3000",
                    runs["paths"]["dense"].with_suffix(".html").as_uri()], check=True, capture_output=True, timeout=120)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- compare -------------------------------------------------------------------------------------


def test_compare_reports_of_different_methods(runs: dict, run_cli) -> None:
    paths = [str(runs["paths"][k]) for k in ("dense", "sparse", "external-torch")]
    res = run_cli("compare", *paths)
    assert res.code == 0, res
    labels = [line.split("  ")[0] for line in res.out.splitlines()[1:]]
    assert labels == [label for label, _, _ in reporting.COMPARE_ROWS]
    assert "(none)" in res.out and "(external)" in res.out
    for needle in ("gzip -9 bytes", "MACs / sample", "session RSS delta", "latency p50 batch 1", "latency p50 batch 64"):
        assert needle in res.out
    table = json.loads(run_cli("compare", "--format", "json", *paths).out)
    values = {row["key"]: row for row in table["values"]}
    dense, sparse = runs["reports"]["dense"], runs["reports"]["sparse"]
    fb = values["size.file_bytes"]
    assert fb["values"][:2] == [dense["size"]["file_bytes"], sparse["size"]["file_bytes"]]
    assert fb["vs_first"][1] == pytest.approx(sparse["size"]["file_bytes"] / dense["size"]["file_bytes"])
    acc = values["quality.onnx_test_accuracy"]
    assert acc["vs_first"][1] == pytest.approx(sparse["quality"]["onnx_test_accuracy"] - dense["quality"]["onnx_test_accuracy"])
    assert values["runtime.latency.b64.p50_s"]["values"][2] is None  # fixed batch of 1
    assert table["rows"][0][0] == "ONNX file bytes"
    md = run_cli("compare", "--format", "md", *paths).out
    assert md.startswith("| ") and md.count("\n") == len(reporting.COMPARE_ROWS) + 2


@pytest.mark.parametrize("case", ["schema-versions", "test-sets", "missing-file", "not-json"])
def test_compare_errors_are_one_line(runs: dict, run_cli, tmp_path: Path, case: str) -> None:
    dense = runs["reports"]["dense"]
    other = tmp_path / "other.report.json"
    if case == "schema-versions":
        other.write_text(json.dumps(dict(dense, schema="compress-report/1")))
        fragment = "different schema versions"
    elif case == "test-sets":
        other.write_text(json.dumps(dict(dense, data=dict(dense["data"], test_fingerprint="0" * 16))))
        fragment = "different test sets"
    elif case == "missing-file":
        fragment = "no such report file"
    else:
        other.write_text("not json")
        fragment = "is not a JSON report"
    res = run_cli("compare", str(runs["paths"]["dense"]), str(other))
    lines = res.err.strip().splitlines()
    assert res.code == 2 and len(lines) == 1 and lines[0].startswith("compress: error:") and fragment in lines[0], res.err


# -- `compress report` on bad inputs -------------------------------------------------------------


def _tiny_onnx(path: Path, in_shape: list, out_classes: int = 10, elem: int = TensorProto.FLOAT) -> None:
    """A one-MatMul classifier with the given input shape (Flatten -> MatMul)."""
    features = int(np.prod([d for d in in_shape[1:]]))
    w = numpy_helper.from_array(np.zeros((features, out_classes), np.float32), "w")
    nodes = [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["y"])]
    if elem != TensorProto.FLOAT:
        nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
                 helper.make_node("Flatten", ["xf"], ["f"]), nodes[1]]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", elem, in_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out_classes])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    path.write_bytes(model.SerializeToString())


@pytest.mark.parametrize("case", ["missing-file", "not-onnx", "empty-file", "shape-mismatch", "int-input", "wrong-classes"])
def test_report_bad_inputs_fail_with_one_line(run_cli, tmp_path: Path, case: str) -> None:
    model = tmp_path / "m.onnx"
    fragment = {
        "missing-file": "no such file",
        "not-onnx": "is not an ONNX model",
        "empty-file": "is not an ONNX model",
        "shape-mismatch": "takes [N, 5]; the data digits gives [N, 1, 8, 8] float32",
        "int-input": "is INT64",
        "wrong-classes": "returns [N, 10]",
    }[case]
    if case == "not-onnx":
        model.write_text("hello, this is not a model\n")
    elif case == "empty-file":
        model.write_bytes(b"")
    elif case == "shape-mismatch":
        _tiny_onnx(model, ["N", 5])
    elif case == "int-input":
        _tiny_onnx(model, ["N", 1, 8, 8], elem=TensorProto.INT64)
    elif case == "wrong-classes":
        _tiny_onnx(model, ["N", 1, 8, 8], out_classes=3)
    res = run_cli("report", str(model), "--data", "digits")
    lines = res.err.strip().splitlines()
    assert res.code == 2 and len(lines) == 1 and lines[0].startswith("compress: error:"), res.err
    assert fragment in lines[0], lines[0]
    assert not list(tmp_path.glob("*.report.*"))


def test_report_on_a_tiny_handmade_model_works(run_cli, tmp_path: Path, digits) -> None:
    """A graph that is neither from torch nor from this tool: dynamic batch, MatMul weights."""
    model = tmp_path / "tiny.onnx"
    _tiny_onnx(model, ["N", 1, 8, 8])
    res = run_cli("report", str(model), "--data", "digits", "--out", str(tmp_path / "t.report.json"))
    assert res.code == 0, res
    r = json.loads((tmp_path / "t.report.json").read_text())
    assert r["compute"]["macs_exported"] == 64 * 10 and r["compute"]["macs_nonzero_weights"] == 0
    assert r["size"]["params_total"] == 640 and r["size"]["params_nonzero"] == 0
    assert r["quality"]["onnx_test_accuracy"] == pytest.approx(float((digits.test.y.numpy() == 0).mean()))
    assert "ONNX file bytes" in res.out


def test_round_channels_reaches_physical_removal(runs: dict, run_cli, tmp_path: Path) -> None:
    out = tmp_path / "rounded.onnx"
    res = run_cli(str(runs["dir"] / "sparse.pt"), "--method", "none", "--epochs", "0", "--data", "digits",
                  "--round-channels", "32", "--out", str(out), "-q")
    assert res.code == 0, res
    removal = json.loads((tmp_path / "rounded.report.json").read_text())["physical_removal"]
    assert removal["applied"] and removal["round_channels"] == 32
    fc1 = next(x for x in removal["layers"] if x["name"] == "fc1")
    exact = 300 - DEAD
    assert fc1["after"][0] == min(300, -(-exact // 32) * 32) != exact


def _epochs(*plateaus: tuple[float, int | None]) -> list[dict]:
    """One history row per (sparsity, pruned_now); pruned_now None: not a plateau epoch."""
    return [{"epoch": i + 1, "sparsity": sp, **({} if n is None else {"threshold": 0.01 if n else 0.0, "pruned_now": n})}
            for i, (sp, n) in enumerate(plateaus)]


@pytest.mark.parametrize(
    "method, history, best_epoch, expected",
    [
        ("lobster", _epochs((0.0, None), (0.0, None)), 2, "no validation plateau was reached (the validation loss never went --pwe 5 epochs"),
        ("lobster", _epochs((0.0, None), (0.0, 0), (0.0, 0)), 3, "none of the 2 threshold searches could prune"),
        ("serene", _epochs((0.0, None), (0.4, 9), (0.4, None)), 1, "exceeded the validation error allowance"),
        ("lobster", _epochs((0.0, None), (0.4, 9), (0.4, None)), 3, None),
        ("none", _epochs((0.0, None)), 1, None),
    ],
    ids=["no-plateau", "searches-refused", "all-over-allowance", "pruned", "no-method"],
)
def test_a_run_that_pruned_nothing_says_why_and_what_to_change(method: str, history: list, best_epoch: int,
                                                               expected: str | None) -> None:
    report = {"method": {"name": method, "settings": {"pwe": 5}},
              "training": {"history": history, "best_epoch": best_epoch}}
    warning = reporting.pruning_warning(report)
    assert warning == expected if expected is None else expected in warning


def test_the_nothing_pruned_warning_reaches_the_user(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    res = run_cli("lenet300", "--method", "lobster", "--data", "digits", "--epochs", "2", "--out", str(out), "-q")
    assert res.code == 0, res
    assert "warning: no validation plateau was reached" in res.err
    md = out.with_suffix(".report.md").read_text()
    html_text = out.with_suffix(".report.html").read_text()
    assert "**Warning:** no validation plateau" in md and "<strong>Warning:</strong> no validation plateau" in html_text
