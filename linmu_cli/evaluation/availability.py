"""Is every dataset a run needs on this machine? One clear error before any model loads, not a `datasets` trace.

lmms-eval loads a task's `dataset_path` with `datasets.load_dataset(path, name, cache_dir=...)` where the cache
is $LMMS_EVAL_DATASETS_CACHE, else $HF_DATASETS_CACHE, else $HF_HOME/datasets (~/.cache/huggingface/datasets).
Video tasks (`dataset_kwargs.video: true`) also need their media unpacked under $HF_HOME/<cache_dir>; lmms-eval
downloads and unzips them there on first use. Without internet both must already be there.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from linmu_cli.errors import LinmuError

LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "pandas", "arrow", "imagefolder", "videofolder"}
_TRUE = {"1", "true", "yes", "on"}


@dataclass
class DatasetNeed:
    task: str
    path: str
    name: str | None
    split: str | None
    kwargs: dict
    yaml_path: str


def hf_home() -> Path:
    return Path(os.path.expanduser(os.environ.get("HF_HOME", "~/.cache/huggingface")))


def datasets_cache_dir() -> Path:
    """The directory lmms-eval passes to `datasets.load_dataset(cache_dir=...)`."""
    explicit = os.environ.get("LMMS_EVAL_DATASETS_CACHE", "").strip()
    if explicit:
        return Path(os.path.expanduser(explicit))
    return Path(os.path.expanduser(os.environ.get("HF_DATASETS_CACHE", str(hf_home() / "datasets"))))


def offline_requested() -> str | None:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return var
    return None


def hub_unreachable_reason(timeout: float = 3.0) -> str | None:
    """None when the Hugging Face Hub answers a TCP connect, else why not (offline variable or network)."""
    var = offline_requested()
    if var:
        return f"{var} is set"
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return None
    except OSError as exc:
        return f"{host} is unreachable ({type(exc).__name__})"


@contextmanager
def offline_hub() -> Iterator[None]:
    """Run `datasets` / `huggingface_hub` in offline mode (cache only, no retries against a dead network)."""
    import datasets.config
    from huggingface_hub import constants

    saved = (constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE)
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = saved


def dataset_needs(task_manager: Any, leaves: list[str]) -> list[DatasetNeed]:
    """The dataset of each leaf task, read from its YAML (includes resolved, `!function`s not imported)."""
    from lmms_eval import utils

    needs = []
    for task in leaves:
        yaml_path = task_manager.task_index[task]["yaml_path"]
        if yaml_path == -1:
            continue
        config = utils.load_yaml_config(yaml_path, mode="simple")
        path = config.get("dataset_path")
        if not isinstance(path, str):
            continue
        needs.append(DatasetNeed(task, path, config.get("dataset_name"), config.get("test_split"),
                                 dict(config.get("dataset_kwargs") or {}), yaml_path))  # fmt: skip
    return needs


def _cached(need: DatasetNeed, cache_dir: Path) -> bool:
    import datasets

    kwargs = {}
    if "revision" in need.kwargs:
        kwargs["revision"] = need.kwargs["revision"]
    try:
        with offline_hub():
            datasets.load_dataset_builder(need.path, need.name, cache_dir=str(cache_dir), **kwargs)
        return True
    except Exception:
        return False


def _fix(need: DatasetNeed, cache_dir: Path) -> str:
    name = f", {need.name!r}" if need.name else ""
    login = " (gated: `hf auth login` first)" if need.kwargs.get("token") else ""
    return (
        f"on a machine with internet{login}, run `linmu eval tiny-qwen2-vl --tasks {need.task} --limit 1` (fetches "
        f'everything lmms-eval needs, videos included) or `python -c "import datasets; '
        f'datasets.load_dataset({need.path!r}{name})"`, then copy the Hugging Face cache '
        f"({hf_home()}; datasets under {cache_dir}) to the same place here (or point HF_HOME / "
        "HF_DATASETS_CACHE at it) and set HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1"
    )


def check_available(task_manager: Any, leaves: list[str]) -> bool:
    """Raise LinmuError naming the first hub dataset that cannot be loaded here; True if the hub must be avoided
    (offline or unreachable) and everything needed is cached."""
    needs = []
    for need in dataset_needs(task_manager, leaves):
        if need.path in LOCAL_BUILDERS:
            _check_local(need)
        elif need.kwargs.get("load_from_disk"):
            if not Path(need.path).exists():
                raise LinmuError(
                    f"task {need.task}: dataset directory {need.path} (load_from_disk) does not exist"
                )
        else:
            needs.append(need)
    if not needs:
        return False
    reason = hub_unreachable_reason()
    if reason is None:
        return False  # online: lmms-eval downloads what is missing
    cache_dir = datasets_cache_dir()
    for need in needs:
        if not _cached(need, cache_dir):
            raise LinmuError(
                f"task {need.task} needs the Hugging Face dataset {need.path}"
                f"{' (' + need.name + ')' if need.name else ''}, which is not in the local cache ({cache_dir}) and "
                f"cannot be downloaded ({reason}). To pre-fetch it: {_fix(need, cache_dir)}"
            )
        if need.kwargs.get("video") and need.kwargs.get("cache_dir"):
            media = hf_home() / str(need.kwargs["cache_dir"])
            if not media.exists():
                raise LinmuError(
                    f"task {need.task} needs the videos of {need.path}, which lmms-eval unpacks under {media}; "
                    f"that directory does not exist and cannot be downloaded ({reason}). To pre-fetch them: "
                    f"{_fix(need, cache_dir)}"
                )
    return True


def _check_local(need: DatasetNeed) -> None:
    files = need.kwargs.get("data_files")
    paths = []
    if isinstance(files, str):
        paths = [files]
    elif isinstance(files, list):
        paths = [f for f in files if isinstance(f, str)]
    elif isinstance(files, dict):
        for value in files.values():
            paths.extend([value] if isinstance(value, str) else [v for v in value if isinstance(v, str)])
    for path in paths:
        if any(ch in path for ch in "*?[") or "://" in path:
            continue
        if not Path(path).exists():
            raise LinmuError(f"task {need.task}: data file {path} does not exist (from {need.yaml_path})")


def _tasks_of(task_dict) -> list:
    """The Task objects of lmms-eval's (nested: groups hold dicts) task dict."""
    out = []
    for value in task_dict.values():
        if isinstance(value, dict):
            out.extend(_tasks_of(value))
        elif isinstance(value, tuple):
            out.extend(v for v in value if hasattr(v, "eval_docs"))
        elif hasattr(value, "eval_docs"):
            out.append(value)
    return out


