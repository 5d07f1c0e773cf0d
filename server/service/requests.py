"""A request at the door: a body's fields become an `EngineRequest` (the model's defaults resolved, the
class named, the server's limits checked, the seeds chosen) and the parameters its images carry. The
settings are validated here once; everything after trusts the request. The HTTP routes and the CLI's
`--local` both build requests here.
"""

from __future__ import annotations

import random
import secrets
import time
from collections.abc import Sequence

from model.cache import Cache
from model.pipeline import ModelInfo
from model.samplers import SettingError

from ..engine.request import EngineRequest
from ..settings import Settings
from .class_names import ClassNameError, class_index

MAX_SEED = 2**63 - 1
MAX_SERVER_SEED = 2**53 - 1  # seeds the server picks stay exact in a JavaScript number (a double)


class InvalidSettings(ValueError):
    """The request cannot run as asked: every (field, message) problem found."""

    def __init__(self, problems: list[tuple[str | None, str]]):
        super().__init__(problems[0][1])
        self.problems = problems


def image_seeds(seed: int | None, count: int) -> tuple[int, ...]:
    """The seeds of a request's `count` images: seed, seed + 1, ... (wrapping past MAX_SEED). Without a
    seed, a random one that keeps all of them below 2^53, so that a JavaScript client can repeat it."""
    base = seed if seed is not None else random.randrange(MAX_SERVER_SEED + 2 - count)
    return tuple((base + k) % (MAX_SEED + 1) for k in range(count))


def class_choice_problems(class_id: int | None, class_name: str | None) -> list[tuple[str, str]]:
    """The request must name its class exactly once: by `class_id` or by `class_name`."""
    if class_id is not None and class_name is not None:
        return [("class_id", "class_id and class_name were both given; send only one of them")]
    if class_id is None and class_name is None:
        return [("class_id", "a class is required: send class_id (see GET /classes) or class_name")]
    return []


def resolve_class(info: ModelInfo, class_id: int | None, class_name: str | None) -> int:
    """The class id named by `class_id` or `class_name` (exactly one of them), by the server's rule."""
    problems = class_choice_problems(class_id, class_name)
    if problems:
        raise InvalidSettings(problems)
    num_classes = len(info.class_names)
    if class_id is not None:
        if not 0 <= class_id < num_classes:
            raise InvalidSettings([("class_id", f"class_id must be below {num_classes} (see GET /classes)")])
        return class_id
    try:
        return class_index(tuple(info.class_names)).resolve(class_name)
    except ClassNameError as e:
        raise InvalidSettings([("class_name", str(e))]) from e


def limit_problems(settings: Settings, *, steps: int | None, num_images: int,
                   cfg_scale: float | None) -> list[tuple[str, str]]:
    """This server's limits (--max-steps, --max-images, --min/max-cfg-scale), beyond what any server takes."""
    problems = []
    if steps is not None and steps > settings.max_steps:
        problems.append(("steps", f"steps: at most {settings.max_steps} on this server (--max-steps), got {steps}"))
    if num_images > settings.max_images:
        problems.append(("num_images", f"num_images: at most {settings.max_images} on this server (--max-images), "
                         f"got {num_images}"))
    if cfg_scale is not None and not settings.min_cfg_scale <= cfg_scale <= settings.max_cfg_scale:
        problems.append(("cfg_scale", f"cfg_scale: between {settings.min_cfg_scale:g} and {settings.max_cfg_scale:g} "
                         f"on this server (--min-cfg-scale, --max-cfg-scale), got {cfg_scale:g}"))
    return problems


def default_cache(info: ModelInfo, settings: Settings) -> Cache:
    """The step cache of a request that names none: the server's --cache, else the model's declared default."""
    return info.defaults.cache if settings.cache is None else Settings.parse_cache(settings.cache)


def new_request(info: ModelInfo, settings: Settings, *, class_id: int | None = None, class_name: str | None = None,
                sampler: str | None = None, steps: int | None = None, cfg_scale: float | None = None,
                guidance_interval: Sequence[float] | None = None, cache=None, seed: int | None = None,
                num_images: int = 1, previews: bool = False, owner: str | None = None,
                timeout: float | None = None) -> EngineRequest:
    """The request; omitted settings take the model's defaults (the cache: the server's). Raises InvalidSettings
    listing every problem."""
    problems: list[tuple[str | None, str]] = []
    try:
        label = resolve_class(info, class_id, class_name)
    except InvalidSettings as e:
        problems += e.problems
    problems += limit_problems(settings, steps=steps, num_images=num_images, cfg_scale=cfg_scale)
    try:
        sampling = info.defaults.resolve(sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                                         guidance_interval=guidance_interval, max_steps=settings.max_steps,
                                         cache=default_cache(info, settings) if cache is None else cache)
    except SettingError as e:
        if not any(field == e.field for field, _ in problems):
            problems.append((e.field, str(e)))
    if problems:
        raise InvalidSettings(problems)
    now = time.time()
    return EngineRequest(id=secrets.token_urlsafe(12), class_id=label, seeds=image_seeds(seed, num_images),
                         sampling=sampling, arrival=now, deadline=now + (timeout or settings.request_timeout),
                         owner=owner, previews=previews)
