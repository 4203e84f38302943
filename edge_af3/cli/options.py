"""The options several commands share, declared once.

Each group is a dataclass whose fields carry their typer declaration (`Annotated[type,
typer.Option(...)]`) and their default; `@takes(load=LoadOptions, ...)` adds a group's fields to
a command's parameters (typer reads them like any other) and hands the command one instance per
group. A command that wants another default for one field says so:
`@takes(sampling=(SamplingOptions, {"max_new_tokens": 200}))`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from dataclasses import dataclass
from typing import Annotated

import typer

from ..constants import DEFAULT_MAX_NEW_TOKENS
from .common import (
    DeviceOpt,
    EncPrecOpt,
    EngineOpt,
    ExactOpt,
    KvOpt,
    ModelOpt,
    NCtxOpt,
    ThreadsOpt,
    VerifyOpt,
)

TEMP_HELP = "0 = greedy. Default: the checkpoint's generation_config.json (AF3: 0.7, top-k 20, top-p 0.8)."
PENALTY_HELP = "transformers' repetition penalty (1 = off). Default: the checkpoint's (AF3: 1.05)."
BASE_URL_HELP = (
    "Ask an OpenAI-compatible server (edge-af3 serve, vLLM) instead of loading a model; several URLs, "
    "comma-separated, are tried in order (a server that cannot be reached is passed over)."
)


@dataclass
class LoadOptions:
    """Which model, and how it is loaded (ask, chat, listen, serve)."""

    model: ModelOpt = None
    n_ctx: NCtxOpt = None
    threads: ThreadsOpt = None
    device: DeviceOpt = "auto"
    kv_type: KvOpt = None
    engine: EngineOpt = None
    exact: ExactOpt = False
    encoder_precision: EncPrecOpt = "auto"
    verify: VerifyOpt = False

    def af3_kwargs(self) -> dict:
        """The keywords of `AF3.load` these options give (the model spec apart)."""
        return dict(
            n_ctx=self.n_ctx,
            threads=self.threads,
            device=self.device,
            kv_type=self.kv_type,
            encoder_engine=self.engine,
            exact=self.exact,
            encoder_precision=self.encoder_precision,
            check_hashes=True if self.verify else None,
        )

    def check_adapter(self, adapter: str | None) -> None:
        """An --adapter the bundle named by -m does not have: refused before anything loads (a
        checkpoint source is checked once exported, at load)."""
        import json
        from pathlib import Path

        from ..errors import OptionsError

        manifest = Path(self.model or "").expanduser() / "manifest.json"
        if adapter is None or not self.model or not manifest.is_file():
            return
        try:
            have = sorted(json.loads(manifest.read_text()).get("adapters") or {})
        except (OSError, ValueError):
            return  # a broken manifest is the load's to report
        if adapter not in have:
            raise OptionsError(f"this bundle has no adapter {adapter!r}; it has: {', '.join(have) or 'none'}")

    def load(self, n_seq: int = 1):
        """The model, loaded with progress and the engine choice on stderr."""
        from .common import load_model

        kwargs = self.af3_kwargs()
        kwargs["verify"] = bool(kwargs.pop("check_hashes"))
        return load_model(self.model, n_seq=n_seq, **kwargs)

    def show_plan(self, *, as_json: bool = False) -> None:
        """`--dry-run`: the settings and memory these options would load with; loads nothing."""
        from .common import show_plan

        show_plan(
            self.model,
            n_ctx=self.n_ctx,
            kv_type=self.kv_type,
            device=self.device,
            encoder_engine=self.engine,
            exact=self.exact,
            as_json=as_json,
            export_precision=self.encoder_precision,
        )


@dataclass
class SamplingOptions:
    """How an answer is generated (ask, chat, listen); None: the checkpoint's generation_config."""

    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, help="Most tokens to generate.")] = (
        DEFAULT_MAX_NEW_TOKENS
    )
    temperature: Annotated[float | None, typer.Option("--temperature", "-t", help=TEMP_HELP)] = None
    top_p: Annotated[
        float | None, typer.Option("--top-p", help="Nucleus mass (1 = off). Default: the checkpoint's.")
    ] = None
    top_k: Annotated[
        int | None, typer.Option("--top-k", help="Keep the k likeliest (0 = off). Default: the checkpoint's.")
    ] = None
    repetition_penalty: Annotated[float | None, typer.Option("--repetition-penalty", help=PENALTY_HELP)] = None
    seed: Annotated[int, typer.Option("--seed", help="The sampler's seed.")] = 0
    ignore_eos: Annotated[
        bool, typer.Option("--ignore-eos", help="Generate exactly --max-new-tokens (benchmarks, tests).")
    ] = False

    def overrides(self) -> dict:
        """The options the user gave, as `GenerationOptions` keywords (the rest: the checkpoint's)."""
        from ..runtime.types import GenerationOptions

        given = dataclasses.asdict(self) | {"ignore_eos": self.ignore_eos or None}
        given = {k: v for k, v in given.items() if v is not None}
        GenerationOptions(**given)  # out-of-range values are refused now, before anything loads
        return given


@dataclass
class RemoteOptions:
    """A server to ask instead of a model loaded here (ask, chat)."""

    base_url: Annotated[str | None, typer.Option("--base-url", envvar="EDGE_AF3_BASE_URL", help=BASE_URL_HELP)] = None
    api_key: Annotated[
        str | None, typer.Option("--api-key", envvar="EDGE_AF3_API_KEY", help="The server's API key.")
    ] = None

    def connect_or_load(self, load: LoadOptions):
        """A server (--base-url: -m names the served model) or the model loaded here."""
        if self.base_url:
            from ..runtime import AF3

            return AF3.connect(self.base_url, api_key=self.api_key, model=load.model)
        return load.load()


def takes(**groups):
    """Decorator: the fields of each option group become parameters of the command (after its own),
    and the command receives the group as one object under the keyword it is given here."""

    def decorate(command):
        own = inspect.signature(command, eval_str=True)
        params = [p for p in own.parameters.values() if p.name not in groups]
        made = {}  # group keyword -> (class, its field names)
        for keyword, spec in groups.items():
            cls, defaults = spec if isinstance(spec, tuple) else (spec, {})
            hints = typing.get_type_hints(cls, include_extras=True)
            names = [f.name for f in dataclasses.fields(cls)]
            for f in dataclasses.fields(cls):
                default = defaults.get(f.name, f.default)
                params.append(
                    inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=hints[f.name])
                )
            made[keyword] = (cls, names)

        @functools.wraps(command)
        def run(**given):
            for keyword, (cls, names) in made.items():
                given[keyword] = cls(**{n: given.pop(n) for n in names})
            return command(**given)

        del run.__wrapped__  # typer reads the signature below, not the command's own
        run.__signature__ = own.replace(parameters=params)
        run.__annotations__ = {p.name: p.annotation for p in params} | {"return": own.return_annotation}
        return run

    return decorate
