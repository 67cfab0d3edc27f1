"""ImageNet weights on request: 'imagenet' reads the Keras cache, fetches what is missing from a
server (here a local one), checks the hash, and an offline machine stops with one message that
names `segtrain weights fetch`. Nothing here touches the internet."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import threading

import h5py
import keras
import numpy as np
import pytest

from registry import MODELS
from segtrain import cli
from segtrain.errors import SegtrainError
from segtrain.models import pretrained
from tests.models import tiny  # noqa: F401 (registers resnet_tiny)

NAME = "mobilenetv3_small"  # the smallest network with ImageNet weights


@pytest.fixture
def keras_home(tmp_path, monkeypatch):
    """An empty Keras cache."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    return tmp_path / "keras" / "models"


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A random MobileNetV3-Small weights file in the legacy HDF5 layout of keras.applications'
    own files, and the network it came from."""
    from keras.src.legacy.saving import legacy_h5_format

    network = keras.applications.MobileNetV3Small(include_top=False, weights=None, include_preprocessing=False)
    rng = np.random.default_rng(3)
    network.set_weights([rng.normal(size=w.shape).astype(w.dtype) for w in network.get_weights()])
    path = tmp_path_factory.mktemp("served") / pretrained.IMAGENET[NAME].file
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, network)
    return path, network


@pytest.fixture
def server(weights_file):
    """A local HTTP server of the weights file's folder; yields its base URL and the requests."""
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            requests.append(self.path)

    handler = functools.partial(Handler, directory=str(weights_file[0].parent))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", requests
    httpd.shutdown()
    httpd.server_close()


def _serve_from(monkeypatch, base: str, file_hash: str):
    entry = pretrained.IMAGENET[NAME]
    monkeypatch.setitem(pretrained.IMAGENET, NAME,
                        pretrained.Pretrained(entry.file, base + entry.file, file_hash))


def _md5(path) -> str:
    return hashlib.md5(open(path, "rb").read()).hexdigest()


def test_the_table_is_keras_applications_own():
    """Same files and hashes as keras.applications' code downloads itself."""
    from keras.src.applications import convnext, efficientnet_v2, mobilenet_v3, resnet

    for name, entry in pretrained.IMAGENET.items():
        folder, file = entry.url.removeprefix(pretrained.KERAS_APPLICATIONS).split("/")
        assert file == entry.file
        if name.startswith("convnext"):
            assert convnext.BASE_WEIGHTS_PATH == pretrained.KERAS_APPLICATIONS + folder + "/"
            assert convnext.WEIGHTS_HASHES[name][1] == entry.file_hash
        elif name.startswith("efficientnetv2"):
            key = name.split("_")[1]
            assert efficientnet_v2.WEIGHTS_HASHES["-s" if key == "s" else key][1] == entry.file_hash
            assert file == f"efficientnetv2-{key}_notop.h5"
        elif name.startswith("mobilenetv3"):
            assert mobilenet_v3.WEIGHTS_HASHES[f"{name.split('_')[1]}_224_1.0_float"][1] == entry.file_hash
        elif name.startswith("resnet"):
            assert resnet.BASE_WEIGHTS_PATH == pretrained.KERAS_APPLICATIONS + folder + "/"
            assert resnet.WEIGHTS_HASHES[name.replace("_", "")][1] == entry.file_hash
        else:
            assert name == "vgg16" and entry.file_hash == "6d6bbae143d832006294945121d1f1fc"


def test_imagenet_loads_from_a_filled_cache_without_a_download(keras_home, weights_file, monkeypatch, configure):
    keras_home.mkdir(parents=True)
    path, network = weights_file
    os.link(path, keras_home / path.name)
    _serve_from(monkeypatch, "http://127.0.0.1:1/", "0" * 32)  # any download would fail
    configure(f"backbones.{NAME}.weights = 'imagenet'", tiny=False)
    model = MODELS.get("deeplabv3_plus")(num_classes=2, backbone=NAME, aspp_filters=8, low_level_filters=8,
                                         decoder_filters=8)
    backbone = model.get_layer("backbone")
    loaded = {v.path: keras.ops.convert_to_numpy(v) for v in backbone.weights}
    for v in network.weights:
        np.testing.assert_array_equal(loaded[v.path], keras.ops.convert_to_numpy(v), err_msg=v.path)
    assert model.preprocessing == "tf"  # MobileNetV3's ImageNet weights expect [-1, 1] inputs


def test_fetch_downloads_checks_the_hash_and_then_uses_the_cache(keras_home, weights_file, server, monkeypatch,
                                                                  capsys):
    base, requests = server
    _serve_from(monkeypatch, base, _md5(weights_file[0]))
    assert cli.main(["segtrain", "weights", "fetch", NAME]) == 0
    assert (keras_home / weights_file[0].name).read_bytes() == weights_file[0].read_bytes()
    assert "downloaded, hash checked" in capsys.readouterr().out and len(requests) == 1
    assert cli.main(["segtrain", "weights", "fetch", NAME]) == 0
    assert "already cached" in capsys.readouterr().out and len(requests) == 1
    assert cli.main(["segtrain", "weights", "list"]) == 0
    listed = capsys.readouterr().out
    assert f"{NAME:<20} cached " in listed and "convnext_tiny        missing" in listed


def test_a_download_with_the_wrong_hash_leaves_nothing(keras_home, server, monkeypatch, capsys):
    _serve_from(monkeypatch, server[0], "f" * 32)
    assert cli.main(["segtrain", "weights", "fetch", NAME]) == 1
    assert f"cannot download the ImageNet weights of {NAME}" in capsys.readouterr().err
    assert not (keras_home / pretrained.IMAGENET[NAME].file).exists()


def test_an_offline_machine_is_told_to_fetch_on_one_with_internet(keras_home, monkeypatch, configure):
    _serve_from(monkeypatch, "http://127.0.0.1:1/", "0" * 32)  # nothing listens on port 1
    configure(f"backbones.{NAME}.weights = 'imagenet'", tiny=False)
    with pytest.raises(SegtrainError) as e:
        MODELS.get("fcn8s")(num_classes=2, backbone=NAME, fc_filters=8)
    message = str(e.value)
    assert message.startswith(f"backbones.{NAME}.weights='imagenet': {pretrained.IMAGENET[NAME].file} is not in the "
                              f"Keras cache ({keras_home}) and could not be downloaded")
    assert f"run `segtrain weights fetch {NAME}`" in message


def test_bad_names_are_refused_before_any_download(keras_home, capsys, configure):
    assert cli.main(["segtrain", "weights", "fetch", "convnext_tiny", "mobilenet_v3_small"]) == 1
    err = capsys.readouterr().err
    assert "no ImageNet weights of backbone 'mobilenet_v3_small'. Did you mean 'mobilenetv3_small'?" in err
    assert not keras_home.exists()
    assert cli.main(["segtrain", "weights", "fetch"]) == 1
    assert cli.main(["segtrain", "weights", "pull"]) == 1
    assert "takes an action: list or fetch (got 'pull')" in capsys.readouterr().err
    configure("backbones.resnet_tiny.weights = 'imagenet'", tiny=False)
    with pytest.raises(SegtrainError, match=r"segtrain knows no ImageNet weights of 'resnet_tiny'"):
        MODELS.get("deeplabv3")(num_classes=2, backbone="resnet_tiny", aspp_filters=8)