def _paths(visuals) -> list[str]:
    items = visuals if isinstance(visuals, (list, tuple)) else [visuals]
    flat = []
    for v in items:
        flat.extend(v if isinstance(v, (list, tuple)) else [v])
    paths = []
    for v in flat:
        if isinstance(v, dict) and isinstance(v.get("path"), str) and v.get("bytes") is None:
            v = v["path"]
        if isinstance(v, (str, Path)):
            paths.append(str(v))
    return paths


def check_media(
    task_manager: Any, leaves: list[str], limit: int | float | None, offline: bool = False
) -> None:
    """Every media file the evaluated docs reference exists, or one LinmuError naming the missing ones.

    lmms-eval resolves a doc's media only when the model asks for it: a Video-MME run with one missing video
    loaded the model, answered the others and died in the task's `sys.exit`. Here each task's `doc_to_visual`
    runs over the docs that will be evaluated (the first `limit`) before any model loads; a task whose first doc
    gives in-memory images (MMMU) has nothing on disk to check and is skipped after that doc."""
    from lmms_eval.tasks import get_task_dict

    try:
        with offline_hub() if offline else _nothing():
            task_dict = get_task_dict(leaves, task_manager)
    except (Exception, SystemExit) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise LinmuError(f"lmms-eval could not load the tasks {', '.join(leaves)}: {type(exc).__name__}: "
                         f"{detail[:400]}; --verbose shows its log") from None  # fmt: skip
    for task in _tasks_of(task_dict):
        if not task.config.doc_to_visual:
            continue
        docs = task.eval_docs
        count = len(docs)
        if limit is not None:
            count = min(count, int(limit) if limit >= 1 else int(count * limit))
        name = task.config.task
        missing: list[str] = []
        problems: list[str] = []
        for i in range(count):
            try:
                paths = _paths(task.doc_to_visual(docs[i]))
            except (Exception, SystemExit) as exc:  # videomme: sys.exit("video path:... does not exist")
                problems.append(" ".join(str(exc).split()) or type(exc).__name__)
                continue
            if i == 0 and not paths:
                break
            missing.extend(p for p in paths if not Path(p).exists())
        if missing or problems:
            shown = list(dict.fromkeys(missing)) + problems
            more = f" and {len(shown) - 5} more" if len(shown) > 5 else ""
            raise LinmuError(
                f"task {name}: {len(shown)} of the media files its {count} doc(s) need are missing or unreadable: "
                f"{'; '.join(shown[:5])}{more}. Unpack the dataset's media where the task expects them (docs/eval.md, "
                "'Where lmms-eval looks') or lower --limit; nothing was evaluated"
            )


@contextmanager
def _nothing() -> Iterator[None]:
    yield
