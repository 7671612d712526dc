"""Sweeps: profile every architecture at every point of a one- or two-field grid, resumably.

Each point is keyed by its parameters (a hash of their canonical JSON) and written, once finished, to
``<out>/points/<key>.json`` atomically; a rerun skips points whose file exists, so an interrupted
sweep resumes where it stopped and a finished point is never redone. A point that runs out of memory
is finished too: it is recorded with status ``oom`` (one row, metric ``oom``) and the sweep goes on.
Any other failure is reported and not recorded, so the next run retries it.

Visual tokens are not a model setting; ``visual_tokens=N`` is mapped to the workload like this:
if N is a multiple of the vision tower's tokens per image (576 for CLIP ViT-L/14-336), the point uses
N / 576 images per sample at the preset's resolution (images adjacent, no text between them);
otherwise N must be a square s², and the point uses one image of s × patch pixels (e.g. 144 → 168 px
with 14-px patches). Anything else is rejected with the nearest valid counts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from mllm_bench.config import ConfigError, VisionConfig
from mllm_bench.config import replace as replace_config
from mllm_bench.presets import LLM_PRESETS, vision_preset
from mllm_bench.results import atomic_write_text, concat_rows, rows_to_json, write_rows
from mllm_bench.workload import Workload

VARY_FIELDS: tuple[str, ...] = (
    "visual_tokens", "text_tokens", "text_after", "text_before", "image_size", "images_per_sample", "llm",
    "batch_size", "generate_tokens",
)
ProfileFn = Callable[..., pd.DataFrame]


def parse_vary(specs: Sequence[str]) -> dict[str, list[Any]]:
    """``["visual_tokens=144,576", "llm=vicuna-7b,vicuna-13b"]`` → {field: values}; one or two fields."""
    if not 1 <= len(specs) <= 2:
        raise ConfigError(f"--vary takes one or two fields, got {len(specs)}; fields: {list(VARY_FIELDS)}")
    out: dict[str, list[Any]] = {}
    for spec in specs:
        name, sep, raw = spec.partition("=")
        name = name.strip()
        if not sep or name not in VARY_FIELDS:
            raise ConfigError(f"--vary {spec!r}: expected FIELD=v1,v2,... with FIELD one of {list(VARY_FIELDS)}")
        if name in out:
            raise ConfigError(f"--vary names {name!r} twice")
        values = [v.strip() for v in raw.split(",") if v.strip()]
        if not values:
            raise ConfigError(f"--vary {name}: no values given (expected {name}=v1,v2,...)")
        if name == "llm":
            bad = [v for v in values if v not in LLM_PRESETS]
            if bad:
                raise ConfigError(f"--vary llm: unknown preset(s) {bad}; choose from {sorted(LLM_PRESETS)}")
            out[name] = values
        else:
            try:
                out[name] = [int(v) for v in values]
            except ValueError as err:
                raise ConfigError(f"--vary {name}: values must be integers, got {values}") from err
            if any(v < 0 for v in out[name]):
                raise ConfigError(f"--vary {name}: values must be >= 0, got {out[name]}")
    if {"visual_tokens", "image_size"} <= set(out) or {"visual_tokens", "images_per_sample"} <= set(out):
        raise ConfigError("--vary visual_tokens sets images_per_sample/image_size itself; vary only one of them")
    return out


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
    vcfg = vision_preset(vision)
    points = []
    for combo in itertools.product(*(vary[n] for n in names)):
        values = dict(zip(names, combo, strict=True))
        point_llm = values.get("llm", llm)
        changes: dict[str, Any] = {}
        for name, value in values.items():
            if name == "visual_tokens":
                changes["images_per_sample"], size = visual_tokens_to_workload(value, vcfg)
                changes["image_size"] = None if size == vcfg.image_size else size
            elif name == "text_tokens":
                after = value - base.text_before - max(base.images_per_sample - 1, 0) * base.text_between
                if after < 0:
                    raise ConfigError(f"text_tokens={value} is below text_before={base.text_before}; text_tokens "
                                      "sets text_after = text_tokens - text_before (keep text_before smaller)")
                changes["text_after"] = after
            elif name != "llm":
                changes[name] = value
        workload = base.replace(**changes)
        if workload.image_size is not None:
            replace_config(vcfg, image_size=workload.image_size)  # validates against the patch size
        for arch in archs:
            points.append(Point(arch, point_llm, vision, tuple(sorted(options.get(arch, {}).items())),
                                tuple(sorted(dataclasses.asdict(workload).items())), measure,
                                tuple(values.items())))
    return points


def is_oom(err: BaseException) -> bool:
    """Out of memory on any device: torch's OutOfMemoryError, MemoryError, or the CPU allocator's message."""
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


@dataclass
class SweepResult:
    rows: pd.DataFrame
    done: int = 0
    skipped: int = 0
    oom: list[str] = field(default_factory=list)  # every point out of memory, in this run or an earlier one
    new_keys: list[str] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)


def _status_row(point: Point, vision: VisionConfig, status: str, message: str) -> pd.DataFrame:
    w = point.make_workload()
    return pd.DataFrame([{
        "arch": point.arch, "llm": point.llm, "vision": point.vision,
        "options": json.dumps(dict(point.options), sort_keys=True) if point.options else "",
        "metric": status, "value": 1.0, "unit": "", "source": "", "scope": "", "convention": "", "component": "",
        "role": "", "stage": w.stage, "phase": "", "batch_size": w.batch_size,
        "images_per_sample": w.images_per_sample, "image_size": w.image_size or vision.image_size,
        "visual_tokens": w.images_per_sample * vision.tokens_per_image, "text_tokens": w.num_text_tokens,
        "text_before": w.text_before, "text_after": w.text_after, "generate_tokens": w.generate_tokens,
        "dtype": w.dtype, "device": w.device, "error": message[:500],
    }])


def run_sweep(
    points: Sequence[Point], out_dir: str | Path, profile_fn: ProfileFn,
    on_point: Callable[[Point, str], None] | None = None, rank: int = 0, world_size: int = 1,
) -> SweepResult:
    """Profile each point not yet finished in ``out_dir``; returns every finished point's rows.

    ``on_point(point, status)`` is called after each point (status ok, oom, skipped or error).
    With ``world_size`` > 1 this rank takes every ``world_size``-th point.
    """
    out = Path(out_dir)
    (out / "points").mkdir(parents=True, exist_ok=True)
    result = SweepResult(pd.DataFrame())
    frames = []
    for point in list(points)[rank::world_size]:
        path = out / "points" / f"{point.key}.json"
        if path.exists():
            rows, status = _read_point(path)
            frames.append(rows)
            result.skipped += 1
            if status == "oom":  # finished earlier as out of memory: still part of the sweep's outcome
                result.oom.append(point.key)
            if on_point:
                on_point(point, "skipped")
            continue
        vision = point.vision_config()
        try:
            rows = profile_fn(point.arch, point.make_workload(), llm=point.llm, vision=vision,
                              options=dict(point.options) or None, measure=point.measure)
            rows = rows.assign(status="ok", error="")
            status = "ok"
        except Exception as err:  # noqa: BLE001 - OOM is recorded, anything else reported and retried next run
            if not is_oom(err):
                result.errors.append((point.key, f"{point.arch} {dict(point.values)}: {type(err).__name__}: {err}"))
                if on_point:
                    on_point(point, "error")
                continue
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            rows = _status_row(point, vision, "oom", f"{type(err).__name__}: {err}").assign(status="oom")
            status = "oom"
            result.oom.append(point.key)
        rows = rows.assign(sweep_key=point.key, vision=point.vision)
        atomic_write_text(path, json.dumps({"params": point.params(), "values": dict(point.values),
                                            "status": status, "rows": json.loads(rows_to_json(rows))}) + "\n")
        frames.append(rows)
        result.done += 1
        result.new_keys.append(point.key)
        if on_point:
            on_point(point, status)
    result.rows = concat_rows(frames)
    return result


def _read_point(path: Path) -> tuple[pd.DataFrame, str]:
    """A finished point's rows and status (ok or oom)."""
    data = json.loads(path.read_text())
    return pd.DataFrame.from_records(data["rows"]), data.get("status", "ok")


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
                base: Workload, vision: str | VisionConfig) -> list[Path]:
    """The combined tidy rows (JSON + CSV) and a manifest naming what was varied (and, for visual tokens,
    how each count was realised). ``oom`` lists every point out of memory, whether it ran now or earlier."""
    out = Path(out_dir)
    paths = []
    if len(result.rows):
        paths += [write_rows(result.rows, out / "results.json"), write_rows(result.rows, out / "results.csv")]
    manifest = {"vary": vary, "archs": list(archs), "base_workload": dataclasses.asdict(base),
                "points_finished": result.done + result.skipped, "points_done": result.done,
                "points_skipped": result.skipped, "oom": result.oom, "errors": [m for _, m in result.errors]}
    if "visual_tokens" in vary:
        manifest["visual_tokens_mapping"] = visual_tokens_note(vary["visual_tokens"], vision)
    paths.append(atomic_write_text(out / "sweep.json", json.dumps(manifest, indent=1) + "\n"))
    return paths
