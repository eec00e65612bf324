"""The hub path offline: an unreachable hub is found out by one short connection attempt, not
by minutes of retried requests; HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are honoured; a dataset
already in datasets' cache loads without the network, and one missing there gives the clear
error line at once. No test here waits on a real timeout: the network is replaced by fakes that
fail (or hang until released) on demand."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

import tinyt.data.hub as data_mod
from tinyt.config import DataConfig
from tinyt.data import load_split, open_corpus, stream_corpus
from tinyt.errors import TinytError

HUB = ("huggingface.co", 443)
ROWS = {
    "train": [{"de": "Ein Hund läuft.", "en": "A dog runs."}, {"de": "Zwei.", "en": "Two."}],
    "validation": [{"de": "Eine Katze.", "en": "A cat."}],
    "test": [{"de": "Drei.", "en": "Three."}],
}
NOT_CACHED = r"not in the datasets cache .*data\.dir"


@pytest.fixture
def hub_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No offline variable set, the default endpoint, no proxy, and an empty datasets cache
    under tmp_path (returned)."""
    import datasets
    import huggingface_hub

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT",
                 "https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy",
                 "ALL_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", "https://huggingface.co")
    cache = tmp_path / "hf-datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


class NetworkDown:
    """Stands in for `socket.create_connection` and `socket.getaddrinfo`: every call is
    recorded and fails as an unplugged machine's would."""

    def __init__(self) -> None:
        self.connects: list[tuple[str, int]] = []
        self.lookups: list[str] = []

    def create_connection(self, address, *args, **kwargs):
        self.connects.append(tuple(address))
        raise OSError(101, "Network is unreachable")

    def getaddrinfo(self, host, *args, **kwargs):
        self.lookups.append(host)
        raise socket.gaierror(-3, "Temporary failure in name resolution")


@pytest.fixture
def network_down(monkeypatch: pytest.MonkeyPatch) -> NetworkDown:
    fake = NetworkDown()
    monkeypatch.setattr(socket, "create_connection", fake.create_connection)
    monkeypatch.setattr(socket, "getaddrinfo", fake.getaddrinfo)
    return fake


@pytest.fixture
def load_modes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bool, bool]]:
    """Each `datasets.load_dataset` call's offline flags (datasets', huggingface_hub's)."""
    import datasets
    import huggingface_hub

    seen: list[tuple[bool, bool]] = []
    real = datasets.load_dataset

    def spy(*args, **kwargs):
        seen.append((datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE))
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    return seen


def cache_hub_dataset(cache: Path, repo_id: str = "bentrevett/multi30k") -> None:
    """Write ROWS into `cache` as `datasets` stores a downloaded hub dataset:
    `NAMESPACE___NAME/default/0.0.0/COMMIT/` with dataset_info.json and NAME-SPLIT.arrow."""
    import datasets
    from datasets.builder import Key

    class HubLike(datasets.GeneratorBasedBuilder):
        def _info(self):
            return datasets.DatasetInfo(features=datasets.Features(
                {"de": datasets.Value("string"), "en": datasets.Value("string")}))

        def _split_generators(self, dl_manager):
            return [datasets.SplitGenerator(name=name, gen_kwargs={"rows": rows})
                    for name, rows in ROWS.items()]

        def _generate_examples(self, rows):
            for i, row in enumerate(rows):
                yield Key(0, i), row

    builder = HubLike(cache_dir=str(cache), dataset_name=repo_id.split("/")[-1], repo_id=repo_id,
                      hash="0123456789abcdef0123456789abcdef01234567")
    builder.download_and_prepare()
    assert (Path(builder.cache_dir) / "dataset_info.json").is_file()


