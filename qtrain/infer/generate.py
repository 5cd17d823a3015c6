"""Autoregressive generation: `generate(model, input_ids, ...)`, and the `qtrain generate` command.

`generate` decodes a (left-padded) batch in lockstep with a KV cache (or, with
`use_cache=False`, by re-running the whole sequence each step: slow, the reference the cache is
tested against). Tokens are chosen greedily or by sampling (qtrain.infer.sampling); a sequence
stops at any of the eos ids and is then filled with the pad id, as transformers does, and
decoding ends when every sequence has stopped or after `max_new_tokens`.

The command loads an HF dir, a qtrain checkpoint or a Megatron dir (qtrain.infer.loading),
formats prompts with the tokenizer's chat template (Qwen3: thinking on or off), and either
answers prompts given on the command line / in a file (txt: one prompt a line; jsonl: a
"prompt" or "instruction"[+"input"] or "messages" field) or chats in the terminal, streaming
the reply as it is decoded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Callable, Iterable, TextIO

import torch

from qtrain.cli import ArgumentParser
from qtrain.errors import ConfigError, DataError, QtrainError
from qtrain.infer import limits
from qtrain.infer.kv_cache import KVCache, cached_forward, decode_mask, padded_positions
from qtrain.infer.sampling import SamplingConfig, next_token
from qtrain.io_utils import atomic_path, check_writable_file
from qtrain.models.qwen3 import Qwen3ForCausalLM

TokenCallback = Callable[[torch.Tensor, torch.Tensor], None]


@torch.no_grad()
def generate(model: Qwen3ForCausalLM, input_ids: torch.Tensor, max_new_tokens: int, *,
             attention_mask: torch.Tensor | None = None, do_sample: bool = False, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             eos_token_ids: Iterable[int] = (), pad_token_id: int = 0, use_cache: bool = True,
             on_tokens: TokenCallback | None = None) -> torch.Tensor:
    """Prompt + generated ids [B, S + n], n <= max_new_tokens.

    input_ids: [B, S], left-padded when prompts differ in length; attention_mask: [B, S], 1 for
    real tokens and 0 for padding (None: no padding). `seed` makes sampling reproducible.
    `on_tokens(tokens [B], finished [B])` is called after each step (for streaming); a
    sequence's eos token is passed once, with finished True.
    """
    sampling = SamplingConfig(do_sample, temperature, top_k, top_p)
    sampling.validate()
    device = input_ids.device
    b, s = input_ids.shape
    eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=device)
    padded = attention_mask is not None and not bool(attention_mask.all())
    valid = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
             else attention_mask.to(device=device, dtype=torch.bool))
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    ids = input_ids
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    cache = KVCache.for_model(model, b, s + max_new_tokens) if use_cache else None
    positions = padded_positions(valid)
    step_ids, step_pos = ids, positions
    for _ in range(max_new_tokens):
        total = ids.shape[1]
        if cache is not None:
            start = cache.length
            mask = decode_mask(valid, start, total - start) if padded else None
            logits = cached_forward(model, step_ids, step_pos, cache, mask)[:, -1]
        else:
            mask = decode_mask(valid, 0, total) if padded else None
            logits = model(ids, position_ids=positions, attention_mask=mask)[:, -1]
        token = next_token(logits, sampling, generator)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        newly = ~finished & torch.isin(token, eos) if eos.numel() else torch.zeros_like(finished)
        ids = torch.cat([ids, token[:, None]], dim=1)
        valid = torch.cat([valid, torch.ones_like(token, dtype=torch.bool)[:, None]], dim=1)
        next_pos = positions[:, -1:] + 1
        positions = torch.cat([positions, next_pos], dim=1)
        step_ids, step_pos = token[:, None], next_pos
        if on_tokens is not None:
            on_tokens(token, finished | newly)
        finished = finished | newly
        if bool(finished.all()):
            break
    return ids


class TextStream:
    """Prints the text of one sequence as its tokens arrive (whole characters only)."""

    def __init__(self, tokenizer, out: TextIO | None = None, skip_ids: Iterable[int] = ()):
        self.tokenizer, self.out = tokenizer, out if out is not None else sys.stdout
        self.skip = set(skip_ids)
        self.ids: list[int] = []
        self.printed = 0

    def __call__(self, tokens: torch.Tensor, finished: torch.Tensor) -> None:
        tok = int(tokens[0])
        if tok not in self.skip:
            self.ids.append(tok)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        # A multi-byte character split over tokens decodes to U+FFFD until its last byte arrives.
        if not text.endswith("\ufffd") or bool(finished[0]):
            self._write(text)

    def _write(self, text: str) -> None:
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)

    def flush(self) -> None:
        """Print what is held back (generation may end inside a multi-byte character)."""
        self._write(self.tokenizer.decode(self.ids, skip_special_tokens=False))


# ----------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="qtrain generate", description=(
        "Generate text from an HF dir, a qtrain checkpoint or a Megatron dir. Without --prompt or "
        "--prompt-file, chat interactively (type /exit to leave, /reset to clear the history)."))
    p.add_argument("--load", required=True, help="HF model dir, qtrain save dir (or iter_XXXXXXX) or Megatron dir")
    p.add_argument("--iteration", type=int, default=None, help="checkpoint iteration (default: the tracker's)")
    p.add_argument("--lora-load", default=None, help="PEFT LoRA adapter dir to merge into the weights")
    p.add_argument("--tokenizer-name-or-path", default=None,
                   help="HF tokenizer dir (default: the one saved with --load, else the bundled Qwen3 tokenizer)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompt-file", default=None, help="prompts: .txt (one per line) or .jsonl")
    p.add_argument("--output-file", default=None, help="write {prompt, response} JSON lines here")
    p.add_argument("--no-chat-template", action="store_true", help="feed prompts as raw text (base models)")
    p.add_argument("--system", default=None, help="system message for the chat template")
    p.add_argument("--enable-thinking", action=argparse.BooleanOptionalAction, default=False,
                   help="Qwen3 thinking mode in the chat template (default: off)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate per prompt at most")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (default: sample)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    p.add_argument("--top-k", type=int, default=20, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=0.8, help="nucleus sampling probability mass (1: off)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the whole sequence every step (slow)")
    p.add_argument("--device", default="auto", help="cpu, cuda, npu or auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype (auto: bfloat16 on an accelerator, float32 on CPU)")
    return p


def read_prompts(path: str | Path) -> list:
    """Prompts from a .txt (one a line, blank lines skipped) or .jsonl file: strings or message lists."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--prompt-file {path}: no such file")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix != ".jsonl":
        return [line for line in lines if line.strip()]
    prompts: list = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e})") from None
        if isinstance(rec, str):
            prompts.append(rec)
        elif isinstance(rec, dict) and isinstance(rec.get("messages"), list):
            prompts.append(rec["messages"])
        elif isinstance(rec, dict) and "prompt" in rec:
            prompts.append(str(rec["prompt"]))
        elif isinstance(rec, dict) and "instruction" in rec:
            prompts.append("\n\n".join(x for x in (rec["instruction"], rec.get("input") or "") if x))
        else:
            raise DataError(f"{path}:{n}: expected a string or an object with 'prompt', 'instruction' or 'messages'")
    return prompts


