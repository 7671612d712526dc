"""Sweeps: profile every architecture at every point of a one- or two-field grid, resumably and safely.

The point store (``<out>/points/``) holds one JSON file per finished point, named by the point's key (a
hash of its parameters) and written atomically. Each file records its origin: the code that made it
(mllm-bench version and git commit, ``+dirty`` with local changes) and the device's name. A rerun reuses
a finished point only when its origin is this code and this device, and redoes it otherwise; the
summary says which points were reused and which redone, and why. A point that runs out of memory is
finished too: it is recorded with status ``oom`` (one row, metric ``oom``) and the sweep goes on. Any
other failure is reported and not recorded, so the next run retries it.

Before profiling a point a run claims it with an ``O_EXCL`` marker ``<key>.claim`` holding its pid, so
two runs on one folder never profile the same point; a claim left by a dead process is taken over. The
folder's summary (``results.json``/``.csv``, ``sweep.json``) is built from every finished point of every
grid run into it (``<out>/grids/``). With a SQLite file, each point's rows are stored as the point
finishes, replacing rows of the same point, code and device, and every finished point missing from the
file is backfilled at the start and the end of a run: the file holds each finished point exactly once.

Under a launcher of several processes (torchrun's RANK/WORLD_SIZE, srun's SLURM_PROCID/SLURM_NTASKS) rank r
takes the points with index % world_size == r, on ``cuda:LOCAL_RANK`` where the sweep runs on CUDA (a point's
key keeps ``cuda``, so any number of ranks, or one process, resumes the same store). Each rank writes a start
and a done marker under ``<out>/ranks/<launch>-of-<N>/``; rank 0 waits for the others' done markers (or
their end, or a timeout) and writes the summary from the store, as one process would. A done marker counts
only as this launch's answer: the world size and the rank's share of this grid, after the rank's start marker
of this launch (see :func:`wait_for_ranks`); a marker an earlier launch left in the folder is not merged.

Visual tokens are not a model setting; ``visual_tokens=N`` is mapped to the workload like this:
if N is a multiple of the vision tower's tokens per image (576 for CLIP ViT-L/14-336), the point uses
N / 576 images per sample at the preset's resolution (images adjacent, no text between them);
otherwise N must be a square s², and the point uses one image of s × patch pixels (e.g. 144 → 168 px
with 14-px patches). Anything else is rejected with the nearest valid counts.

``image=WxH`` sets the images' original size (``Workload.image_sizes``): every image of a sample is W px
wide and H px high (``WxH;WxH;...``: one size per image), as ``compare --image-size WxH`` does. The vision
tower keeps its own size (``image_size``); an architecture that cuts images by their size (LLaVA-NeXT's
AnyRes crops, Llama-3.2-Vision's tile grid) takes its visual tokens from it, one that resizes every image
to the tower (LLaVA-1.5) is unchanged. Rows record the sizes in ``image_sizes`` (``672x1008``, ``;`` between images).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib
import itertools
import json
import math
import multiprocessing
import os
import re
import socket
import sqlite3
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mllm_bench.atomic import atomic_write_text
from mllm_bench.choices import VARY_FIELDS as VARY_FIELDS  # re-exported
from mllm_bench.config import ConfigError, VisionConfig
from mllm_bench.config import replace as replace_config
from mllm_bench.conventions import scope_for
from mllm_bench.distributed import Ranks, shard_points
from mllm_bench.environment import device_name, git_commit
from mllm_bench.image_sizes import parse_sizes, sizes_label
from mllm_bench.model import option_value, parse_options
from mllm_bench.presets import LLM_PRESETS, vision_preset
from mllm_bench.registry import get_architecture
from mllm_bench.results import SQLITE_TABLE, concat_rows, json_rows, write_rows
from mllm_bench.workload import Workload

from .rows import pick

ProfileFn = Callable[..., pd.DataFrame | list[dict[str, Any]]]  # rows as a frame or as dicts (json_rows)


def parse_vary(specs: Sequence[str]) -> dict[str, list[Any]]:
    """``["visual_tokens=144,576", "llm=vicuna-7b,vicuna-13b"]`` → {field: values}; one or two fields."""
    if not 1 <= len(specs) <= 2:
        raise ConfigError(f"--vary takes one or two fields, got {len(specs)}; fields: {list(VARY_FIELDS)}")
    out: dict[str, list[Any]] = {}
    for spec in specs:
        name, sep, raw = spec.partition("=")
        name = name.strip()
        if not sep or (name not in VARY_FIELDS and "." not in name):
            raise ConfigError(f"--vary {spec!r}: expected FIELD=v1,v2,... with FIELD one of {list(VARY_FIELDS)} "
                              "or an architecture option ARCH.KEY (e.g. fastv.drop_ratio=0.25,0.5,0.75)")
        if name in out:
            raise ConfigError(f"--vary names {name!r} twice")
        values = [v.strip() for v in raw.split(",") if v.strip()]
        if not values:
            raise ConfigError(f"--vary {name}: no values given (expected {name}=v1,v2,...)")
        if "." in name:
            out[name] = option_values(name, values)
        elif name == IMAGE_FIELD:
            out[name] = [sizes_label(image_pairs(v)) for v in values]
        elif name == "llm":
            bad = [v for v in values if v not in LLM_PRESETS]
            if bad:
                raise ConfigError(f"--vary llm: unknown preset(s) {bad}; choose from {sorted(LLM_PRESETS)}")
            out[name] = values
        else:
            try:
                out[name] = [int(v) for v in values]
            except ValueError as err:
                hint = (f"; {name} is the vision tower's size in px, for the images' original W x H use "
                        f"{IMAGE_FIELD}=WxH,... (e.g. {IMAGE_FIELD}=672x1008)") if name == "image_size" else ""
                raise ConfigError(f"--vary {name}: values must be integers, got {values}{hint}") from err
            if any(v < 0 for v in out[name]):
                raise ConfigError(f"--vary {name}: values must be >= 0, got {out[name]}")
        repeated = sorted({v for v in out[name] if out[name].count(v) > 1}, key=str)
        if repeated:
            raise ConfigError(f"--vary {name}: {', '.join(map(str, repeated))} given more than once in "
                              f"{raw.strip()!r}; list each value once")
    if {"visual_tokens", "image_size"} <= set(out) or {"visual_tokens", "images_per_sample"} <= set(out):
        raise ConfigError("--vary visual_tokens sets images_per_sample/image_size itself; vary only one of them")
    if {"visual_tokens", IMAGE_FIELD} <= set(out):
        raise ConfigError(f"--vary visual_tokens maps counts to images at the tower's size and {IMAGE_FIELD} sets the "
                          "images' sizes (each architecture derives its tokens); vary only one of them")
    if "text_tokens" in out and {"text_before", "text_after"} & set(out):
        raise ConfigError("--vary text_tokens sets text_after itself (from the fixed text_before); vary text_tokens "
                          "or text_before/text_after, not both")
    return out


def option_values(name: str, values: Sequence[str]) -> list[Any]:
    """The values of an option field ``ARCH.KEY``, typed as the option's default (checked by building them)."""
    arch, _, key = name.partition(".")
    options_cls = get_architecture(arch).Options
    typed = [option_value(options_cls, arch, key, v, what="--vary") for v in values]
    if any(isinstance(v, str) for v in typed):
        raise ConfigError(f"--vary {name}: only numeric or true/false options can be swept")
    for v in typed:
        parse_options(options_cls, arch, {key: v})  # the architecture's own bounds, before any work
    return typed


