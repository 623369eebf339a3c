"""Click options shared by the commands that run a model (chat, generate, bench, serve, eval)."""

from __future__ import annotations

import os

import click

EAGER_ENV = "LMCONVERT_EAGER"  # tests set it: dozens of short-lived CPU engines need no compiled step

MODEL_OPTIONS = [  # what to run and where: every command that runs a model
    click.option("--arch", default="auto", show_default=True, help="Architecture check when MODEL is a checkpoint."),
    click.option("--model-source", type=click.Choice(["hf", "modelscope"]), default=None,
                 help="Cache to search for a model id."),
    click.option("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)."),
    click.option("--dtype", default=None, help="Compute dtype bf16 | fp16 | fp32 (default: the engine's)."),
    click.option("--tp", type=click.IntRange(min=1), default=1, show_default=True,
                 help="Tensor parallelism: split the model over N GPUs of this host (N processes; gloo on CPU)."),
    click.option("--kv-int8", is_flag=True, default=False,
                 help="Store the KV cache as int8 with per-token, per-head scales: about twice the tokens."),
    click.option("--quant-policy", type=click.Choice(["0", "8"]), default=None,
                 help="LMDeploy's spelling of the KV cache type: 8 = --kv-int8, 0 = the compute dtype."),
    click.option("--threads", type=click.IntRange(min=1), default=None,
                 help="CPU: compute threads (default: one per physical core)."),
    click.option("--eager", is_flag=True, default=False,
                 help="Run the decode step op by op: no CUDA graphs (GPU), no compiled step (CPU). "
                      f"{EAGER_ENV}=1 makes it the default."),
]

SCHEDULER_OPTIONS = [  # sessions, batches and the KV cache: chat, generate, bench, serve
    click.option("--session-len", type=click.IntRange(min=2), default=None,
                 help="Max tokens of prompt + answer per session."),
    click.option("--max-batch-size", type=click.IntRange(min=1), default=128, show_default=True,
                 help="Sequences decoded together in one step."),
    click.option("--max-num-batched-tokens", type=click.IntRange(min=1), default=2048, show_default=True,
                 help="Token budget of one step (chunked prefill)."),
    click.option("--cache-max-entry-count", type=click.FloatRange(0, 1, min_open=True), default=0.8,
                 show_default=True, help="Fraction of free GPU memory given to the KV cache."),
    click.option("--cache-block-seq-len", "block_size", type=click.IntRange(min=1), default=16, show_default=True,
                 help="Tokens per KV cache block."),
    click.option("--num-cache-tokens", type=click.IntRange(min=1), default=None,
                 help="KV cache size in tokens (instead of the fraction)."),
    click.option("--overlap/--no-overlap", default=None,
                 help="Launch the next decode step before reading this one's tokens, so host work overlaps the "
                      "GPU (default: on with a GPU, off on CPU)."),
]

SAMPLING_OPTIONS = [
    click.option("--max-new-tokens", type=click.IntRange(min=1), default=512, show_default=True,
                 help="Most tokens one answer may have."),
    click.option("--temperature", type=click.FloatRange(min=0), default=None,
                 help="0 = greedy (default: the model's generation config; 0.8 when it names no sampling)."),
    click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=None,
                 help="Sample from the smallest set of tokens whose probabilities add up to P (default: the model's "
                 "generation config; 0.95 when it names no sampling)."),
    click.option("--top-k", type=click.IntRange(min=0), default=None,
                 help="Sample from the K most likely tokens (0 = off; default: the model's generation config; 40 when it "
                 "names no sampling)."),
    click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True), default=None,
                 help="Divide the logits of tokens already in the text by this (> 1 repeats less; default: the "
                 "model's generation config, else 1 = off)."),
    click.option("--seed", type=int, default=None, help="Random seed of sampling, for repeatable answers."),
    click.option("--stop", multiple=True, help="Stop string (repeatable)."),
]


def _apply(options):
    def decorator(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn
    return decorator


CHAT_TEMPLATE_OPTION = click.option(
    "--chat-template", default=None, help="A Jinja chat template file that replaces the model's own, or a shipped one: "
    "chatml-tools (ChatML with function calling, for models whose template has no tools).")

engine_options = _apply(MODEL_OPTIONS + SCHEDULER_OPTIONS)
model_options = _apply(MODEL_OPTIONS)
sampling_options = _apply(SAMPLING_OPTIONS)


def kv_int8_option(opts: dict) -> bool:
    """--kv-int8 or --quant-policy 8; the two spellings must not disagree."""
    policy = opts.get("quant_policy")
    if opts.get("kv_int8") and policy == "0":
        from lmconvert.errors import UserError

        raise UserError("--kv-int8 contradicts --quant-policy 0")
    return bool(opts.get("kv_int8")) or policy == "8"


def build_engine(model: str, opts: dict, compile_decode: bool = True, **extra):
    """compile_decode: on CPU, compile the decode step in the background (chat, serve, bench: long-lived; a
    one-shot `generate` would mostly wait for it at exit)."""
    from lmconvert.runtime import LLMEngine
    from lmconvert.templates import read_chat_template

    keys = ("arch", "model_source", "device", "dtype", "session_len", "max_batch_size", "max_num_batched_tokens",
            "cache_max_entry_count", "block_size", "num_cache_tokens", "tp", "overlap", "threads")
    template = read_chat_template(opts["chat_template"]) if opts.get("chat_template") else None
    eager = opts.get("eager") or os.environ.get(EAGER_ENV, "") not in ("", "0")
    return LLMEngine(model, **{k: opts[k] for k in keys if k in opts}, kv_int8=kv_int8_option(opts),
                     chat_template=template, use_cuda_graphs=not eager, compile_decode=compile_decode and not eager, **extra)


# chat / generate when the model's generation config names no sampling (GGUF conversions, many base models):
# llama.cpp's CLI defaults. Plain temperature 1 over the whole vocabulary lets a small or 4-bit model wander
# off within a sentence (SmolLM2 W4: "The capital of France is Haarlem", then noise).
CLI_SAMPLING = {"temperature": 0.8, "top_p": 0.95, "top_k": 40}
SAMPLING_FIELDS = ("do_sample", "temperature", "top_p", "top_k")


def build_sampling(engine, opts: dict):
    """Sampling parameters: the user's flags, else the model's generation_config, else CLI_SAMPLING."""
    from lmconvert.runtime import SamplingParams
    from lmconvert.runtime.sampling import generation_defaults

    gen = engine.generation_config or {}
    defaults = generation_defaults(gen)
    if not any(field in gen for field in SAMPLING_FIELDS):
        defaults.update(CLI_SAMPLING)
    chosen = {k: (opts[k] if opts.get(k) is not None else v) for k, v in defaults.items()}
    try:
        return SamplingParams(max_tokens=opts["max_new_tokens"], seed=opts["seed"], stop=list(opts["stop"]), **chosen)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
