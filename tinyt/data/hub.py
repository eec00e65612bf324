"""Corpora on the Hugging Face hub, reachable or not.

In: the data config (data.hub_name, data.hub_config) and a split name. Out: that split as a
`datasets.Dataset` (an `IterableDataset` when streaming) with the hub dataset's own columns.

Before `datasets` makes any request, one short TCP connection attempt (`_hub_reachable`) finds
out whether the hub can be reached at all. When it cannot, or HF_HUB_OFFLINE /
HF_DATASETS_OFFLINE say so, the split is read from datasets' cache without a request, and a
split missing there is one TinytError at once, not minutes of retried requests.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tinyt.config import DataConfig
from tinyt.data import files
from tinyt.errors import TinytError


def _hub_label(config: DataConfig, name: str) -> str:
    return (f"hub dataset {config.hub_name}" + (f" ({config.hub_config})" if config.hub_config
                                                else "") + f" split {name!r}")


def _hub_error(label: str, exc: BaseException) -> TinytError:
    return TinytError(f"cannot load {label}: {files._first_line(exc)}. Offline? Point data.dir "
                      "at a folder with the corpus files (e.g. make train "
                      "DATA=../shared/data/multi30k)")


# One TCP connection attempt to the hub, DNS lookup included, must succeed within this many
# seconds, or the hub counts as unreachable and datasets are read from the cache only.
_HUB_PROBE_SECONDS = 4.0


def _hub_address() -> tuple[str, int] | None:
    """(host, port) that a request to the hub endpoint (HF_ENDPOINT, by default
    https://huggingface.co) first connects to: the endpoint itself, or the proxy that the
    environment (HTTPS_PROXY, NO_PROXY, ...) names for it. None if the URL makes no sense."""
    from urllib.parse import urlsplit
    from urllib.request import getproxies, proxy_bypass

    import datasets

    try:
        url = urlsplit(datasets.config.HF_ENDPOINT)
        host = url.hostname or ""
        proxy = getproxies().get(url.scheme)
        if proxy and host and not proxy_bypass(host):
            url = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        port = url.port or {"http": 80, "https": 443}.get(url.scheme, 1080)
    except ValueError:  # a malformed URL or port
        return None
    return (url.hostname, port) if url.hostname else None


def _hub_reachable(timeout: float | None = None) -> bool:
    """Whether one TCP connection to the hub (or its proxy) opens within `timeout` seconds
    (`_HUB_PROBE_SECONDS` by default). A DNS lookup ignores socket timeouts and can hang for
    long, so the attempt runs in a thread that is waited for `timeout` seconds at most. Only a
    connection that cannot even be opened counts as unreachable: whatever happens after it is
    left to `datasets` and its retries."""
    import socket
    import threading

    timeout = _HUB_PROBE_SECONDS if timeout is None else timeout
    address = _hub_address()
    if address is None:
        return True  # nothing to probe: let datasets try, and report its own error
    opened: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection(address, timeout=timeout).close()
            opened.append(True)
        except Exception:  # no DNS answer, no route, refused, timed out
            opened.append(False)

    attempt = threading.Thread(target=connect, name="tinyt-hub-probe", daemon=True)
    attempt.start()
    attempt.join(timeout)
    return bool(opened) and opened[0]


def _hub_offline_requested() -> bool:
    """HF_HUB_OFFLINE or HF_DATASETS_OFFLINE set to a true value (read now, and as
    huggingface_hub and datasets read them when imported)."""
    import datasets
    from huggingface_hub import constants

    def true(name: str) -> bool:
        return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}

    return (true("HF_HUB_OFFLINE") or true("HF_DATASETS_OFFLINE")
            or bool(datasets.config.HF_HUB_OFFLINE) or bool(constants.HF_HUB_OFFLINE))


@contextlib.contextmanager
def _hub_offline_mode() -> Iterator[None]:
    """datasets and huggingface_hub in offline mode for the duration: no request at all, hub
    datasets come from datasets' cache. Both libraries read HF_HUB_OFFLINE/HF_DATASETS_OFFLINE
    into constants when imported, so the constants are switched, and restored afterwards."""
    import datasets
    from huggingface_hub import constants

    saved = (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE,
             constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE,
         constants.HF_HUB_OFFLINE) = saved


def _load_hub_table(config: DataConfig, name: str, cache_dir: Path | None = None,
                    streaming: bool = False) -> Any:
    """The hub split as a `datasets.Dataset` (an `IterableDataset` when streaming).

    Offline — HF_HUB_OFFLINE or HF_DATASETS_OFFLINE set, or no connection to the hub within
    `_HUB_PROBE_SECONDS` — the split is read from datasets' cache without any request, and a
    dataset missing there is reported at once, not after minutes of retried requests."""
    import datasets  # slow to import; only the hub path needs it at this point

    offline = None
    if _hub_offline_requested():
        offline = "offline mode is on (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE)"
    elif not _hub_reachable():
        offline = f"{datasets.config.HF_ENDPOINT} cannot be reached"
    try:
        with _hub_offline_mode() if offline else contextlib.nullcontext():
            return datasets.load_dataset(config.hub_name, config.hub_config, split=name,
                                         cache_dir=None if cache_dir is None else str(cache_dir),
                                         streaming=streaming)
    except Exception as exc:  # network, missing dataset or split: all end the same way
        if offline and isinstance(exc, ConnectionError):  # offline, and not in the cache
            where = cache_dir or datasets.config.HF_DATASETS_CACHE
            exc = ConnectionError(f"{offline} and it is not in the datasets cache ({where})")
        raise _hub_error(_hub_label(config, name), exc) from None