IMAGE_FIELD = "image"  # --vary image=WxH,...: the images' original sizes (Workload.image_sizes)


def image_pairs(value: str) -> tuple[tuple[int, int], ...]:
    """One ``image`` value → ``Workload.image_sizes``: ``WxH`` → ((H, W),) for every image of a sample,
    ``WxH;WxH;...`` → one (height, width) per image."""
    try:
        return parse_sizes(str(value), ";")
    except ValueError:
        raise ConfigError(f"--vary {IMAGE_FIELD}: {str(value).strip()!r} is not WxH (W px wide, H px high, "
                          f"positive integers, e.g. {IMAGE_FIELD}=336x336,672x1008) or WxH;WxH;... (one per "
                          f"image); the tower's own size is --vary image_size=N") from None


def image_note(vision: str | VisionConfig) -> str:
    """What ``image=WxH`` means, for the manifest and the plots' footnote."""
    vcfg = vision if isinstance(vision, VisionConfig) else vision_preset(vision)
    return (f"{IMAGE_FIELD}=WxH: each image W px wide, H px high (Workload.image_sizes); the {vcfg.name} tower stays "
            "at its image_size; an architecture that cuts images by their size (AnyRes crops, a tile grid) derives "
            "its visual tokens from it, one that resizes every image to the tower does not (each row's "
            "visual_tokens says what it used)")


def image_curve_rows(rows: pd.DataFrame, labels: Mapping[str, str] | None, x_is_image: bool,
                     hue: str | None) -> tuple[pd.DataFrame, str, str | None, str]:
    """Rows to plot over the ``image`` field: (rows, x, hue, note). ``labels``: each point key's ``image`` value
    (rows carry ``sweep_key``); None takes the rows' own ``image_sizes`` (saved rows, e.g. for ``report``).

    The rows get column ``image`` (the value). As x, images are placed by their pixel count in megapixels
    (W·H per image, or summed per sample when a value gives one size per image); when two values have the same count
    (e.g. 672x336 and 336x672) and no other field takes the hue, the aspect ratio W:H does, so no line joins
    two shapes at one x. Raises ConfigError when the pixel counts still collide."""
    given = rows["sweep_key"].map(labels) if labels is not None else rows["image_sizes"].astype(str)
    rows = rows.assign(**{IMAGE_FIELD: given})
    if not x_is_image:
        return rows, "", IMAGE_FIELD, ""
    values = list(dict.fromkeys(labels.values() if labels is not None else (v for v in given if v)))
    pairs = {v: image_pairs(v) for v in values}
    per_image = all(len(p) == 1 for p in pairs.values())
    x = "megapixels per image" if per_image else "image megapixels per sample"
    repeat = dict.fromkeys(pairs, 1)
    if not per_image:  # per sample, a size given once stands for every image of the sample
        images = set(pd.to_numeric(rows["images_per_sample"], errors="coerce").dropna().astype(int))
        if len(images) != 1:
            raise ConfigError(f"--vary {IMAGE_FIELD}: the rows hold {sorted(images)} images per sample, so a size "
                              "given once (for every image) has no one pixel count per sample; not plotted")
        (count,) = images
        repeat = {v: count if len(p) == 1 else 1 for v, p in pairs.items()}
    pixels = {v: repeat[v] * sum(h * w for h, w in p) for v, p in pairs.items()}
    aspect = {v: ";".join(f"{w // math.gcd(w, h)}:{h // math.gcd(w, h)}" for h, w in p) for v, p in pairs.items()}
    rows = rows.assign(**{x: rows[IMAGE_FIELD].map(lambda v: pixels[v] / 1e6 if v in pixels else math.nan)})
    if len(set(pixels.values())) < len(values):
        if hue is not None or len({(pixels[v], aspect[v]) for v in values}) < len(values):
            clash = sorted(v for v in values if list(pixels.values()).count(pixels[v]) > 1)
            raise ConfigError(f"--vary {IMAGE_FIELD}: {clash} have the same pixel count, so a curve over pixels would "
                              "join different images at one x; not plotted (give sizes with distinct W·H)")
        hue = "aspect W:H"
        rows = rows.assign(**{hue: rows[IMAGE_FIELD].map(aspect)})
    if per_image:
        note = "x = W·H of each image: " + ", ".join(f"{v} = {pixels[v]:,}" for v in values)
    else:
        note = "x = W·H summed over one sample's images: " + ", ".join(f"{v} = {pixels[v]:,}" for v in values)
    return rows, x, hue, note


def option_fields(vary: Mapping[str, Any]) -> list[str]:
    """The varied fields that are architecture options (``ARCH.KEY``)."""
    return [name for name in vary if "." in name]


def curve_rows(rows: pd.DataFrame, field: str, values: Sequence[Any]) -> pd.DataFrame:
    """Rows to plot against an option field ``ARCH.KEY``: that architecture's rows get the option's value as
    column ``field`` (and lose it from ``options``, so its points form one curve); every other
    architecture's rows repeat at each value, a flat line to read crossings against."""
    arch, _, key = field.partition(".")
    default = getattr(get_architecture(arch).Options(), key)  # rows name only options that differ from it
    own = rows[rows["arch"] == arch]
    options = own["options"].map(lambda text: json.loads(text) if text else {})
    own = own.assign(**{field: options.map(lambda o: o.get(key, default)),
                        "options": options.map(lambda o: json.dumps({k: v for k, v in o.items() if k != key},
                                                                    sort_keys=True) if len(o) > 1 else "")})
    others = rows[rows["arch"] != arch]
    repeated = [others.assign(**{field: v}) for v in values] if len(others) else []
    return pd.concat([own, *repeated], ignore_index=True)


