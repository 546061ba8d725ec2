"""A model's tokenizer, loaded without transformers, tokenizing requests as vLLM does.

Loading reads ``tokenizer.json`` with the ``tokenizers`` library (Rust) and applies what
transformers' tokenizer would change on top of it, so that the ids stay those the engine sees:

- truncation and padding declared in ``tokenizer.json`` are switched off (the engine truncates
  only when a request asks, see :func:`kvgate.tokens.request.truncate`);
- ``split_special_tokens`` from ``tokenizer_config.json`` makes special tokens encode as text;
- added tokens the config declares but ``tokenizer.json`` lacks are added.

The post-processor of ``tokenizer.json`` decides which special tokens a completion prompt gets:
transformers 5 ignores the config's ``add_bos_token``/``add_eos_token`` when ``tokenizer.json``
exists (transformers 4 rebuilt the post-processor from them for some model classes).

The chat template is read from ``chat_template.jinja``, else ``chat_template.json``, else
``tokenizer_config.json``'s ``chat_template``; named templates from ``additional_chat_templates/``
(local directories only). Template variables for the named special tokens (``eos_token``, ...)
come from ``tokenizer_config.json`` (or the legacy ``special_tokens_map.json``).

Thread-safety: a ``ModelTokenizer`` holds no per-call state besides its segment cache, which is
locked; it may be called from several threads.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

from tokenizers import AddedToken, Tokenizer

from kvgate.tokens.chat import ChatDefaults, ChatTemplates, render_chat_body, render_chat_prefix
from kvgate.tokens.errors import RequestError, TokenizerLoadError, type_name
from kvgate.tokens.request import (
    RequestKind,
    add_special_tokens,
    completion_prompt,
    truncate,
)
from kvgate.tokens.segments import (
    DEFAULT_CACHE_MAX_BYTES,
    DEFAULT_LINE_CHUNK_CHARS,
    DEFAULT_MAX_PIECE_CHARS,
    EncodePlan,
    SegmentCache,
    SegmentCacheStats,
    SegmentEncoder,
)
from kvgate.tokens.template import compile_template

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
LEGACY_TEMPLATE_FILE = "chat_template.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
TEMPLATE_DIR = "additional_chat_templates"

# transformers' named special tokens: each becomes a template variable when set.
_NAMED_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True, slots=True)
class RoutingTokens:
    """What a router can know of a request's prompt tokens."""

    tokens: list[int]
    complete: bool
    """False: ``tokens`` are only a prefix of the engine's prompt (it holds media whose
    placeholder tokens cannot be predicted, or prompt embeddings), possibly empty."""


@dataclass(frozen=True, slots=True)
class TokenizerConfig:
    """How kvgate tokenizes; every field mirrors an engine flag or sizes the segment cache."""

    # Bytes of encoded pieces the segment cache may hold; 0 disables it.
    cache_max_bytes: int = DEFAULT_CACHE_MAX_BYTES
    # Pieces longer than this (in characters) are encoded without the cache.
    cache_max_piece_chars: int = DEFAULT_MAX_PIECE_CHARS
    # Pieces longer than twice this are cut at line starts into chunks at least this long, so a
    # long message that opens with text seen before reuses it; 0 never cuts.
    line_chunk_chars: int = DEFAULT_LINE_CHUNK_CHARS
    # The engine's --chat-template: a template's text (or the name of one of the model's).
    chat_template: str | None = None
    # The engine's --default-chat-template-kwargs, e.g. {"enable_thinking": False}.
    default_chat_template_kwargs: Mapping[str, Any] | None = None
    # The engine's --chat-template-content-format; "auto" reads it off the template.
    chat_template_content_format: Literal["auto", "string", "openai"] = "auto"

    def __post_init__(self) -> None:
        if self.cache_max_bytes < 0:
            raise ValueError(f"cache_max_bytes must be >= 0, got {self.cache_max_bytes}")
        if self.cache_max_piece_chars < 1:
            raise ValueError(
                f"cache_max_piece_chars must be >= 1, got {self.cache_max_piece_chars}"
            )
        if self.line_chunk_chars < 0:
            raise ValueError(f"line_chunk_chars must be >= 0, got {self.line_chunk_chars}")
        if self.chat_template_content_format not in ("auto", "string", "openai"):
            raise ValueError(
                "chat_template_content_format must be 'auto', 'string' or 'openai', got "
                f"{self.chat_template_content_format!r}"
            )


