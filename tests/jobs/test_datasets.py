"""The dataset registry (spec strings, --images, digests) and `mmtrace data download`.

The download is exercised only against 127.0.0.1 (a closed port, a tiny http.server started here) and
file:// URLs of the shared copy; nothing here reaches any other address.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import socket
import threading
from pathlib import Path

import pytest

from mmtrace.jobs.cli import main as mmtrace_main
from mmtrace.jobs.datasets import (
    SUBSETS,
    DatasetError,
    default_data_dir,
    parse_image_dirs,
    parse_spec,
    resolve_dataset,
)
from mmtrace.jobs.datasets.cli import add_parser
from mmtrace.jobs.identity import dataset_digest

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "vqa_constraints"  # ../shared beside the repo
needs_data = pytest.mark.skipif(not (DATA / "okvqa.csv").is_file(), reason=f"the shared CSVs are not at {DATA}")


@pytest.fixture(autouse=True)
def _local_only(monkeypatch):
    """No proxy may redirect a 127.0.0.1 request elsewhere."""
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


# ----------------------------------------------------------------------------------------------- specs


def test_parse_vqa_specs(monkeypatch, tmp_path):
    monkeypatch.setenv("MMTRACE_CACHE", str(tmp_path))
    assert parse_spec("vqa-constraints:/d") == ("vqa-constraints", {"root": Path("/d"), "subsets": SUBSETS})
    assert parse_spec("vqa-constraints:rel/dir:okvqa,multimodal_known")[1] == {
        "root": Path("rel/dir"), "subsets": ("okvqa", "multimodal_known")}
    assert parse_spec("vqa-constraints")[1]["root"] == tmp_path / "vqa_constraints" == default_data_dir()
    assert parse_spec("vqa-constraints::multimodal_movies")[1] == {
        "root": tmp_path / "vqa_constraints", "subsets": ("multimodal_movies",)}
    assert parse_spec("vqa-constraints:/a:b/")[1]["root"] == Path("/a:b/")  # a colon in DIR: end it with '/'
    assert parse_spec("vqa-constraints:/d:")[1]["subsets"] == SUBSETS


def test_default_dir_without_cache_env(monkeypatch, tmp_path):
    monkeypatch.delenv("MMTRACE_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_data_dir() == tmp_path / ".cache" / "mmtrace" / "vqa_constraints"


@pytest.mark.parametrize("spec, message", [
    ("vqa-constraints:/d:okvqa,coco", r"unknown VQA-Constraints subset\(s\) \['coco'\]; valid: okvqa, "
                                      r"multimodal_known, multimodal_movies"),
    ("imagenet:/d", r"unknown dataset 'imagenet'; use vqa-constraints"),
    ("organism:big", r"unknown organism variant 'big'"),
])
def test_bad_specs(spec, message):
    with pytest.raises(DatasetError, match=message):
        parse_spec(spec)


@needs_data
def test_resolve_vqa_filters_and_limits():
    got = resolve_dataset(f"vqa-constraints:{DATA}:multimodal_known,multimodal_movies", missing_images="blank")
    assert len(got) == 1204 + 3214 and {s.subset for s in got} == {"multimodal_known", "multimodal_movies"}
    assert len(resolve_dataset(f"vqa-constraints:{DATA}", limit=7)) == 7


def test_resolve_organism_calls_the_organism(monkeypatch):
    import mmtrace.jobs.organism as organism

    calls = []
    monkeypatch.setattr(organism, "organism_samples",
                        lambda kind, limit, version: calls.append((kind, limit, version)) or [])
    for spec in ("organism", "organism:text", "organism:named", "organism:composed", "organism:composed-text"):
        assert resolve_dataset(spec, limit=5) == []
    assert calls == [("visual", 5, None), ("text", 5, None), ("named", 5, None), ("composed", 5, None),
                     ("composed-text", 5, None)]
    calls.clear()
    resolve_dataset("organism", organism=1)  # a plain spec follows the model's organism
    resolve_dataset("organism-v2:text", organism=1)  # a versioned spec wins
    resolve_dataset("organism-v1:named")
    assert calls == [("visual", None, 1), ("text", None, 2), ("named", None, 1)]
    with pytest.raises(DatasetError, match="--images applies to vqa-constraints only"):
        resolve_dataset("organism", images={"okvqa": "/x"})
    with pytest.raises(DatasetError, match="unknown organism 'organism-v9'"):
        resolve_dataset("organism-v9")
    with pytest.raises(DatasetError, match="unknown dataset 'organisms'"):
        resolve_dataset("organisms")


def test_parse_image_dirs():
    assert parse_image_dirs("okvqa=/data/coco, multimodal_known=/data/known") == {
        "okvqa": "/data/coco", "multimodal_known": "/data/known"}
    assert parse_image_dirs("") == {} and parse_image_dirs(None) == {}
    with pytest.raises(DatasetError, match="expected SUBSET=DIR"):
        parse_image_dirs("/data/coco")
    with pytest.raises(DatasetError, match="unknown subset 'coco'; valid: okvqa"):
        parse_image_dirs("coco=/data/coco")
    with pytest.raises(DatasetError, match="twice"):
        parse_image_dirs("okvqa=/a,okvqa=/b")


@needs_data
def test_digest_follows_content():
    a = resolve_dataset(f"vqa-constraints:{DATA}:multimodal_known", limit=20, missing_images="blank")
    b = resolve_dataset(f"vqa-constraints:{DATA}:multimodal_known", limit=20, missing_images="blank")
    assert dataset_digest(a) == dataset_digest(b) and len(dataset_digest(a)) == 64
    assert dataset_digest(a[:-1]) != dataset_digest(a)
    assert dataset_digest(a[::-1]) != dataset_digest(a)
    assert dataset_digest([a[0].with_error("x"), *a[1:]]) != dataset_digest(a)


# -------------------------------------------------------------------------------------------- download


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def http_root(tmp_path):
    """A quiet http.server on 127.0.0.1 serving a folder the test fills; yields (folder, base URL)."""
    root = tmp_path / "served"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_download_error_names_url_and_manual_steps(tmp_path, capsys):
    url = f"http://127.0.0.1:{_closed_port()}/"
    out = tmp_path / "out"
    assert mmtrace_main(["data", "download", "--out", str(out), "--base-url", url, "--timeout", "5"]) == 1
    err = capsys.readouterr().err
    assert f"could not fetch {url}okvqa.csv" in err
    assert "by hand" in err and "github.com/microsoft/MLLMInterpret" in err and str(out) in err
    assert not list(out.glob("*.csv")) and not list(out.glob(".download-*"))


@needs_data
def test_download_from_file_urls(tmp_path, capsys):
    out = tmp_path / "out"
    assert mmtrace_main(["data", "download", "--out", str(out), "--base-url", DATA.as_uri() + "/"]) == 0
    printed = capsys.readouterr().out
    assert "okvqa.csv: 5045 rows, 5035 with the constraint located, 10 flagged" in printed
    assert "multimodal_known.csv: 1204 rows" in printed and "9463 rows in all" in printed
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{s}.csv" for s in SUBSETS)  # no temp files left
    assert (out / "okvqa.csv").read_bytes() == (DATA / "okvqa.csv").read_bytes()


@needs_data
def test_download_over_http_to_default_dir(http_root, monkeypatch, tmp_path, capsys):
    root, url = http_root
    for subset in SUBSETS:
        (root / f"{subset}.csv").write_bytes((DATA / f"{subset}.csv").read_bytes())
    monkeypatch.setenv("MMTRACE_CACHE", str(tmp_path / "cache"))
    assert mmtrace_main(["data", "download", "--base-url", url]) == 0
    assert "multimodal_movies.csv: 3214 rows" in capsys.readouterr().out
    assert len(resolve_dataset("vqa-constraints", missing_images="blank")) == 9463


@needs_data
def test_download_rejects_a_wrong_file_and_keeps_the_old_ones(http_root, tmp_path, capsys):
    root, url = http_root
    for subset in SUBSETS:
        (root / f"{subset}.csv").write_bytes((DATA / f"{subset}.csv").read_bytes())
    (root / "multimodal_movies.csv").write_text("<html>rate limited</html>\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "okvqa.csv").write_text("old\n")
    assert mmtrace_main(["data", "download", "--out", str(out), "--base-url", url]) == 1
    err = capsys.readouterr().err
    assert "not the authors' CSV" in err and "multimodal_movies.csv" in err
    assert (out / "okvqa.csv").read_text() == "old\n" and sorted(p.name for p in out.iterdir()) == ["okvqa.csv"]


def test_download_404_names_the_file(http_root, tmp_path, capsys):
    _, url = http_root
    assert mmtrace_main(["data", "download", "--out", str(tmp_path / "out"), "--base-url", url]) == 1
    assert f"could not fetch {url}okvqa.csv: HTTP 404" in capsys.readouterr().err


def test_add_parser_wires_data_download():
    parser = argparse.ArgumentParser(prog="mmtrace")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "download", "--out", "/x", "--base-url", "http://127.0.0.1:1/"])
    assert args.command == "data" and args.data_command == "download"
    assert args.out == Path("/x") and callable(args.func)