def visual_tokens_to_workload(tokens: int, vision: VisionConfig) -> tuple[int, int]:
    """(images_per_sample, image_size) giving ``tokens`` visual tokens per sample (rule: module docstring)."""
    per_image = vision.tokens_per_image
    if tokens > 0 and tokens % per_image == 0:
        return tokens // per_image, vision.image_size
    side = math.isqrt(tokens)
    if tokens > 0 and side * side == tokens:
        return 1, side * vision.patch_size
    lower = max(per_image * (tokens // per_image), 1)
    squares = sorted({max(side, 1) ** 2, (side + 1) ** 2})
    raise ConfigError(
        f"visual_tokens={tokens} is neither a multiple of {per_image} (tokens per {vision.name} image) nor a square "
        f"(one image of side s·{vision.patch_size} px gives s² tokens); nearest valid: {sorted({lower, *squares})}"
    )


@dataclass(frozen=True)
class Point:
    """One profiled configuration: architecture, presets, options and workload fields."""

    arch: str
    llm: str
    vision: str
    options: tuple[tuple[str, Any], ...]
    workload: tuple[tuple[str, Any], ...]
    measure: str = "never"
    values: tuple[tuple[str, Any], ...] = ()  # the swept fields' values, as given

    def params(self) -> dict[str, Any]:
        return {"arch": self.arch, "llm": self.llm, "vision": self.vision, "options": dict(self.options),
                "workload": dict(self.workload), "measure": self.measure}

    @property
    def key(self) -> str:
        text = json.dumps(self.params(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    def make_workload(self) -> Workload:
        return Workload(**dict(self.workload))

    def vision_config(self) -> VisionConfig:
        cfg = vision_preset(self.vision)
        size = dict(self.workload).get("image_size")
        return cfg if size in (None, cfg.image_size) else replace_config(cfg, image_size=size)


def expand(
    archs: Sequence[str], vary: dict[str, list[Any]], base: Workload, llm: str, vision: str,
    options: dict[str, dict[str, Any]] | None = None, measure: str = "never",
) -> list[Point]:
    """Every (architecture × grid point), validated before anything runs."""
    options = options or {}
    names = list(vary)
    for name in option_fields(vary):
        arch, _, key = name.partition(".")
        if arch not in archs:
            raise ConfigError(f"--vary {name}: architecture {arch!r} is not being run; running {list(archs)}")
        if key in options.get(arch, {}):
            raise ConfigError(f"--vary {name} and --option {name}={options[arch][key]} both set it; give one")
    vcfg = vision_preset(vision)
    points = []
    for combo in itertools.product(*(vary[n] for n in names)):
        values = dict(zip(names, combo, strict=True))
        point_llm = values.get("llm", llm)
        changes: dict[str, Any] = {}
        for name, value in values.items():
            if "." in name:
                continue  # an architecture option: set on that architecture's points below
            if name == "visual_tokens":
                changes["images_per_sample"], size = visual_tokens_to_workload(value, vcfg)
                changes["image_size"] = None if size == vcfg.image_size else size
            elif name == "text_tokens":
                after = value - base.text_before - max(base.images_per_sample - 1, 0) * base.text_between
                if after < 0:
                    raise ConfigError(f"text_tokens={value} is below text_before={base.text_before}; text_tokens "
                                      "sets text_after = text_tokens - text_before (keep text_before smaller)")
                changes["text_after"] = after
            elif name == IMAGE_FIELD:
                changes["image_sizes"] = image_pairs(value)
            elif name != "llm":
                changes[name] = value
        if IMAGE_FIELD in values:
            images = changes.get("images_per_sample", base.images_per_sample)
            if len(changes["image_sizes"]) not in (1, images):
                raise ConfigError(f"--vary {IMAGE_FIELD}={values[IMAGE_FIELD]} gives {len(changes['image_sizes'])} "
                                  f"sizes for {images} image(s) per sample; give WxH (every image) or one WxH per "
                                  "image, joined by ';'")
        workload = base.replace(**changes)
        if workload.image_size is not None:
            replace_config(vcfg, image_size=workload.image_size)  # validates against the patch size
        for arch in archs:
            own = {n.partition(".")[2]: v for n, v in values.items() if "." in n and n.partition(".")[0] == arch}
            shown = {n: v for n, v in values.items() if "." not in n or n.partition(".")[0] == arch}
            points.append(Point(arch, point_llm, vision, tuple(sorted({**options.get(arch, {}), **own}.items())),
                                tuple(sorted(dataclasses.asdict(workload).items())), measure,
                                tuple(shown.items())))
    seen: dict[str, Point] = {}
    unique = []
    for point in points:
        if point.key in seen and dict(seen[point.key].values) == dict(point.values):
            continue  # another architecture's option varies: this architecture's point is the same each time
        if point.key in seen:
            raise ConfigError(f"the grid gives one point twice: {point.arch} at {dict(seen[point.key].values)} and "
                              f"{dict(point.values)} are the same workload; drop one of the values")
        seen[point.key] = point
        unique.append(point)
    return unique


def grid_slug(vary: Mapping[str, Sequence[Any]], keys: Sequence[str]) -> str:
    """A folder name for one grid: the varied fields and values, then a hash of its points' keys (so grids
    with the same values but other settings differ), e.g. ``visual_tokens-144-576-3f2a9c1e``."""
    text = "__".join(f"{name}-{'-'.join(map(str, values))}" for name, values in vary.items())
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:80].rstrip("-_")
    digest = hashlib.sha1(",".join(sorted(keys)).encode()).hexdigest()[:8]
    return f"{text}-{digest}"


def is_oom(err: BaseException) -> bool:
    """Out of memory on any device: torch's OutOfMemoryError, MemoryError, or the CPU allocator's message."""
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


# ----- the point store: finished points, their origin, claims ------------------------------------------------
CLAIM_SUFFIX = ".claim"
UNREADABLE_CLAIM_GRACE_S = 60.0  # a claim file that does not parse is being written, until it is this old
ORIGIN_COLUMNS = ("sweep_key", "sweep_code", "sweep_device")  # a point's rows carry these; SQLite is keyed by them


def code_version() -> str:
    """The running code: mllm-bench's version and git commit (``+dirty`` with uncommitted changes), e.g.
    ``0.1.0@1a2b3c4d5e6f+dirty``; ``unknown`` stands for a commit that cannot be read (not a git checkout)."""
    from mllm_bench import __version__

    return f"{__version__}@{git_commit() or 'unknown'}"


def point_origin(device: str) -> dict[str, str]:
    """What a finished point depends on besides its parameters: the code that made it and the device's name."""
    return {"code": code_version(), "device": device_name(device)}


def reuse_problem(record: Mapping[str, Any], origin: Mapping[str, str]) -> str:
    """Why a finished point's record may not be reused by the code and device ``origin``; "" when it may."""
    made = record.get("origin")
    if not isinstance(made, dict):
        return "its file records no code version or device (an older mllm-bench wrote it)"
    if made.get("code") != origin["code"]:
        return f"made by mllm-bench {made.get('code')}, this is {origin['code']}"
    if made.get("device") != origin["device"]:
        return f"made on {made.get('device')}, this is {origin['device']}"
    return ""


def point_path(points_dir: str | Path, key: str) -> Path:
    """The file of point ``key`` in a point store."""
    return Path(points_dir) / f"{key}.json"


def write_point(points_dir: str | Path, key: str, record: Mapping[str, Any]) -> Path:
    """Write a finished point's record (a JSON object with ``rows``, ``status``, ``origin``) atomically."""
    return atomic_write_text(point_path(points_dir, key), json.dumps(record, allow_nan=False) + "\n")


def read_point(points_dir: str | Path, key: str) -> dict[str, Any] | None:
    """A finished point's record, or None when it has no file or its file does not parse."""
    try:
        data = json.loads(point_path(points_dir, key).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("rows"), list) else None


def finished_points(points_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Every finished point of a store whose file parses, by key (files being written are not listed)."""
    out = {}
    for path in sorted(Path(points_dir).glob("*.json")):
        record = None if path.name.startswith(".") else read_point(points_dir, path.stem)
        if record is not None:
            out[path.stem] = record
    return out


def record_rows(key: str, record: Mapping[str, Any]) -> pd.DataFrame:
    """A finished point's rows, each carrying the point's key, code and device (:data:`ORIGIN_COLUMNS`)."""
    origin = record.get("origin") if isinstance(record.get("origin"), dict) else {}
    rows = pd.DataFrame.from_records(record["rows"])
    return rows.assign(sweep_key=key, sweep_code=origin.get("code", ""), sweep_device=origin.get("device", ""))


@dataclass(frozen=True)
class Claim:
    """A claim on one point: ``held`` when this process made it, else ``holder`` says who holds it."""

    path: Path
    held: bool
    holder: str = ""

    def release(self) -> None:
        """Remove the claim if this process holds it."""
        if self.held:
            self.path.unlink(missing_ok=True)


def claim_point(points_dir: str | Path, key: str) -> Claim:
    """Claim point ``key`` before working on it: an ``O_EXCL`` marker ``<key>.claim`` holding pid and host.

    A claim left by a process that is gone (same host, pid not running) is taken over; one held by a live
    process, or by a process on another host (which cannot be checked), is not: the result is not ``held``.
    """
    path = Path(points_dir) / f"{key}{CLAIM_SUFFIX}"
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = claim_holder(path)
            if holder:
                return Claim(path, False, holder)
            _remove_stale_claim(path)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                       "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}, f)
        return Claim(path, True)
    return Claim(path, False, "another process (the claim changed hands while this one took it over)")


def claim_holder(path: Path) -> str:
    """Who holds the claim file ``path`` ("pid 123", …), or "" when nobody does (gone, or a dead process's)."""
    try:
        info = json.loads(path.read_text())
        pid, host = int(info["pid"]), str(info["host"])
    except FileNotFoundError:
        return ""
    except (OSError, ValueError, KeyError, TypeError):
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return ""
        return "" if age > UNREADABLE_CLAIM_GRACE_S else f"a process still writing {path.name}"
    if host != socket.gethostname():
        return f"pid {pid} on host {host} (remove {path} if that run is gone)"
    return f"pid {pid}" if _pid_alive(pid) else ""


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there; assume it is alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove_stale_claim(path: Path) -> None:
    """Remove a dead process's claim without removing a live claim another process made meanwhile."""
    aside = path.with_name(f"{path.name}.{os.getpid()}.stale")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if claim_holder(aside):  # a live claim replaced the stale one before the rename: put it back
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
    aside.unlink(missing_ok=True)


# ----- SQLite: each finished point once per code and device ------------------------------------------------
DB_TIMEOUT_S = 30.0  # how long a write waits for a lock held by another connection


def _quote(name: str) -> str:
    return '"' + str(name).replace('"', '""') + '"'


def _sql_value(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or value is pd.NA or (isinstance(value, float) and not math.isfinite(value)):
        return None
    return value if isinstance(value, (int, float, str, bytes)) else str(value)


def _connect(db: str | Path) -> sqlite3.Connection:
    path = Path(db)
    path.parent.mkdir(parents=True, exist_ok=True)
    return sqlite3.connect(path, timeout=DB_TIMEOUT_S)


def store_point_rows(db: str | Path, rows: pd.DataFrame, table: str = SQLITE_TABLE) -> None:
    """Store one point's rows (carrying :data:`ORIGIN_COLUMNS`) in SQLite file ``db``, replacing the rows of the
    same point, code and device: storing a point again never duplicates it. One transaction: a failure
    (locked file, full disk) leaves the file as it was."""
    key = [str(rows[c].iloc[0]) for c in ORIGIN_COLUMNS]
    columns = [str(c) for c in rows.columns]
    with closing(_connect(db)) as con:
        have = {r[1] for r in con.execute(f"pragma table_info({_quote(table)})")}
        with con:
            if not have:  # typed columns, as pandas (and results.append_sqlite) make them
                rows.head(0).to_sql(table, con, index=False)
            for col in columns:
                if have and col not in have:
                    con.execute(f"alter table {_quote(table)} add column {_quote(col)}")
            same_point = " and ".join(f"{_quote(c)} = ?" for c in ORIGIN_COLUMNS)
            con.execute(f"delete from {_quote(table)} where {same_point}", key)
            con.executemany(f"insert into {_quote(table)} ({', '.join(map(_quote, columns))}) "
                            f"values ({', '.join('?' * len(columns))})",
                            [[_sql_value(v) for v in r] for r in rows.itertuples(index=False, name=None)])


def backfill_db(db: str | Path, records: Mapping[str, Mapping[str, Any]], table: str = SQLITE_TABLE) -> list[str]:
    """Store every finished point of ``records`` (key → record) whose rows SQLite file ``db`` lacks, or holds
    a different number of, for that point's code and device. Returns the keys written."""
    counts: dict[tuple[str, ...], int] = {}
    with closing(_connect(db)) as con:
        have = {r[1] for r in con.execute(f"pragma table_info({_quote(table)})")}
        if set(ORIGIN_COLUMNS) <= have:
            cols = ", ".join(map(_quote, ORIGIN_COLUMNS))
            for *key, n in con.execute(f"select {cols}, count(*) from {_quote(table)} group by {cols}"):
                counts[tuple(str(k) for k in key)] = n
    written = []
    for key, record in records.items():
        rows = record_rows(key, record)
        if len(rows) and counts.get(tuple(str(rows[c].iloc[0]) for c in ORIGIN_COLUMNS)) != len(rows):
            store_point_rows(db, rows, table)
            written.append(key)
    return written


def check_db(db: str | Path, table: str = SQLITE_TABLE) -> None:
    """Refuse (ConfigError) a ``--db`` path that cannot be opened or is not a SQLite file, before any work."""
    try:
        with closing(_connect(db)) as con:
            con.execute(f"pragma table_info({_quote(table)})").fetchall()
    except sqlite3.OperationalError as err:
        if "locked" in str(err):
            return  # busy now; points are stored as they finish and backfilled at the end
        raise ConfigError(f"--db {str(db)!r}: cannot open it as a SQLite file ({err})") from err
    except (sqlite3.DatabaseError, OSError) as err:
        raise ConfigError(f"--db {str(db)!r}: not a SQLite file ({err})") from err


# ----- running a sweep ---------------------------------------------------------------------------------------
@dataclass
class PointOutcome:
    """What this run did with one point: ``run`` is new, reused, redone, busy (claimed by another process)
    or failed; ``why`` gives the reason for redone, busy and failed."""

    point: Point
    status: str  # ok, oom, busy or error
    run: str
    why: str = ""
    rows: pd.DataFrame = field(default_factory=pd.DataFrame)


@dataclass
class SweepResult:
    rows: pd.DataFrame
    done: int = 0  # profiled in this run (new or redone)
    skipped: int = 0  # reused: finished earlier by this code on this device
    oom: list[str] = field(default_factory=list)  # every point out of memory, in this run or an earlier one
    new_keys: list[str] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)  # every point this run was given (its share of the grid)
    outcomes: list[PointOutcome] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)  # claimed by another live process; not done here
    db_notes: list[str] = field(default_factory=list)  # SQLite writes that failed (retried in the backfill)
    db_error: str = ""  # set when the final backfill failed: the file lacks finished points

    @property
    def redone(self) -> list[PointOutcome]:
        return [o for o in self.outcomes if o.run == "redone"]


def _reusable(store: Path, key: str, origin: Mapping[str, str]) -> tuple[dict[str, Any] | None, str]:
    """(record, "") for a point this code and device finished, else (None, why it must be done: "" = never done)."""
    if not point_path(store, key).exists():
        return None, ""
    record = read_point(store, key)
    if record is None:
        return None, "its file did not parse"
    problem = reuse_problem(record, origin)
    return (None, problem) if problem else (record, "")


def run_sweep(
    points: Sequence[Point], out_dir: str | Path, profile_fn: ProfileFn,
    on_point: Callable[[Point, str], None] | None = None, rank: int = 0, world_size: int = 1,
    db: str | Path | None = None, origin: Mapping[str, str] | None = None, run_device: str | None = None,
) -> SweepResult:
    """Profile each point not finished in ``out_dir`` by this code on this device; returns this run's points' rows.

    ``origin`` (default: :func:`point_origin` of each point's device) is what a finished point must match to
    be reused. ``db``: a SQLite file that gets each point's rows as it finishes, and every finished point of
    the folder it lacks at the start and the end. ``on_point(point, status)`` is called after each point
    (status ok, oom, skipped, busy or error). With ``world_size`` > 1 this rank takes every
    ``world_size``-th point (index % world_size == rank). ``run_device`` (e.g. ``cuda:3``): where this process
    runs points whose device is its type without an index (``cuda``); the points' keys keep ``cuda``.
    """
    store = Path(out_dir) / "points"
    store.mkdir(parents=True, exist_ok=True)
    mine = shard_points(points, rank, world_size)
    result = SweepResult(pd.DataFrame(), keys=[p.key for p in mine])
    if db is not None:
        check_db(db)
        _backfill(result, db, store)
    origins: dict[str, dict[str, str]] = {}
    frames = []

    def finish(outcome: PointOutcome, status_for_callback: str) -> None:
        result.outcomes.append(outcome)
        if len(outcome.rows):
            frames.append(outcome.rows)
        if outcome.status == "oom":
            result.oom.append(outcome.point.key)
        if on_point:
            on_point(outcome.point, status_for_callback)

    for point in mine:
        device = _device_for(point, run_device)
        here = origin or origins.setdefault(device, point_origin(device))
        record, why = _reusable(store, point.key, here)
        if record is None:
            claim = claim_point(store, point.key)
            if not claim.held:
                result.busy.append(point.key)
                finish(PointOutcome(point, "busy", "busy", f"claimed by {claim.holder}"), "busy")
                continue
            try:
                record, why_now = _reusable(store, point.key, here)  # another run may have finished it meanwhile
                if record is None:
                    why = why_now
                    record = _profile_point(point, profile_fn, here, result, device)
                    if record is None:
                        if on_point:
                            on_point(point, "error")
                        continue
                    write_point(store, point.key, record)
                    fresh = True
                else:
                    fresh = False
            finally:
                claim.release()
        else:
            fresh = False
        rows = record_rows(point.key, record)
        status = record.get("status", "ok")
        if not fresh:
            result.skipped += 1
            finish(PointOutcome(point, status, "reused", "", rows), "skipped")
            continue
        result.done += 1
        result.new_keys.append(point.key)
        if db is not None:
            try:
                store_point_rows(db, rows)
            except (sqlite3.Error, OSError) as err:
                result.db_notes.append(f"{point.arch} {dict(point.values)}: {type(err).__name__}: {err}")
        finish(PointOutcome(point, status, "redone" if why else "new", why, rows), status)
    if db is not None:
        _backfill(result, db, store)
    result.rows = concat_rows(frames)
    return result


def _device_for(point: Point, run_device: str | None) -> str:
    """The device ``point`` runs on: ``run_device`` when the point names only that device's type, else its own."""
    own = str(dict(point.workload).get("device", "cpu"))
    if run_device is None:
        return own
    mine, given = torch.device(own), torch.device(run_device)
    return run_device if mine.index is None and mine.type == given.type else own


def _profile_point(point: Point, profile_fn: ProfileFn, origin: Mapping[str, str],
                   result: SweepResult, device: str | None = None) -> dict[str, Any] | None:
    """The finished record of one point (ok or oom), or None after a failure (recorded in ``result.errors``).

    Run on ``device`` (e.g. ``cuda:3``) in place of the point's ``cuda``, its rows still name the point's device
    (one workload whichever GPU ran it); the record's ``ran_on`` names the one used."""
    vision = point.vision_config()
    workload = point.make_workload()
    named = workload.device
    if device is not None and device != workload.device:
        workload = workload.replace(device=device)
    try:
        rows = profile_fn(point.arch, workload, llm=point.llm, vision=vision,
                          options=dict(point.options) or None, measure=point.measure)
        status, fields = "ok", {"status": "ok", "error": ""}
    except Exception as err:  # noqa: BLE001 - OOM is recorded, anything else reported and retried next run
        message = f"{point.arch} {dict(point.values)}: {type(err).__name__}: {err}"
        if not is_oom(err):
            result.errors.append((point.key, message))
            result.outcomes.append(PointOutcome(point, "error", "failed", f"{type(err).__name__}: {err}"))
            return None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        rows = _status_row(point, vision, "oom", f"{type(err).__name__}: {err}")
        status, fields = "oom", {"status": "oom"}
    records = json_rows(rows, **fields, vision=point.vision)
    if workload.device != named:
        for record in records:
            if record.get("device") == workload.device:
                record["device"] = named
    return {"key": point.key, "params": point.params(), "values": dict(point.values), "status": status,
            "origin": dict(origin), "ran_on": workload.device,
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "rows": records}


def refresh_db(result: SweepResult, db: str | Path, out_dir: str | Path) -> None:
    """Store every finished point of ``out_dir`` that SQLite file ``db`` lacks (after other ranks' points came
    in); a failure is kept in ``result.db_error``."""
    _backfill(result, db, Path(out_dir) / "points")


def _backfill(result: SweepResult, db: str | Path, store: Path) -> None:
    try:
        backfill_db(db, finished_points(store))
        result.db_error = ""
    except (sqlite3.Error, OSError) as err:
        result.db_error = f"{type(err).__name__}: {err}"


def summary_table(result: SweepResult, scope: str = "language", convention: str = "dense") -> pd.DataFrame:
    """One line per point of this run: architecture, swept values, status, what the run did (new, reused,
    redone, busy, failed) and why, FLOPs (prefill for inference, train step otherwise; ``scope`` and
    ``convention``, counted else analytic) and the measured latency of that phase where there is one."""
    metrics = [("prefill_flops", "prefill_latency_s") if dict(o.point.workload).get("stage", "inference") == "inference"
               else ("train_step_flops", "train_step_latency_s") for o in result.outcomes]
    with_rows = [o.rows.assign(_point=i) for i, o in enumerate(result.outcomes)
                 if len(o.rows) and {"metric", "source"} <= set(o.rows.columns)]
    picked_values: dict[tuple[int, str], float] = {}  # (point index, metric) -> value, picked per point
    if with_rows:
        rows = concat_rows(with_rows)
        for col in {"scope", "convention", "component", "role"} & set(rows.columns):
            rows[col] = rows[col].fillna("")  # a point without the column: no filter, as when picked alone
        for metric in {m for pair in metrics for m in pair}:
            picked = (pick(rows, metric, ("counted", "analytic"), by=("_point",), scope=scope_for(convention, scope),
                           convention=convention) if metric.endswith("_flops")
                      else pick(rows, metric, ("measured",), by=("_point",)))
            picked_values.update({(int(i), metric): float(v) for i, v in zip(picked["_point"], picked["value"],
                                                                       strict=True)})
    lines = []
    for i, (o, (flops_metric, time_metric)) in enumerate(zip(result.outcomes, metrics, strict=True)):
        flops = picked_values.get((i, flops_metric), math.nan)
        latency = picked_values.get((i, time_metric), math.nan)
        lines.append({"arch": o.point.arch, "point": ", ".join(f"{k}={v}" for k, v in o.point.values),
                      "status": o.status, "run": o.run, "why": o.why, "flops_metric": flops_metric,
                      "flops": flops, "latency_s": latency, "key": o.point.key})
    return pd.DataFrame(lines, columns=["arch", "point", "status", "run", "why", "flops_metric", "flops",
                                        "latency_s", "key"])


def _visual_tokens(point: Point, workload: Workload) -> int | str:
    """Visual tokens per sample as the point's architecture counts them (a pooled LLaVA, the Q-Former's queries,
    …); "" when its meta model cannot be built."""
    from mllm_bench.profile import cached_meta_model

    try:
        model = cached_meta_model(point.arch, point.llm, point.vision, dict(point.options) or None, workload.dtype)
    except ConfigError:
        return ""
    return sum(model.visual_tokens_per_image(workload))


def _status_row(point: Point, vision: VisionConfig, status: str, message: str) -> pd.DataFrame:
    w = point.make_workload()
    return pd.DataFrame([{
        "arch": point.arch, "llm": point.llm, "vision": point.vision,
        "options": json.dumps(dict(point.options), sort_keys=True) if point.options else "",
        "metric": status, "value": 1.0, "unit": "", "source": "", "scope": "", "convention": "", "component": "",
        "role": "", "stage": w.stage, "phase": "", "batch_size": w.batch_size,
        "images_per_sample": w.images_per_sample, "image_size": w.image_size or vision.image_size,
        "image_sizes": sizes_label(w.image_sizes or ((vision.image_size,) * 2,)) if w.images_per_sample else "",
        # with image sizes set the architecture derives its tokens from them: unknown without its model
        "visual_tokens": "" if w.image_sizes else _visual_tokens(point, w),
        "text_tokens": w.num_text_tokens,
        "text_before": w.text_before, "text_after": w.text_after, "generate_tokens": w.generate_tokens,
        "dtype": w.dtype, "device": w.device, "error": message[:500],
    }])


def visual_tokens_note(tokens: Sequence[int], vision: str | VisionConfig) -> str:
    """How each swept visual-token count was realised, e.g. "2304 = 4 images × 336 px" (rule: module docstring)."""
    vcfg = vision if isinstance(vision, VisionConfig) else vision_preset(vision)
    parts = []
    for n in tokens:
        images, size = visual_tokens_to_workload(n, vcfg)
        parts.append(f"{n} = {images} image{'s' if images > 1 else ''} × {size} px")
    return (f"visual tokens per sample ({vcfg.name}): " + ", ".join(parts) + f"; multiples of {vcfg.tokens_per_image}"
            " are several images at the preset's resolution (not one larger image)")


def write_sweep(result: SweepResult, out_dir: str | Path, vary: dict[str, list[Any]], archs: Sequence[str],
                base: Workload, vision: str | VisionConfig, ranks: Mapping[str, Any] | None = None) -> list[Path]:
    """The folder's summary, built from every finished point of every grid run into it: the tidy rows
    (JSON + CSV) and a manifest (``sweep.json``) naming each grid (what was varied and, for visual tokens,
    how each count was realised), which points are finished or out of memory, and what this run did.

    This run's grid is recorded first under ``grids/``, so a later run with another grid keeps it listed.
    ``ranks``: how a launch of several processes split the grid (world size, launch id, ranks missing)."""
    out = Path(out_dir)
    vision_name = vision.name if isinstance(vision, VisionConfig) else vision
    grid = {"vary": vary, "archs": list(archs), "base_workload": dataclasses.asdict(base), "vision": vision_name,
            "keys": result.keys}
    grid_path = out / "grids" / f"{grid_slug(vary, result.keys)}.json"
    previous = _read_json(grid_path)
    grid["created"] = (previous or {}).get("created") or datetime.datetime.now(datetime.timezone.utc).isoformat()
    atomic_write_text(grid_path, json.dumps(grid, indent=1) + "\n")

    grids = [g for g in (_read_json(p) for p in sorted((out / "grids").glob("*.json"))) if g and "keys" in g]
    grids.sort(key=lambda g: str(g.get("created", "")))
    records = finished_points(out / "points")
    order = list(dict.fromkeys([k for g in grids for k in g["keys"]] + sorted(records)))
    finished = [k for k in order if k in records]
    rows = concat_rows(record_rows(k, records[k]) for k in finished)
    paths = []
    if len(rows):
        paths += [write_rows(rows, out / "results.json"), write_rows(rows, out / "results.csv")]
    oom = [k for k in finished if records[k].get("status") == "oom"]
    grid_lines = []
    for g in grids:
        line = {"vary": g["vary"], "archs": g["archs"], "base_workload": g["base_workload"],
                "points": len(g["keys"]), "finished": sum(k in records for k in g["keys"]),
                "oom": [k for k in g["keys"] if k in oom], "not_finished": [k for k in g["keys"] if k not in records]}
        if "visual_tokens" in g["vary"]:
            line["visual_tokens_mapping"] = visual_tokens_note(g["vary"]["visual_tokens"], g.get("vision", vision))
        if IMAGE_FIELD in g["vary"]:
            line["image_mapping"] = image_note(g.get("vision", vision))
        grid_lines.append(line)
    manifest: dict[str, Any] = {
        "vary": vary, "archs": list(archs), "base_workload": dataclasses.asdict(base),
        "points_finished": len(finished), "points_done": result.done, "points_skipped": result.skipped,
        "points_redone": len(result.redone), "oom": oom, "errors": [m for _, m in result.errors],
        "in_progress_elsewhere": result.busy, "grids": grid_lines,
        "this_run": [{"key": o.point.key, "arch": o.point.arch, "values": dict(o.point.values), "status": o.status,
                      "run": o.run, "why": o.why} for o in result.outcomes],
    }
    if ranks:
        manifest["ranks"] = dict(ranks)
    if result.db_error:
        manifest["db_error"] = result.db_error
    if "visual_tokens" in vary:
        manifest["visual_tokens_mapping"] = visual_tokens_note(vary["visual_tokens"], vision)
    if IMAGE_FIELD in vary:
        manifest["image_mapping"] = image_note(vision)
    paths.append(atomic_write_text(out / "sweep.json", json.dumps(manifest, indent=1) + "\n"))
    return paths


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ----- one grid over several processes (torchrun, srun) ------------------------------------------------------
RANKS_DIR = "ranks"  # <out>/ranks/<launch>-of-<N>/: each rank's start and done markers
RANK_POLL_S = 1.0
LOCAL_RANK_POLL_S = 0.05  # ``--jobs``: the workers are this machine's processes, their markers local files


def share_launch_id(ranks: Ranks) -> Ranks:
    """``ranks`` with rank 0's fresh id broadcast to every rank when a torch.distributed process group is
    initialised and the launcher gave no id; unchanged otherwise."""
    if ranks.launch or ranks.world_size == 1 or not (torch.distributed.is_available()
                                                     and torch.distributed.is_initialized()):
        return ranks
    box = [f"group-{os.urandom(6).hex()}" if ranks.rank == 0 else ""]
    torch.distributed.broadcast_object_list(box, src=0)
    return dataclasses.replace(ranks, launch=str(box[0]))


def rank_device(device: str, ranks: Ranks) -> str:
    """The device this rank runs on: ``cuda`` becomes ``cuda:LOCAL_RANK`` (``cuda:0`` where each process sees
    one GPU, e.g. srun --gpus-per-task=1); any other device is used as given. Under several ranks a CUDA index
    given by hand is refused: every rank would share it."""
    dev = torch.device(device)
    if ranks.world_size == 1 or dev.type != "cuda":
        return device
    if dev.index is not None:
        raise ConfigError(f"--device {device}: under {ranks.world_size} ranks each takes cuda:LOCAL_RANK; give "
                          "--device cuda")
    count = torch.cuda.device_count()
    if count == 1:
        return "cuda:0"
    if ranks.local_rank >= count:
        raise ConfigError(f"rank {ranks.rank}: local rank {ranks.local_rank} has no CUDA device (this node has "
                          f"{count}: cuda:0 to cuda:{count - 1}); start at most {count} ranks per node")
    return f"cuda:{ranks.local_rank}"


def _launch_dir(out_dir: str | Path, ranks: Ranks) -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", ranks.launch or "unnamed")[:80]
    return Path(out_dir) / RANKS_DIR / f"{name}-of-{ranks.world_size}"


def process_start_time() -> float:
    """When this process started (epoch seconds; Linux ``/proc``), else when this module was imported."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rpartition(")")[2].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED


_IMPORTED = time.time()


WAITED = "waited.json"  # in a launch folder: when rank 0 of the latest launch into it stopped waiting


def _by_this_process(marker: Any) -> bool:
    return isinstance(marker, dict) and marker.get("pid") == os.getpid() and marker.get("host") == socket.gethostname()


def _ended_unfinished(start0: Any, waited: Any) -> bool:
    """Whether the launch whose rank 0 wrote start marker ``start0`` ended without recording, in ``waited``,
    that its rank 0 stopped waiting (it was killed, or failed before waiting)."""
    if not isinstance(start0, dict):
        return False
    return not (isinstance(waited, dict) and (waited.get("pid"), waited.get("host")) == (
        start0.get("pid"), start0.get("host")) and float(waited.get("ended", 0)) >= float(start0.get("started", 0)))


def mark_rank_started(out_dir: str | Path, ranks: Ranks, pid: int | None = None,
                      started: float | None = None) -> float:
    """Record that this rank has begun (pid, default this process's; host; ``started``, default now) and return
    ``started``: rank 0 can tell a rank that died from a slow one, and a done marker names the start it follows.
    Rank 0's marker also records whether the launch before it into this folder ended unfinished."""
    folder = _launch_dir(out_dir, ranks)
    started = time.time() if started is None else started
    info: dict[str, Any] = {"rank": ranks.rank, "pid": pid or os.getpid(), "host": socket.gethostname(),
                            "started": started}
    if ranks.rank == 0:
        info["earlier_unfinished"] = _ended_unfinished(_read_json(folder / "rank-0.start.json"),
                                                       _read_json(folder / WAITED))
    atomic_write_text(folder / f"rank-{ranks.rank}.start.json", json.dumps(info) + "\n")
    return started


def mark_rank_done(out_dir: str | Path, ranks: Ranks, result: SweepResult, started: float | None = None) -> Path:
    """Write this rank's done marker: what it did with each of its points (rank 0 merges these), and
    ``started``, the time of the start marker it follows (default: this process's start marker in the folder,
    None without one)."""
    folder = _launch_dir(out_dir, ranks)
    if started is None:
        start = _read_json(folder / f"rank-{ranks.rank}.start.json")
        started = start.get("started") if _by_this_process(start) else None
    info = {"rank": ranks.rank, "world_size": ranks.world_size, "launch": ranks.launch, "pid": os.getpid(),
            "host": socket.gethostname(), "started": started, "finished": time.time(), "keys": result.keys,
            "done": result.done, "skipped": result.skipped, "new_keys": result.new_keys, "oom": result.oom,
            "errors": [list(e) for e in result.errors], "busy": result.busy,
            "outcomes": [{"key": o.point.key, "status": o.status, "run": o.run, "why": o.why}
                         for o in result.outcomes]}
    return atomic_write_text(folder / f"rank-{ranks.rank}.json", json.dumps(info) + "\n")


def _rank_worker(points: Sequence[Point], out_dir: str | Path, profile_fn: ProfileFn, ranks: Ranks,
                 run_device: str | None, started: float) -> None:
    """One local rank of ``sweep --jobs``: its share of the points, then its done marker (rank 0 merges)."""
    torch.set_num_threads(1)  # one core per process: the ranks share the machine's cores
    result = run_sweep(points, out_dir, profile_fn, rank=ranks.rank, world_size=ranks.world_size,
                       run_device=run_device)
    mark_rank_done(out_dir, ranks, result, started=started)


def start_rank_worker(points: Sequence[Point], out_dir: str | Path, profile_fn: ProfileFn, ranks: Ranks,
                      run_device: str | None) -> multiprocessing.Process:
    """Start rank ``ranks.rank`` of a local launch; rank 0, this process, waits for its done marker as for any
    launcher's ranks. The worker is a fork of this process where that is safe (a POSIX system, CUDA not
    initialised here: local ranks only count, on meta), so it starts at once with torch imported and the meta
    models built; else a fresh interpreter (spawned)."""
    started = time.time()  # the worker's done marker names this start, whenever its start marker is written
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() and not torch.cuda.is_initialized() \
        else "spawn"
    if method == "fork":  # imported by torch's meta kernels at the first count (sympy: ~0.6 s): once, here
        importlib.import_module("torch.fx.experimental.symbolic_shapes")
    sys.stdout.flush()  # a fork inherits unwritten output and would write it again
    sys.stderr.flush()
    worker = multiprocessing.get_context(method).Process(
        target=_rank_worker, args=(list(points), str(out_dir), profile_fn, ranks, run_device, started),
        name=f"mllm-bench-sweep-rank-{ranks.rank}", daemon=True)
    worker.start()
    # marked here, not in the worker: a worker that dies while starting (an import error) is then seen as dead
    mark_rank_started(out_dir, ranks, pid=worker.pid, started=started)
    return worker


def _earlier_end(folder: Path) -> float | None:
    """When rank 0 of the launch before this one into ``folder`` stopped waiting: 0.0 when no launch recorded
    it, None when that launch ended unfinished (its end is unknown)."""
    start0, waited = _read_json(folder / "rank-0.start.json"), _read_json(folder / WAITED)
    # this process's start marker says how the launch before it ended; another's is that launch's own
    unfinished = bool(start0.get("earlier_unfinished")) if _by_this_process(start0) else _ended_unfinished(
        start0, waited)
    if unfinished:
        return None
    return float(waited.get("ended", 0)) if isinstance(waited, dict) else 0.0


def _when(stamp: Any) -> str:
    if stamp is None:
        return "no start marker"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(stamp or 0)))


def _share_problem(info: Mapping[str, Any], rank: int, world_size: int, keys: Sequence[str] | None) -> str:
    """Why done marker ``info`` is not rank ``rank``'s answer for the share ``keys`` of a grid over
    ``world_size`` ranks ("" when it is; ``keys`` None: not checked)."""
    if info.get("world_size") != world_size:
        return f"its world size is {info.get('world_size')}, not {world_size}"
    got = info.get("keys")
    if keys is None or got == list(keys):
        return ""
    got = got if isinstance(got, list) else []
    wanted, have = set(keys), set(got)
    extra, lacking = [k for k in got if k not in wanted], [k for k in keys if k not in have]
    parts = [f"{len(extra)} of its {len(got)} points are not rank {rank}'s in this grid"] if extra else []
    parts += [f"{len(lacking)} of rank {rank}'s {len(keys)} points are not in it"] if lacking else []
    return f"its points are not rank {rank}'s share of this grid ({'; '.join(parts) or 'another order'})"


def _started_now(start: Mapping[str, Any], boundary: float | None, since: float) -> bool:
    """Whether start marker ``start`` is of this launch: after the earlier launch's end, or when that is
    unknown, after ``since``."""
    stamp = float(start.get("started", 0))
    return stamp >= since if boundary is None else stamp > boundary


def _done_problem(info: Mapping[str, Any], start: Mapping[str, Any] | None, rank: int, ranks: Ranks,
                  keys: Sequence[str] | None, boundary: float | None, since: float) -> str:
    """Why rank ``rank``'s done marker ``info`` is not this launch's ("" when it is); ``start``: the rank's start
    marker in the folder; ``boundary``, ``since``: as in :func:`wait_for_ranks`."""
    problem = _share_problem(info, rank, ranks.world_size, keys)
    if problem:
        return problem
    if info.get("launch", ranks.launch) != ranks.launch:
        return f"its launch id is {info.get('launch')!r}, not {ranks.launch!r}"
    if start is not None and (info.get("pid"), info.get("started")) != (start.get("pid"), start.get("started")):
        return (f"it follows a start of rank {rank} (pid {info.get('pid')}, {_when(info.get('started'))}) other than "
                f"this launch's (pid {start.get('pid')}, {_when(start.get('started'))})")
    if boundary is None:
        if float(info.get("finished", 0)) < since:
            return (f"it was written at {_when(info.get('finished'))}, before rank 0 started, and the launch before "
                    "this one into the folder ended unfinished")
    elif start is None and boundary:
        return f"rank {rank} has no start marker, so it may be the earlier launch's (ended {_when(boundary)})"
    elif start is not None and not _started_now(start, boundary, since):
        return (f"rank {rank} started at {_when(start.get('started'))}, before the earlier launch into the folder "
                f"ended ({_when(boundary)})")
    return ""


def wait_for_ranks(out_dir: str | Path, ranks: Ranks, timeout_s: float, since: float | None = None,
                   poll_s: float = RANK_POLL_S, *, points: Sequence[Point] | None = None,
                   ) -> tuple[dict[int, dict[str, Any]], dict[int, str]]:
    """Rank 0 waits for every other rank's done marker: (markers by rank, why each missing rank is missing).

    A done marker counts only as this launch's answer to what it asked of that rank (with a launch id or
    without: the id only names the folder, and a reused one finds the earlier launch's markers there):
    - its world size and launch id are this launch's and, given the grid ``points``, its keys are exactly the
      rank's share of them (:func:`rank_share`);
    - it follows the rank's start marker in the folder (same pid and start time): once this launch's rank has
      started, a marker an earlier start of that rank left is not taken for its answer;
    - that start came after the earlier launch into the folder ended. Rank 0 records when it stops waiting
      (``waited.json``, also on an error or interrupt); a start before that time is the earlier launch's. A
      rank that started and finished before this rank 0 started (a launcher that starts rank 0 late) counts.
      Where that launch's rank 0 ended unfinished (killed) its end is unknown, and a marker counts only when
      written after ``since`` (default: this process's start). Times of different hosts are compared: their
      clocks must agree to well within the time between two launches.
    A marker that does not count is ignored: its rank is still awaited, and the reason given at the timeout
    says why the marker found was not taken. Start markers count by the same time rule.

    Returns when all are in, when every missing rank is known dead (a start marker of this launch whose
    process on this host is gone) or after ``timeout_s``."""
    folder = _launch_dir(out_dir, ranks)
    since = process_start_time() if since is None else since
    boundary = _earlier_end(folder)
    deadline = time.monotonic() + timeout_s
    others = range(1, ranks.world_size)
    shares = {r: None if points is None else [p.key for p in shard_points(points, r, ranks.world_size)]
              for r in others}
    try:
        while True:
            done, missing, rejected = {}, {}, {}
            for r in others:
                start = _read_json(folder / f"rank-{r}.start.json")
                start = start if isinstance(start, dict) else None
                info = _read_json(folder / f"rank-{r}.json")
                if isinstance(info, dict):
                    rejected[r] = _done_problem(info, start, r, ranks, shares[r], boundary, since)
                    if not rejected[r]:
                        done[r] = info
                        continue
                if start is not None and _started_now(start, boundary, since) and start.get(
                        "host") == socket.gethostname() and not _pid_alive(int(start.get("pid", 0))):
                    missing[r] = f"rank {r} (pid {start.get('pid')}) ended without finishing its points" + (
                        f" (its done marker was not taken: {rejected[r]})" if rejected.get(r) else "")
            if len(done) + len(missing) == len(others):
                return done, missing
            if time.monotonic() >= deadline:
                for r in others:
                    if r not in done and r not in missing:
                        missing[r] = f"rank {r} did not finish within {timeout_s:g} s" + (
                            f" (a done marker was found, but for a different grid or launch: {rejected[r]})"
                            if rejected.get(r) else "")
                return done, missing
            time.sleep(poll_s)
    finally:
        atomic_write_text(folder / WAITED, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                       "ended": time.time()}) + "\n")


def merge_ranks(points: Sequence[Point], own: SweepResult, markers: Mapping[int, Mapping[str, Any]],
                missing: Mapping[int, str], out_dir: str | Path, world_size: int) -> SweepResult:
    """One result for the whole grid from rank 0's ``own`` and the other ranks' done markers; points of a
    rank that never reported, or whose marker is not for its share of ``points`` over ``world_size`` ranks,
    are listed as not finished (``run`` "missing", ``why`` the reason)."""
    store = Path(out_dir) / "points"
    missing, kept = dict(missing), {}
    for r, info in markers.items():
        problem = _share_problem(info, r, world_size, [p.key for p in shard_points(points, r, world_size)])
        if problem:
            missing[r] = f"rank {r}'s done marker was not merged: {problem}"
        else:
            kept[r] = info
    markers = kept
    merged = SweepResult(pd.DataFrame(), keys=[p.key for p in points], done=own.done, skipped=own.skipped,
                         oom=list(own.oom), new_keys=list(own.new_keys), errors=list(own.errors),
                         busy=list(own.busy), db_notes=list(own.db_notes), db_error=own.db_error)
    told = {o.point.key: o for o in own.outcomes}
    for info in markers.values():
        merged.done += int(info.get("done", 0))
        merged.skipped += int(info.get("skipped", 0))
        merged.oom += [k for k in info.get("oom", []) if k not in merged.oom]
        merged.new_keys += info.get("new_keys", [])
        merged.errors += [(str(k), str(m)) for k, m in info.get("errors", [])]
        merged.busy += info.get("busy", [])
    by_key = {p.key: p for p in points}
    reported = {o["key"]: o for info in markers.values() for o in info.get("outcomes", []) if o.get("key") in by_key}
    frames = []
    for i, point in enumerate(points):
        if point.key in told:
            outcome = told[point.key]
        elif point.key in reported:
            o = reported[point.key]
            record = read_point(store, point.key) if o["status"] in ("ok", "oom") else None
            if o["status"] in ("ok", "oom") and record is None:  # reported finished, but no rows to show
                why = f"rank {i % world_size} reported it {o['status']}, but its point file did not parse"
                outcome = PointOutcome(point, "error", "failed", why)
                merged.errors.append((point.key, why))
            else:
                rows = record_rows(point.key, record) if record is not None else pd.DataFrame()
                outcome = PointOutcome(point, o["status"], o["run"], o.get("why", ""), rows)
        else:
            why = missing.get(i % world_size, f"rank {i % world_size} did not report it")
            outcome = PointOutcome(point, "missing", "missing", why)
        merged.outcomes.append(outcome)
        if len(outcome.rows):
            frames.append(outcome.rows)
    merged.rows = concat_rows(frames)
    return merged