class ModelTokenizer:
    """A model's tokenizer and chat template: request bodies in, the engine's token ids out."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        tokenizer_config: Mapping[str, Any],
        templates: ChatTemplates,
        *,
        source: str,
        path: Path,
        config: TokenizerConfig | None = None,
        special_tokens_map: Mapping[str, Any] | None = None,
    ) -> None:
        """Wrap an already loaded ``tokenizer`` (prefer :meth:`load`).

        ``special_tokens_map`` is the legacy ``special_tokens_map.json``, consulted only when the
        config has no ``added_tokens_decoder``, as transformers does.
        """
        self.config = config or TokenizerConfig()
        self.source = source
        self.path = path
        try:
            _align_with_transformers(tokenizer, tokenizer_config, special_tokens_map)
        except TokenizerLoadError as exc:
            raise TokenizerLoadError(f"{CONFIG_FILE} of {source}: {exc}") from exc
        self._tokenizer = tokenizer
        self.special_tokens = _special_token_strings(tokenizer_config, special_tokens_map)
        self._templates = templates
        self._chat_defaults = ChatDefaults(
            chat_template=self.config.chat_template,
            chat_template_kwargs=self.config.default_chat_template_kwargs,
            content_format=self.config.chat_template_content_format,
        )
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        eos = self.special_tokens.get("eos_token")
        self.eos_token_id: int | None = tokenizer.token_to_id(eos) if eos is not None else None
        self._encoder = SegmentEncoder(
            tokenizer,
            SegmentCache(self.config.cache_max_bytes, self.config.cache_max_piece_chars),
            self.vocab_size,
            line_chunk_chars=self.config.line_chunk_chars,
        )
        for name, template in _all_templates(templates):
            try:
                compile_template(template)
            except Exception as exc:
                raise TokenizerLoadError(
                    f"the chat template {name!r} of {source} is not valid Jinja: {exc}"
                ) from exc

    @classmethod
    def load(
        cls,
        source: str | os.PathLike[str],
        *,
        revision: str | None = None,
        config: TokenizerConfig | None = None,
    ) -> ModelTokenizer:
        """Load from a local directory, or by model id from the Hugging Face hub.

        A directory needs ``tokenizer.json``; ``tokenizer_config.json`` and the template files
        are optional (without a template only completions can be tokenized). A hub id downloads
        just those files (honouring ``HF_HUB_OFFLINE`` and the hub cache); ``revision`` pins a
        branch, tag or commit and only applies to hub ids.
        """
        name = os.fspath(source)
        local = Path(name).expanduser()
        if local.is_dir():
            if revision is not None:
                raise TokenizerLoadError(
                    f"revision={revision!r} applies to hub model ids, but {name} is a local "
                    "directory"
                )
            files = _local_files(local)
            path = local
        elif local.exists():
            raise TokenizerLoadError(
                f"{name} is a file; expected a directory holding {TOKENIZER_FILE} or a hub model id"
            )
        elif _HUB_ID.match(name):
            files = _hub_files(name, revision)
            path = files[TOKENIZER_FILE].parent
        else:
            raise TokenizerLoadError(f"no directory {name}, and it is not a hub model id either")
        return cls._from_files(files, source=name, path=path, config=config)

    @classmethod
    def _from_files(
        cls, files: Mapping[str, Path], *, source: str, path: Path, config: TokenizerConfig | None
    ) -> ModelTokenizer:
        tokenizer_file = files[TOKENIZER_FILE]
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:
            raise TokenizerLoadError(f"cannot load {tokenizer_file}: {exc}") from exc
        tokenizer_config = _read_json(files.get(CONFIG_FILE)) or {}
        special_tokens_map = _read_json(files.get(SPECIAL_TOKENS_FILE))
        legacy = _read_json(files.get(LEGACY_TEMPLATE_FILE))
        templates = _chat_templates(
            tokenizer_config.get("chat_template"),
            _read_text(files.get(TEMPLATE_FILE)),
            legacy.get("chat_template") if legacy else None,
            {
                key.removeprefix(f"{TEMPLATE_DIR}/"): _read_text(file) or ""
                for key, file in files.items()
                if key.startswith(f"{TEMPLATE_DIR}/")
            },
            source,
        )
        return cls(
            tokenizer,
            tokenizer_config,
            templates,
            source=source,
            path=path,
            config=config,
            special_tokens_map=special_tokens_map,
        )

    # -- plain tokenizer -------------------------------------------------------------------

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text`` (through the segment cache when that is exact)."""
        return self._encoder.encode(text, add_special_tokens=add_special_tokens)

    def encode_cold(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text`` without the cache: the reference :meth:`encode` must equal."""
        return self._encoder.encode_cold(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], *, skip_special_tokens: bool = False) -> str:
        text: str = self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        return text

    def id_to_token(self, token_id: int) -> str | None:
        token: str | None = self._tokenizer.id_to_token(token_id)
        return token

    def token_to_id(self, token: str) -> int | None:
        token_id: int | None = self._tokenizer.token_to_id(token)
        return token_id

    @property
    def segment_cache_exact(self) -> bool:
        """False when this tokenizer's added tokens make piecewise encoding unsafe (always cold)."""
        return self._encoder.exact

    def cache_stats(self) -> SegmentCacheStats:
        return self._encoder.cache.stats()

    def clear_cache(self) -> None:
        self._encoder.cache.clear()

    # -- requests -------------------------------------------------------------------------

    def render_chat(self, body: Mapping[str, Any]) -> str:
        """The prompt text vLLM renders for a ``/v1/chat/completions`` body."""
        return render_chat_body(
            _body(body), self._templates, self.special_tokens, self._chat_defaults
        )

    def tokenize_chat(self, body: Mapping[str, Any], *, cached: bool = True) -> list[int]:
        """The prompt token ids vLLM computes for a ``/v1/chat/completions`` body.

        ``cached=False`` encodes without the segment cache (for comparison and benchmarks).
        """
        text = _unicode(self.render_chat(body), "messages")
        special = add_special_tokens(body, default=False)
        encode = self.encode if cached else self.encode_cold
        return truncate(encode(text, add_special_tokens=special), body)

    def tokenize_completion(self, body: Mapping[str, Any], *, cached: bool = True) -> list[int]:
        """The prompt token ids vLLM computes for a ``/v1/completions`` body.

        A text prompt is tokenized without any template, adding the tokenizer's special tokens
        (BOS/EOS, per its post-processor) unless ``add_special_tokens`` is false; token ids pass
        through unchanged after a vocabulary check. A batch of prompts is routed on its first one
        (see :func:`kvgate.tokens.request.completion_prompt`).
        """
        body = _body(body)
        prompt = completion_prompt(body, self.vocab_size)
        special = add_special_tokens(body, default=True)
        if isinstance(prompt, str):
            encode = self.encode if cached else self.encode_cold
            prompt = encode(_unicode(prompt, "prompt"), add_special_tokens=special)
        return truncate(prompt, body)

    def tokenize_for_routing(self, body: Mapping[str, Any], kind: RequestKind) -> RoutingTokens:
        """The tokens a router can match for a request the engine accepts: all of them for
        text, else the known prefix (see :func:`kvgate.tokens.chat.render_chat_prefix`) without
        its last token, which may merge with what follows it in the engine's prompt. Nothing
        when the request asks to truncate a prompt that is only partly known (the kept part is
        unknown) or sends prompt embeddings instead of a prompt."""
        return self.plan_for_routing(body, kind).finish()

    def plan_for_routing(self, body: Mapping[str, Any], kind: RequestKind) -> RoutingPlan:
        """:meth:`tokenize_for_routing` in two steps: this one renders the prompt and looks its
        pieces up in the segment cache (cheap: it may run on an event loop); the plan's
        ``finish`` encodes what the cache missed (``missing_chars``: the work a thread could
        take) and returns what :meth:`tokenize_for_routing` returns."""
        body = _body(body)
        if kind == "completions":
            if body.get("prompt") is None and body.get("prompt_embeds") is not None:
                return RoutingPlan.ready(RoutingTokens([], complete=False))
            prompt = completion_prompt(body, self.vocab_size)
            special = add_special_tokens(body, default=True)
            if not isinstance(prompt, str):
                return RoutingPlan.ready(RoutingTokens(truncate(prompt, body), complete=True))
            plan = self._encoder.plan(_unicode(prompt, "prompt"), add_special_tokens=special)
            return RoutingPlan(plan.missing_chars, plan, partial(_whole_prompt, body))
        if kind != "chat":
            raise ValueError(f"unknown request kind {kind!r}")
        rendered = render_chat_prefix(
            body, self._templates, self.special_tokens, self._chat_defaults
        )
        plan = self._encoder.plan(
            _unicode(rendered.text, "messages"),
            add_special_tokens=add_special_tokens(body, default=False),
        )
        if rendered.complete:
            return RoutingPlan(plan.missing_chars, plan, partial(_whole_prompt, body))
        return RoutingPlan(plan.missing_chars, plan, partial(_known_prefix, body))

    def tokenize_request(self, body: Mapping[str, Any], kind: RequestKind) -> list[int]:
        """:meth:`tokenize_chat` or :meth:`tokenize_completion`, by ``kind``."""
        if kind == "chat":
            return self.tokenize_chat(body)
        if kind == "completions":
            return self.tokenize_completion(body)
        raise ValueError(f"unknown request kind {kind!r}")

    def __repr__(self) -> str:
        return f"ModelTokenizer({self.source!r}, vocab_size={self.vocab_size})"


@dataclass(frozen=True, slots=True)
class RoutingPlan:
    """A request's routing tokens, rendered and looked up in the segment cache, not yet encoded."""

    missing_chars: int
    """Characters of prompt text the tokenizer still has to encode (0: nothing left to do)."""
    _plan: EncodePlan | None
    _done: Callable[[list[int]], RoutingTokens]

    @classmethod
    def ready(cls, tokens: RoutingTokens) -> RoutingPlan:
        return cls(0, None, lambda _: tokens)

    def finish(self) -> RoutingTokens:
        """Encode what the cache missed (thread-safe: may run off the event loop)."""
        return self._done(self._plan.finish() if self._plan is not None else [])


def _whole_prompt(body: Mapping[str, Any], ids: list[int]) -> RoutingTokens:
    return RoutingTokens(truncate(ids, body), complete=True)


def _known_prefix(body: Mapping[str, Any], ids: list[int]) -> RoutingTokens:
    if body.get("truncate_prompt_tokens") is not None:
        return RoutingTokens([], complete=False)
    return RoutingTokens(ids[:-1], complete=False)


def _body(body: object) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise RequestError("body", f"expected a JSON object, got {type_name(body)}")
    return body


# -- loading ------------------------------------------------------------------------------


def _local_files(directory: Path) -> dict[str, Path]:
    if not (directory / TOKENIZER_FILE).is_file():
        raise TokenizerLoadError(
            f"no {TOKENIZER_FILE} in {directory} (kvgate needs the fast-tokenizer file; looked "
            f"for {TOKENIZER_FILE}, {CONFIG_FILE}, {TEMPLATE_FILE} and {LEGACY_TEMPLATE_FILE})"
        )
    names = (TOKENIZER_FILE, CONFIG_FILE, TEMPLATE_FILE, LEGACY_TEMPLATE_FILE, SPECIAL_TOKENS_FILE)
    files = {name: directory / name for name in names if (directory / name).is_file()}
    template_dir = directory / TEMPLATE_DIR
    if template_dir.is_dir():
        for template in sorted(template_dir.glob("*.jinja")):
            files[f"{TEMPLATE_DIR}/{template.stem}"] = template
    return files


def _hub_files(repo_id: str, revision: str | None) -> dict[str, Path]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    where = f"{repo_id!r} (revision {revision or 'main'}) on the Hugging Face hub"
    files: dict[str, Path] = {}
    optional = (CONFIG_FILE, TEMPLATE_FILE, LEGACY_TEMPLATE_FILE, SPECIAL_TOKENS_FILE)
    for name in (TOKENIZER_FILE, *optional):
        try:
            files[name] = Path(hf_hub_download(repo_id, name, revision=revision))
        except (EntryNotFoundError, LocalEntryNotFoundError) as exc:
            if name in optional:
                # Offline, an optional file missing from the cache is indistinguishable from one
                # missing from the repository: both leave the tokenizer usable.
                logger.debug("no %s for %s: %s", name, where, exc)
                continue
            hint = (
                " (offline, or the hub is unreachable, and the file is not in the local cache)"
                if isinstance(exc, LocalEntryNotFoundError)
                else ""
            )
            raise TokenizerLoadError(f"cannot fetch {name} of {where}{hint}: {exc}") from exc
        except Exception as exc:
            raise TokenizerLoadError(f"cannot fetch {name} of {where}: {exc}") from exc
    return files


def _read_json(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenizerLoadError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise TokenizerLoadError(f"{path} holds {type_name(data)}, expected a JSON object")
    return data


def _read_text(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, ValueError) as exc:
        raise TokenizerLoadError(f"cannot read {path}: {exc}") from exc


def _chat_templates(
    in_config: object,
    from_file: str | None,
    from_legacy_file: object,
    named: Mapping[str, str],
    source: str,
) -> ChatTemplates:
    templates: dict[str, str] = {}
    default: object = from_file if from_file is not None else from_legacy_file
    if default is None:
        default = in_config
    if isinstance(default, list):
        # [{"name": ..., "template": ...}, ...], the config's form of several templates
        for entry in default:
            if not (
                isinstance(entry, Mapping)
                and isinstance(entry.get("name"), str)
                and isinstance(entry.get("template"), str)
            ):
                raise TokenizerLoadError(
                    f"{source}: a chat_template list entry must have a string name and template"
                )
            templates[entry["name"]] = entry["template"]
        default = None
    elif default is not None and not isinstance(default, str):
        raise TokenizerLoadError(f"{source}: chat_template is {type_name(default)}, not a string")
    templates.update(named)
    if not templates:
        return ChatTemplates(default=default)
    if default is not None:
        templates["default"] = default
    if set(templates) == {"default"}:
        return ChatTemplates(default=templates["default"])
    return ChatTemplates(named=templates)


def _all_templates(templates: ChatTemplates) -> list[tuple[str, str]]:
    found = list((templates.named or {}).items())
    if templates.default is not None:
        found.append(("default", templates.default))
    return found


def _token_content(value: object) -> str | None:
    # tokenizer_config stores a special token as a string or as a serialised AddedToken.
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        content: str = value["content"]
        return content
    return None


def _special_token_strings(
    tokenizer_config: Mapping[str, Any], special_tokens_map: Mapping[str, Any] | None
) -> dict[str, str]:
    """The named special tokens transformers passes to chat templates, by variable name."""
    values = dict(tokenizer_config)
    if special_tokens_map and "added_tokens_decoder" not in tokenizer_config:
        values.update(special_tokens_map)
    names = list(_NAMED_SPECIAL_TOKENS)
    extra = values.get("extra_special_tokens")
    if isinstance(extra, Mapping):
        # Model-specific named tokens (e.g. Gemma's image_token) become variables too.
        names += [name for name in extra if name not in names]
        values = {**extra, **values}
    found = {}
    for name in names:
        content = _token_content(values.get(name))
        if content is not None:
            found[name] = content
    return found


def _align_with_transformers(
    tokenizer: Tokenizer,
    tokenizer_config: Mapping[str, Any],
    special_tokens_map: Mapping[str, Any] | None,
) -> None:
    """Make ``tokenizer`` encode as transformers' tokenizer built from the same files does."""
    tokenizer.no_truncation()
    tokenizer.no_padding()
    split_special = tokenizer_config.get("split_special_tokens", False)
    if not isinstance(split_special, bool):
        raise TokenizerLoadError(f"split_special_tokens is {type_name(split_special)}, not bool")
    tokenizer.encode_special_tokens = split_special

    present = {token.content for token in tokenizer.get_added_tokens_decoder().values()}
    missing: list[AddedToken] = []
    declared = tokenizer_config.get("added_tokens_decoder") or {}
    if not isinstance(declared, Mapping):
        raise TokenizerLoadError(f"added_tokens_decoder is {type_name(declared)}, not an object")
    try:
        # By id, as transformers adds them: the ids the Rust tokenizer assigns follow the order.
        ordered = [token for _, token in sorted(declared.items(), key=lambda item: int(item[0]))]
    except ValueError as exc:
        raise TokenizerLoadError(f"added_tokens_decoder has a non-integer id: {exc}") from exc
    for token in ordered:
        if not isinstance(token, Mapping):
            raise TokenizerLoadError(f"malformed added_tokens_decoder entry {token!r}")
        if token.get("content") not in present:
            missing.append(_added_token(token))
            present.add(token["content"])
    for name, content in _special_token_strings(tokenizer_config, special_tokens_map).items():
        if content not in present and name in _NAMED_SPECIAL_TOKENS:
            missing.append(AddedToken(content, special=True, normalized=False))
            present.add(content)
    if missing:
        logger.debug("adding tokens declared in the config but not in tokenizer.json: %s", missing)
        tokenizer.add_tokens(missing)


def _added_token(token: Mapping[str, Any]) -> AddedToken:
    try:
        return AddedToken(
            token["content"],
            single_word=bool(token.get("single_word", False)),
            lstrip=bool(token.get("lstrip", False)),
            rstrip=bool(token.get("rstrip", False)),
            normalized=bool(token.get("normalized", not token.get("special", False))),
            special=bool(token.get("special", False)),
        )
    except (KeyError, TypeError) as exc:
        raise TokenizerLoadError(f"malformed added_tokens_decoder entry {token!r}") from exc


def _unicode(text: str, field: str) -> str:
    """``text`` if it is Unicode text. JSON can escape lone surrogates (``"\\ud800"``), which
    Python keeps in a str but no tokenizer takes (the engine's fails on them too)."""
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError as err:
            raise RequestError(
                field, f"holds a lone surrogate (character {err.start}), which is not text"
            ) from None
    return text
