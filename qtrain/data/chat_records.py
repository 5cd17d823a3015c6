"""Alpaca and ShareGPT records -> conversations, with MindSpeed-LLM 2.2.0's `--map-keys` rules.

What a record means follows MindSpeed-LLM (mindspeed_llm/tasks/preprocess/utils.py,
`convert_alpaca_to_intermediate` / `convert_sharegpt_to_intermediate`, field defaults from parser.py):

Alpaca   prompt "instruction", query "input", response "output", chosen "chosen", rejected "rejected";
         system and history are read only when --map-keys names them. The user turn is prompt and query
         joined by a newline (empty or null parts left out); history is [[prompt, reply], ...].
         A list-valued chosen field means [chosen, rejected]-style lists: chosen[0] and rejected[1].
ShareGPT messages "conversations", tags {role_tag "from", content_tag "value", user_tag "human",
         assistant_tag "gpt", observation_tag "observation", function_tag "function_call", system_tag
         "system"}; a --map-keys "tags" dict replaces *all* tags (a tag it leaves out is unset). A leading
         system turn is the system prompt; else the record's system field, read only when --map-keys names
         it (likewise tools). Turns alternate user/observation and gpt/function_call, starting with a user
         turn; instruction records end with a reply, pairwise records with a user turn plus `chosen` and
         `rejected` turns ({"from": "gpt", "value": ...}).

A field MindSpeed-LLM ignores (system, history or tools present but not named by --map-keys) is ignored
here too, and reported: each record carries `notes` that the preprocess summary counts. Records MindSpeed
silently drops (broken role order, missing content, no reply) are errors here naming the record (counted
and skipped with --skip-bad-records, which then gives MindSpeed's output). Tool definitions and
function_call turns are refused: MindSpeed-LLM 2.2.0's qwen3 template fails on them (its tool formatter
is never set up for tool_format "qwen").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from qtrain.data.readers import RecordError, check_text
from qtrain.errors import ConfigError

ALPACA_KEYS = {"prompt": "instruction", "query": "input", "response": "output", "system": None, "history": None}
SHAREGPT_KEYS = {"messages": "conversations", "system": None, "tools": None}
PAIR_KEYS = {"chosen": "chosen", "rejected": "rejected"}
SHAREGPT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
# Fields MindSpeed-LLM reads only when --map-keys names them: (map key, the field name users have).
_OPT_IN = {"alpaca": ("system", "history"), "sharegpt": ("system", "tools")}


@dataclass
class Chat:
    """A conversation: `messages` alternate prompt turns (role user / observation) and assistant turns,
    starting with a prompt turn; `system` is the system prompt or None."""

    messages: list[dict]
    system: str | None
    notes: list[tuple[str, str]] = field(default_factory=list)  # (summary kind, detail), e.g. ignored fields


@dataclass
class Pair:
    """A preference pair: the prompt turns (ending with a prompt turn) and the two replies."""

    prompt: list[dict]
    chosen: str
    rejected: str
    system: str | None
    notes: list[tuple[str, str]] = field(default_factory=list)


def _describe_keys(record: dict) -> str:
    keys = list(record)
    return ", ".join(map(repr, keys[:12])) + (", ..." if len(keys) > 12 else "") if keys else "none"


def text_field(record: dict, key: str, option: str, required: bool = True) -> str | None:
    """The string at `key` (bytes decoded, lone surrogates refused); None for a null or absent optional field."""
    value = record.get(key)
    if value is None:
        if not required:
            return None
        what = "no key" if key not in record else "a null value for"
        raise RecordError("missing key", f"{what} {key!r} (the record has {_describe_keys(record)}); set {option}")
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RecordError("not UTF-8", f"{key!r} is not valid UTF-8 (byte {exc.start})") from None
    if not isinstance(value, str):
        raise RecordError("wrong type", f"{key!r} is a {type(value).__name__}, expected a string")
    return check_text(value)


def parse_map_keys(map_keys: str | dict | None, defaults: dict, allowed: dict[str, str]) -> dict:
    """`defaults` updated by --map-keys (a JSON object or dict). `allowed` maps each key a user may give to
    why not ('' when it is allowed), so that keys another handler reads are refused with the reason."""
    if map_keys is None:
        return dict(defaults)
    example = json.dumps({k: v for k, v in defaults.items() if v})
    if isinstance(map_keys, str):
        try:
            map_keys = json.loads(map_keys)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--map-keys {map_keys!r}: not valid JSON ({exc.msg}); e.g. '{example}'") from None
    if not isinstance(map_keys, dict):
        raise ConfigError(f"--map-keys must be a JSON object, e.g. '{example}'")
    for key, value in map_keys.items():
        if key not in allowed:
            ok = sorted(k for k, why in allowed.items() if not why)
            raise ConfigError(f"--map-keys: unknown field {key!r}; this handler reads {ok}")
        if allowed[key]:
            raise ConfigError(f"--map-keys {key!r}: {allowed[key]}")
        if key != "tags" and value is not None and not isinstance(value, str):
            raise ConfigError(f"--map-keys {key!r}: give a field name (a string) or null, not {value!r}")
    return {**defaults, **map_keys}


def _require_named(keys: dict, names: tuple[str, ...]) -> None:
    for name in names:
        if not keys.get(name):
            raise ConfigError(f"--map-keys {name!r}: must name a field of the records (it is {keys.get(name)!r})")


def _ignored_fields(record: dict, keys: dict, fmt: str) -> list[tuple[str, str]]:
    notes = []
    for name in _OPT_IN[fmt]:
        if keys.get(name) is None and record.get(name) not in (None, "", [], {}):
            notes.append((f"'{name}' fields ignored (not named by --map-keys; MindSpeed-LLM ignores them too)",
                          f"add '\"{name}\": \"{name}\"' to --map-keys to use them"))
    return notes


class AlpacaRecords:
    """Alpaca records (see the module docstring) for the instruction or the pairwise handler."""

    def __init__(self, map_keys: str | dict | None = None, pairwise: bool = False):
        defaults = {**ALPACA_KEYS, **PAIR_KEYS} if pairwise else dict(ALPACA_KEYS)
        if pairwise:
            defaults.pop("response")
        allowed = {k: "" for k in defaults}
        for k in set(ALPACA_KEYS) | set(PAIR_KEYS):
            allowed.setdefault(k, "the pairwise handlers read 'chosen' and 'rejected', not 'response'" if pairwise
                               else "only AlpacaStylePairwiseHandler reads chosen/rejected answers")
        self.keys = parse_map_keys(map_keys, defaults, allowed)
        self.pairwise = pairwise
        _require_named(self.keys, ("chosen", "rejected") if pairwise else ("response",))

    def _prompt(self, record: dict) -> list[dict]:
        k = self.keys
        msgs = []
        history = record.get(k["history"]) if k["history"] else None
        if history not in (None, ""):
            if not isinstance(history, list) or not all(isinstance(t, (list, tuple)) and len(t) == 2 for t in history):
                raise RecordError("bad history", f"{k['history']!r} must be a list of [prompt, response] pairs")
            for q, a in history:
                if not isinstance(q, str) or not isinstance(a, str):
                    raise RecordError("bad history", f"{k['history']!r} holds a non-string turn")
                msgs += [{"role": "user", "content": check_text(q)}, {"role": "assistant", "content": check_text(a)}]
        parts = []
        for name in ("prompt", "query"):
            if not k[name]:
                continue
            if name == "prompt" and k[name] not in record:  # a null prompt is empty, as in MindSpeed-LLM
                text_field(record, k[name], "--map-keys prompt")  # raises: no such key
            value = text_field(record, k[name], f"--map-keys {name}", required=False)
            if value:
                parts.append(value)
        msgs.append({"role": "user", "content": "\n".join(parts)})
        return msgs

    def _system(self, record: dict) -> str | None:
        name = self.keys["system"]
        return text_field(record, name, "--map-keys system", required=False) if name else None

    def chat(self, record: dict) -> Chat:
        response = record.get(self.keys["response"])
        if isinstance(response, list):  # MindSpeed-LLM: one assistant turn per element; exactly one is usable
            if len(response) != 1:
                raise RecordError("wrong type", f"{self.keys['response']!r} is a list of {len(response)} replies; "
                                  "give one reply (a string)")
            record = {**record, self.keys["response"]: response[0]}
        reply = text_field(record, self.keys["response"], "--map-keys response")
        msgs = self._prompt(record) + [{"role": "assistant", "content": reply}]
        return Chat(msgs, self._system(record), _ignored_fields(record, self.keys, "alpaca"))

    def pair(self, record: dict) -> Pair:
        ck, rk = self.keys["chosen"], self.keys["rejected"]
        chosen = record.get(ck)
        if isinstance(chosen, list):  # [chosen, rejected] lists: MindSpeed-LLM takes chosen[0] and rejected[1]
            rejected = record.get(rk)
            if len(chosen) < 1 or not isinstance(rejected, list) or len(rejected) < 2:
                raise RecordError("bad pair", f"{ck!r} is a list: expected {ck!r}[0] and {rk!r}[1] to be the answers")
            record = {**record, ck: chosen[0], rk: rejected[1]}
        c = text_field(record, ck, "--map-keys chosen")
        r = text_field(record, rk, "--map-keys rejected")
        return Pair(self._prompt(record), c, r, self._system(record), _ignored_fields(record, self.keys, "alpaca"))


def _turn_list(msgs: list[dict]) -> str:
    return f"{len(msgs)} turn(s): " + " -> ".join(m["role"] for m in msgs)


class SharegptRecords:
    """ShareGPT records (see the module docstring) for the instruction or the pairwise handler."""

    def __init__(self, map_keys: str | dict | None = None, pairwise: bool = False):
        defaults = {**SHAREGPT_KEYS, "tags": None, **(PAIR_KEYS if pairwise else {})}
        allowed = {k: "" for k in defaults}
        for k in PAIR_KEYS:
            allowed.setdefault(k, "only SharegptStylePairwiseHandler reads chosen/rejected turns")
        allowed["kto_tag"] = "KTO data is not supported"
        self.keys = parse_map_keys(map_keys, defaults, allowed)
        tags = self.keys.pop("tags")
        self.tags_given = tags is not None
        if tags is None:
            self.tags = dict(SHAREGPT_TAGS)
        else:
            if not isinstance(tags, dict):
                raise ConfigError(f"--map-keys tags must be a JSON object, e.g. '{json.dumps(SHAREGPT_TAGS)}'")
            unknown = sorted(set(tags) - set(SHAREGPT_TAGS))
            if unknown:
                raise ConfigError(f"--map-keys tags: unknown tag(s) {unknown}; allowed: {sorted(SHAREGPT_TAGS)}")
            self.tags = {t: tags.get(t) for t in SHAREGPT_TAGS}  # MindSpeed-LLM: tags left out are unset
        if not self.tags["role_tag"] or not self.tags["content_tag"]:
            raise ConfigError("--map-keys tags: role_tag and content_tag must name the turn fields "
                              f"(they are {self.tags['role_tag']!r} and {self.tags['content_tag']!r})")
        self.pairwise = pairwise
        _require_named(self.keys, ("messages",) + (("chosen", "rejected") if pairwise else ()))

    def _turn(self, turn: Any, where: str, accept: tuple[str, ...]) -> dict:
        """{"role", "content"} of one turn whose role tag must be one of the tags named in `accept`."""
        t = self.tags
        if not isinstance(turn, dict) or t["role_tag"] not in turn or turn.get(t["content_tag"]) is None:
            raise RecordError("bad conversation", f"{where} lacks {t['role_tag']!r} or {t['content_tag']!r}")
        roles = {t[tag]: tag.removesuffix("_tag") for tag in accept if t[tag] is not None}
        role = roles.get(turn[t["role_tag"]])
        if role is None:
            want = " or ".join(repr(r) for r in roles) or "(no tag set)"
            hint = "; --map-keys tags replaces every tag: name all the roles used" if self.tags_given else ""
            raise RecordError("bad conversation", f"{where} has role {turn[t['role_tag']]!r}, expected {want}{hint}")
        if role == "function":
            raise RecordError("tools unsupported", f"{where} is a {turn[t['role_tag']]!r} turn: function calls are "
                              "not supported (MindSpeed-LLM 2.2.0's qwen3 template fails on them too)")
        return {"role": role, "content": text_field(turn, t["content_tag"], "--map-keys tags")}

    def _turns(self, record: dict) -> tuple[list[dict], str | None]:
        name, t = self.keys["messages"], self.tags
        turns = record.get(name)
        if turns is None:
            raise RecordError("missing key", f"no key {name!r} (the record has {_describe_keys(record)}); "
                              "set --map-keys messages")
        if not isinstance(turns, list):
            raise RecordError("wrong type", f"{name!r} is a {type(turns).__name__}, expected a list of turns")
        system, first = None, 0
        if t["system_tag"] and turns and isinstance(turns[0], dict) and turns[0].get(t["role_tag"]) == t["system_tag"]:
            system = text_field(turns[0], t["content_tag"], "--map-keys tags", required=False)
            first = 1
        elif self.keys["system"]:
            system = text_field(record, self.keys["system"], "--map-keys system", required=False)
        if self.keys["tools"] and record.get(self.keys["tools"]) not in (None, ""):
            raise RecordError("tools unsupported", f"{self.keys['tools']!r}: tool definitions are not supported "
                              "(MindSpeed-LLM 2.2.0's qwen3 template fails on them too); drop 'tools' from --map-keys")
        if len(turns) == first:
            raise RecordError("bad conversation", f"{name!r} holds no user/assistant turns")
        prompt_tags, reply_tags = ("user_tag", "observation_tag"), ("assistant_tag", "function_tag")
        msgs = [self._turn(turn, f"turn {i + 1}", reply_tags if (i - first) % 2 else prompt_tags)
                for i, turn in enumerate(turns) if i >= first]
        return msgs, system

    def chat(self, record: dict) -> Chat:
        msgs, system = self._turns(record)
        if len(msgs) % 2:
            raise RecordError("bad conversation", "expected alternating user/assistant turns ending with an "
                              f"assistant reply, got {_turn_list(msgs)}")
        return Chat(msgs, system, _ignored_fields(record, self.keys, "sharegpt"))

    def pair(self, record: dict) -> Pair:
        msgs, system = self._turns(record)
        if len(msgs) % 2 == 0:
            raise RecordError("bad conversation", "expected alternating user/assistant turns ending with a user "
                              f"turn (the answers are in 'chosen' and 'rejected'), got {_turn_list(msgs)}")
        answers = []
        for key in ("chosen", "rejected"):
            name = self.keys[key]
            if name not in record or record[name] is None:
                raise RecordError("missing key", f"no key {name!r} (the record has {_describe_keys(record)}); "
                                  f"set --map-keys {key}")
            answers.append(self._turn(record[name], repr(name), ("assistant_tag", "function_tag"))["content"])
        return Pair(msgs, answers[0], answers[1], system, _ignored_fields(record, self.keys, "sharegpt"))