def test_unreachable_hub_gives_the_clear_line_at_once(hub_env, network_down, load_modes):
    import datasets

    pattern = (r"cannot load hub dataset bentrevett/multi30k split 'validation': "
               r"https://huggingface\.co cannot be reached and it is " + NOT_CACHED)
    with pytest.raises(TinytError, match=pattern):
        load_split(DataConfig(), "valid")
    # One connection attempt found the hub unreachable; datasets was then asked in offline
    # mode (no request, so no retries), and the flags were restored afterwards.
    assert network_down.connects == [HUB]
    assert network_down.lookups == []
    assert load_modes == [(True, True)]
    assert datasets.config.HF_HUB_OFFLINE is False


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_offline_variable_with_nothing_cached_gives_the_clear_line(hub_env, network_down,
                                                                   load_modes, monkeypatch,
                                                                   variable):
    # Set after datasets and huggingface_hub were imported: read when loading, all the same.
    monkeypatch.setenv(variable, "1")
    with pytest.raises(TinytError, match=r"bentrevett/multi30k split 'train': offline mode is "
                                         r"on \(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE\) and it is "
                                         + NOT_CACHED):
        load_split(DataConfig(), "train")
    assert network_down.connects == [] and network_down.lookups == []  # not even a probe
    assert load_modes == [(True, True)]


@pytest.mark.parametrize("offline_by", ["unreachable", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_cached_hub_dataset_loads_offline(hub_env, network_down, load_modes, monkeypatch,
                                          tmp_path, offline_by):
    cache_hub_dataset(hub_env)
    if offline_by != "unreachable":
        monkeypatch.setenv(offline_by, "1")

    valid = load_split(DataConfig(), "valid")
    assert (valid.src, valid.tgt) == (["Eine Katze."], ["A cat."])
    corpus = open_corpus(DataConfig(), "train", tmp_path / "run-cache")
    assert corpus.sample(10, 0) == (["Ein Hund läuft.", "Zwei."], ["A dog runs.", "Two."])
    # A stream is read after its load returned, outside offline mode: from the cache still.
    stream = stream_corpus(DataConfig(), "test")
    assert list(stream.pairs()) == [("Drei.", "Three.")]

    assert load_modes == [(True, True)] * 3
    assert network_down.lookups == []
    assert network_down.connects == ([HUB] * 3 if offline_by == "unreachable" else [])


def test_cached_dataset_with_a_missing_split_names_the_split(hub_env, network_down):
    cache_hub_dataset(hub_env)
    with pytest.raises(TinytError, match=r"split 'nope': Unknown split .*data\.dir"):
        load_split(DataConfig(), "nope")


def test_reachable_hub_is_loaded_online(hub_env, monkeypatch, load_modes):
    import datasets

    connects: list[tuple[tuple[str, int], float]] = []

    class Connection:
        def close(self) -> None:
            pass

    def connect(address, timeout=None, *args, **kwargs):
        connects.append((tuple(address), timeout))
        return Connection()

    monkeypatch.setattr(socket, "create_connection", connect)
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: (
        datasets.config.HF_HUB_OFFLINE, kwargs["split"], kwargs["streaming"]))
    assert data_mod._load_hub_table(DataConfig(), "train", streaming=True) == (False, "train",
                                                                               True)
    assert connects == [(HUB, data_mod._HUB_PROBE_SECONDS)]


def test_probe_gives_up_on_a_hanging_lookup(hub_env, monkeypatch):
    # A DNS lookup ignores socket timeouts: the probe must stop waiting regardless. This
    # connection never returns until the test releases it.
    release = threading.Event()

    def hang(address, *args, **kwargs):
        release.wait()
        raise OSError("released")

    monkeypatch.setattr(socket, "create_connection", hang)
    try:
        assert data_mod._hub_reachable(timeout=0.05) is False
    finally:
        release.set()


def test_probe_address_follows_endpoint_and_proxies(hub_env, monkeypatch):
    import datasets

    assert data_mod._hub_address() == HUB
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("https_proxy", "http://proxy.example:3128")
    assert data_mod._hub_address() == ("proxy.example", 3128)
    monkeypatch.setenv("NO_PROXY", "huggingface.co")
    monkeypatch.setenv("no_proxy", "huggingface.co")
    assert data_mod._hub_address() == HUB
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", "http://hub.internal:8080")
    assert data_mod._hub_address() == ("hub.internal", 8080)


def test_this_machines_network(hub_env):
    """The network as it is: skipped where the hub answers; elsewhere (here: no DNS for
    huggingface.co) the clear line comes from the probe, not from retried requests."""
    if data_mod._hub_reachable():
        pytest.skip("the hub is reachable from this machine")
    start = time.monotonic()
    with pytest.raises(TinytError, match=r"https://huggingface\.co cannot be reached and it is "
                                         + NOT_CACHED):
        load_split(DataConfig(), "valid")
    assert time.monotonic() - start < 30  # a guard against hanging, not a speed test