def format_prompt(tokenizer, prompt, chat: bool, system: str | None, thinking: bool) -> list[int]:
    """Token ids of one prompt: through the chat template, or the raw text."""
    if not chat:
        if not isinstance(prompt, str):
            raise ConfigError("--no-chat-template needs plain-text prompts, not message lists")
        return tokenizer(prompt).input_ids
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system and not any(m.get("role") == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         enable_thinking=thinking)
    return tokenizer(text).input_ids


def left_pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, S], mask [B, S]) with each sequence right-aligned."""
    width = max(len(x) for x in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, seq in enumerate(batch):
        ids[i, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[i, width - len(seq):] = 1
    return ids, mask


def eos_ids(tokenizer, model: Qwen3ForCausalLM) -> list[int]:
    """Stop tokens: the model config's eos ids, the tokenizer's, and the chat turn end."""
    out = set()
    cfg_eos = model.config.eos_token_id
    out.update(cfg_eos if isinstance(cfg_eos, list) else [cfg_eos] if cfg_eos is not None else [])
    if tokenizer.eos_token_id is not None:
        out.add(tokenizer.eos_token_id)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        out.add(im_end)
    return sorted(i for i in out if i < model.config.vocab_size)


class Session:
    """A loaded model + tokenizer + decoding settings (shared by batch mode and chat)."""

    def __init__(self, args: argparse.Namespace):
        from qtrain import device as qdevice
        from qtrain.data.tokenizer import find_qwen3_tokenizer, load_hf_tokenizer
        from qtrain.infer.loading import load_model_for_inference

        dev = torch.device(qdevice.device_type() if args.device == "auto" else args.device)
        if args.dtype == "auto":
            dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
        else:
            dtype = getattr(torch, args.dtype)
        self.model, tok_dir = load_model_for_inference(args.load, dtype, dev, args.iteration, args.lora_load)
        tok_path = args.tokenizer_name_or_path or tok_dir or find_qwen3_tokenizer()
        self.tokenizer = load_hf_tokenizer(tok_path)
        self.args, self.device = args, dev
        self.eos = eos_ids(self.tokenizer, self.model)
        pad = self.tokenizer.pad_token_id
        self.pad = pad if pad is not None else (self.eos[0] if self.eos else 0)

    def new_tokens(self, batch: list[list[int]], names: list[str]) -> int:
        """Check each prompt against the model (ids, length); how many tokens may follow the longest."""
        cfg = self.model.config
        for ids, name in zip(batch, names):
            limits.check_ids(ids, cfg.vocab_size, name, limits.tokenizer_fix(self.tokenizer))
            limits.check_length(len(ids), cfg.max_position_embeddings - 1, name,
                                "shorten it (one position is needed for the reply)")
        longest = max(range(len(batch)), key=lambda i: len(batch[i]))
        room = cfg.max_position_embeddings - len(batch[longest])
        if self.args.max_new_tokens > room:
            print(f"warning: {names[longest]}: generating at most {room} tokens, not --max-new-tokens "
                  f"{self.args.max_new_tokens}: its {len(batch[longest])} tokens and the reply must fit the model's "
                  f"{cfg.max_position_embeddings} positions", file=sys.stderr)
        return min(self.args.max_new_tokens, room)

    def run(self, batch: list[list[int]], on_tokens: TokenCallback | None = None,
            names: list[str] | None = None) -> list[list[int]]:
        a = self.args
        steps = self.new_tokens(batch, names or [f"prompt {i + 1}" for i in range(len(batch))])
        ids, mask = left_pad(batch, self.pad)
        out = generate(self.model, ids.to(self.device), steps, attention_mask=mask.to(self.device),
                       do_sample=not a.greedy, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                       seed=a.seed, eos_token_ids=self.eos, pad_token_id=self.pad,
                       use_cache=not a.no_kv_cache, on_tokens=on_tokens)
        replies = []
        for row in out[:, ids.shape[1]:].tolist():
            cut = next((i for i, t in enumerate(row) if t in self.eos), len(row))
            replies.append(row[:cut])
        return replies

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _batch_mode(sess: Session, prompts: list, names: list[str]) -> None:
    a = sess.args
    with contextlib.ExitStack() as stack:
        out_file = None
        if a.output_file:  # written under a temporary name, renamed once every prompt is answered
            tmp = stack.enter_context(atomic_path(a.output_file))
            out_file = stack.enter_context(open(tmp, "w", encoding="utf-8"))
        for start in range(0, len(prompts), a.batch_size):
            chunk = prompts[start:start + a.batch_size]
            where = names[start:start + a.batch_size]
            encoded = [format_prompt(sess.tokenizer, p, not a.no_chat_template, a.system, a.enable_thinking)
                       for p in chunk]
            if len(chunk) == 1 and out_file is None:  # one prompt: stream it
                print(f">>> {chunk[0]}")
                stream = TextStream(sess.tokenizer, skip_ids=sess.eos)
                sess.run(encoded, stream, where)
                stream.flush()
                print()
                continue
            for prompt, reply in zip(chunk, sess.run(encoded, names=where)):
                text = sess.decode(reply)
                if out_file is not None:
                    out_file.write(json.dumps({"prompt": prompt, "response": text}, ensure_ascii=False) + "\n")
                print(f">>> {prompt}\n{text}\n")


def _chat(sess: Session, stdin: TextIO | None = None) -> None:
    stdin = stdin if stdin is not None else sys.stdin
    a = sess.args
    history: list[dict] = [{"role": "system", "content": a.system}] if a.system else []
    print("qtrain chat: type a message; /reset clears the history, /exit quits.", flush=True)
    while True:
        print("user> ", end="", flush=True)
        line = stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            print()
            return
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            history = history[:1] if a.system else []
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        ids = format_prompt(sess.tokenizer, history, True, None, a.enable_thinking)
        try:
            sess.new_tokens([ids], ["the conversation"])
        except QtrainError as e:  # too long for the model: keep the chat, say what to do
            print(f"{e}; type /reset to start over", flush=True)
            history.pop()
            continue
        print("assistant> ", end="", flush=True)
        stream = TextStream(sess.tokenizer, skip_ids=sess.eos)
        reply = sess.run([ids], stream, ["the conversation"])[0]
        stream.flush()
        print(flush=True)
        history.append({"role": "assistant", "content": sess.decode(reply)})


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.max_new_tokens <= 0:
        raise ConfigError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if args.batch_size <= 0:
        raise ConfigError(f"--batch-size must be positive, got {args.batch_size}")
    try:
        SamplingConfig(not args.greedy, args.temperature, args.top_k, args.top_p).validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    prompts = list(args.prompt) + (read_prompts(args.prompt_file) if args.prompt_file else [])
    names = [f"--prompt {i + 1}" for i in range(len(args.prompt))] + \
        [f"--prompt-file {args.prompt_file} prompt {i + 1}" for i in range(len(prompts) - len(args.prompt))]
    if args.output_file:
        check_writable_file(args.output_file, "--output-file")
    sess = Session(args)
    if prompts:
        _batch_mode(sess, prompts, names)
    else:
        _chat(sess)
    return 0
