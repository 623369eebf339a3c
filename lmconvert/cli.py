"""The `lmconvert` command line: parse arguments, call one stage entry point per command."""

from __future__ import annotations

import os
import signal
import sys

import click

from lmconvert.cli_options import (CHAT_TEMPLATE_OPTION, build_engine, build_sampling, engine_options, model_options,
                                   sampling_options)
from lmconvert.devices import bound_onednn_cache
from lmconvert.errors import DEBUG_ENV, UserError, debug_enabled, one_line
from lmconvert.presets import PRESETS


class Group(click.Group):
    """Turns every error into one `error: ...` line and exit 1: user and OS errors as they are, anything else
    as an internal error with its type. `--debug` shows the traceback instead."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise  # click's own usage errors, --help and Ctrl-C already print what they should
        except Exception as e:
            if debug_enabled():
                raise
            click.echo(f"error: {one_line(e)}", err=True)
            sys.exit(1)


def _terminate(signum, frame):
    """SIGTERM (kill, docker stop, a CI timeout) unwinds like Ctrl-C: half-written engines are removed."""
    raise SystemExit(128 + signum)


@click.group(cls=Group, invoke_without_command=True)
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="lmconvert", message="lmconvert %(version)s")
@click.pass_context
def main(ctx: click.Context, debug: bool):
    """Convert, quantize and run open LLM checkpoints."""
    if ctx.invoked_subcommand is None:  # bare `lmconvert`: the help, not a usage error
        click.echo(ctx.get_help())
        return
    # the flag reaches tensor-parallel ranks (inherited) and the server's threads through the environment
    if debug:
        os.environ[DEBUG_ENV] = "1"
    else:
        os.environ.pop(DEBUG_ENV, None)
    bound_onednn_cache()  # before any command's first CPU matmul, which fixes the cache's size
    signal.signal(signal.SIGTERM, _terminate)


ARCH_HELP = "Architecture (qwen3, qwen2, llama, mistral) or 'auto'; checked against the checkpoint's config."


@main.command()
@click.argument("arch")
@click.argument("src", required=False)
@click.option("--dst-path", required=True, help="Engine directory to create.")
@click.option("--dtype", default=None, help="bf16 | fp16 | fp32 (default: the checkpoint's; bf16 for quantized GGUF).")
@click.option("--overwrite", is_flag=True, help="Replace an existing engine directory.")
@click.option("--model-source", type=click.Choice(["hf", "modelscope"]), default=None,
              help="Cache to search for a model id (env LMCONVERT_USE_MODELSCOPE=1 selects modelscope).")
@click.option("--from-config", default=None, help="Build from a config instead of SRC: a config.json or a preset "
              f"({', '.join(PRESETS)}). Needs --random-weights.")
@click.option("--random-weights", is_flag=True, help="Fill the --from-config model with seeded random weights.")
@click.option("--w4", is_flag=True, help="With --random-weights: random W4 tensors in the engine layout.")
@click.option("--w8", is_flag=True, help="With --random-weights: random W8 tensors in the engine layout.")
@click.option("--group-size", type=click.IntRange(min=1), default=None,
              help="Input channels per scale: --w4 128, 64 or 32 (default: the largest that divides every linear); "
              "--w8 default one scale per output channel.")
@click.option("--quant-lm-head", is_flag=True, help="With --w4 / --w8: a random INT8 per-channel lm_head as well.")
@CHAT_TEMPLATE_OPTION
def convert(arch: str, src: str | None, dst_path: str, dtype: str | None, overwrite: bool, model_source: str | None,
            from_config: str | None, random_weights: bool, w4: bool, w8: bool, group_size: int | None,
            quant_lm_head: bool, chat_template: str | None):
    """Convert SRC (HF / ModelScope dir, GGUF file, cached model id, or 'smollm2') into an engine directory."""
    from lmconvert.convert import convert as run_convert, convert_random
    from lmconvert.templates import read_chat_template

    template = read_chat_template(chat_template) if chat_template else None
    if from_config or random_weights:
        if template is not None:
            raise UserError("--chat-template goes with a checkpoint: random engines have a stand-in tokenizer")
        if src or not (from_config and random_weights):
            raise UserError("--from-config and --random-weights go together, without SRC")
        if w4 and w8:
            raise UserError("choose one of --w4 and --w8")
        if quant_lm_head and not (w4 or w8):
            raise UserError("--quant-lm-head goes with --w4 or --w8")
        quant = {"bits": 4 if w4 else 8, "group_size": group_size, "quantize_lm_head": quant_lm_head} if (w4 or w8) else None
        path = convert_random(from_config, dst_path, arch=arch, dtype=dtype or "bf16", quant=quant, overwrite=overwrite)
    elif quant_lm_head:
        raise UserError("--quant-lm-head: quantize a checkpoint with `lmconvert quantize --quant-lm-head`")
    elif src is None:
        raise UserError("missing SRC: a checkpoint directory, GGUF file or model id (or --from-config)")
    else:
        path = run_convert(src, dst_path, arch=arch, dtype=dtype, overwrite=overwrite, model_source=model_source,
                           chat_template=template)
    click.echo(f"engine written to {path}")


@main.command()
@click.argument("path")
@click.option("--verify", is_flag=True, help="Also check the sha256 of every file.")
def info(path: str, verify: bool):
    """Describe an engine directory: architecture, sizes, dtype, quantization, files."""
    from lmconvert.engine.info import print_info

    print_info(path, verify=verify)


@main.command()
@click.argument("model")
@click.option("--no-think", is_flag=True, help="Ask Qwen3-style models not to think (enable_thinking=False).")
@click.option("--system", default=None, help="System prompt.")
@CHAT_TEMPLATE_OPTION
@engine_options
@sampling_options
def chat(model: str, no_think: bool, system: str | None, **opts):
    """Chat with MODEL (engine dir or checkpoint). Reads one prompt per line when stdin is not a terminal."""
    from lmconvert.runtime.chat import run_chat

    engine = build_engine(model, opts)
    run_chat(engine, build_sampling(engine, opts), enable_thinking=False if no_think else None, system=system)


@main.command()
@click.argument("model")
@click.option("--prompt", required=True, help="Prompt text ('-' reads stdin).")
@click.option("--chat", "use_chat", is_flag=True, help="Wrap the prompt in the model's chat template.")
@CHAT_TEMPLATE_OPTION
@engine_options
@sampling_options
def generate(model: str, prompt: str, use_chat: bool, **opts):
    """Complete PROMPT with MODEL and print only the generated text."""
    if prompt == "-":
        prompt = sys.stdin.read()
    engine = build_engine(model, opts, compile_decode=False)
    ids = engine.apply_chat_template([{"role": "user", "content": prompt}]) if use_chat else prompt
    for out in engine.stream(ids, build_sampling(engine, opts)):
        click.echo(out.delta, nl=False)
    click.echo()


@main.command()
@click.argument("model")
@click.option("--server-name", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option("--server-port", type=click.IntRange(1, 65535), default=23333, show_default=True)
@click.option("--served-model-name", default=None, help="Model id in the API (default: MODEL's base name).")
@click.option("--reasoning-parser", type=click.Choice(["qwen3", "qwen-qwq"]), default=None,
              help="Move <think>…</think> into reasoning_content.")
@click.option("--tool-call-parser", type=click.Choice(["qwen3", "qwen2.5", "llama3", "auto"]), default=None,
              help="Serve `tools`: turn the model's tool calls into message.tool_calls (auto: by the chat template).")
@click.option("--api-keys", multiple=True, envvar="LMCONVERT_API_KEYS",
              help="Accepted bearer key (repeatable, or comma-separated; env LMCONVERT_API_KEYS, space-separated).")
@click.option("--max-queue", type=click.IntRange(min=1), default=512, show_default=True,
              help="Requests that may wait for the engine; beyond it the server answers 429 with Retry-After.")
@click.option("--drain-timeout", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="On SIGTERM: seconds the requests in flight get to finish (keep it under the pod's grace period).")
@CHAT_TEMPLATE_OPTION
@engine_options
def serve(model: str, server_name: str, server_port: int, served_model_name: str | None,
          reasoning_parser: str | None, tool_call_parser: str | None, api_keys: tuple[str, ...], max_queue: int,
          drain_timeout: float, **opts):
    """Serve MODEL (engine dir or checkpoint) over an OpenAI-compatible HTTP API."""
    from lmconvert.devices import resolve_device
    from lmconvert.engine import open_model
    from lmconvert.runtime.serve_launch import run_server
    from lmconvert.templates import read_chat_template

    def check_model():  # before the server starts: the device, the template, the model's config and files
        resolve_device(opts["device"])
        if opts["chat_template"]:
            read_chat_template(opts["chat_template"])
        open_model(model, arch=opts["arch"], model_source=opts["model_source"])

    keys = tuple(k for value in api_keys for k in value.split(",") if k)
    run_server(model, lambda: build_engine(model, opts), host=server_name, port=server_port,
               model_name=served_model_name, reasoning_parser=reasoning_parser, tool_call_parser=tool_call_parser,
               api_keys=keys, max_queue=max_queue, drain_timeout_s=drain_timeout, check_model=check_model)


@main.command()
@click.argument("model")
@click.option("--mode", type=click.Choice(["latency", "throughput"]), default="latency", show_default=True)
@click.option("--num-prompts", type=click.IntRange(min=1), default=None,
              help="Requests at once (throughput; default 256 on a GPU, 16 on CPU).")
@click.option("--input-len", type=click.IntRange(min=1), default=None,
              help="Prompt tokens (default 512 on a GPU, 128 on CPU).")
@click.option("--output-len", type=click.IntRange(min=1), default=None,
              help="Generated tokens a request (default 256 on a GPU, 64 on CPU).")
@click.option("--compare-hf", is_flag=True, help="Also time transformers' generate on an equivalent model.")
@click.option("--hf-batch", type=click.IntRange(min=1), default=None, help="Batch of the --compare-hf run (default: 1, or 16 for throughput).")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one last JSON line.")
@engine_options
def bench(model: str, mode: str, num_prompts: int | None, input_len: int | None, output_len: int | None,
          compare_hf: bool, hf_batch: int | None, as_json: bool, **opts):
    """Measure time to first token, decode speed and throughput of MODEL on random prompts."""
    import json

    from lmconvert.devices import resolve_device
    from lmconvert.runtime.bench import DEFAULTS, hf_generate_tok_s, run_bench

    defaults = DEFAULTS["cuda" if resolve_device(opts["device"]).type == "cuda" else "cpu"]
    num_prompts = num_prompts or defaults["num_prompts"]
    input_len, output_len = input_len or defaults["input_len"], output_len or defaults["output_len"]
    requests = 1 if mode == "latency" else num_prompts
    click.echo(f"bench {mode}: {requests} request(s) of {input_len} tokens in / {output_len} out", err=True)

    if mode == "throughput":
        opts["max_batch_size"] = max(opts["max_batch_size"], num_prompts)
    opts["session_len"] = opts["session_len"] or input_len + output_len + 16
    engine = build_engine(model, opts)
    result = run_bench(engine, mode, num_prompts, input_len, output_len)
    if compare_hf:
        result.hf_tok_s = hf_generate_tok_s(engine.config, engine.device, engine.dtype,
                                            hf_batch or (1 if mode == "latency" else 16), input_len, output_len)
    figures = result.as_dict()
    for key, value in figures.items():
        click.echo(f"{key:>14}: {value:.2f}" if isinstance(value, float) else f"{key:>14}: {value}")
    if as_json:
        click.echo(json.dumps(figures))


@main.command()
@click.argument("src")
@click.option("--w4", is_flag=True, help="AWQ W4A16: 4-bit weights in groups, 16-bit activations.")
@click.option("--w8", is_flag=True, help="INT8 weight-only (W8A16), symmetric.")
@click.option("--w8a8", "--smooth-quant", "w8a8", is_flag=True,
              help="SmoothQuant W8A8: int8 per-channel weights, dynamic per-token int8 activations.")
@click.option("--alpha", type=float, default=None, help="--w8a8: smoothing strength in [0, 1] (default 0.5).")
@click.option("--dst-path", required=True, help="Engine directory to create.")
@click.option("--group-size", type=click.IntRange(min=1), default=None,
              help="W4: 128, 64 or 32 input channels per scale (default: the largest that divides every linear). "
              "W8: default one scale per output channel.")
@click.option("--sym", is_flag=True, help="W4: symmetric grid (zero point 8) instead of asymmetric.")
@click.option("--integer-zeros", is_flag=True,
              help="W4: zero points on the integer grid 0..15, as AutoAWQ and compressed-tensors store them, so that "
              "`lmconvert export` can write the engine (the default fits free zero points: lower error).")
@click.option("--calib-data", default=None, help='.txt, .jsonl (field "text") or a directory of them (default: shipped set).')
@click.option("--calib-samples", type=int, default=16, show_default=True, help="Calibration windows.")
@click.option("--calib-seqlen", type=int, default=512, show_default=True, help="Tokens per calibration window.")
@click.option("--no-search-scale", is_flag=True, help="Skip the AWQ scale search (with --no-clip: plain round-to-nearest).")
@click.option("--no-clip", is_flag=True, help="Skip the weight-clipping search.")
@click.option("--gptq", is_flag=True, help="GPTQ error-compensating rounding on the AWQ grid (fits the calibration domain).")
@click.option("--quant-lm-head", is_flag=True,
              help="--w4 / --w8: lm_head too, INT8 per output channel (faster decode; AWQ releases keep it "
              "16-bit). Engine format 3.")
@click.option("--device", default=None, help="cpu | cuda (default: cuda when available).")
@click.option("--arch", default="auto", show_default=True, help="Architecture check when SRC is a checkpoint.")
@click.option("--model-source", type=click.Choice(["hf", "modelscope"]), default=None, help="Cache to search for a model id.")
@click.option("--overwrite", is_flag=True, help="Replace an existing engine directory.")
def quantize(src: str, w4: bool, w8: bool, w8a8: bool, alpha: float | None, dst_path: str, group_size: int | None,
             sym: bool, integer_zeros: bool, calib_data: str | None, calib_samples: int, calib_seqlen: int,
             no_search_scale: bool, no_clip: bool, gptq: bool, quant_lm_head: bool, device: str | None, arch: str,
             model_source: str | None, overwrite: bool):
    """Quantize SRC (fp engine dir or checkpoint) into a W4 (AWQ), W8 or W8A8 (SmoothQuant) engine at --dst-path."""
    from lmconvert.quant import QuantConfig
    from lmconvert.quant import quantize as run_quantize
    from lmconvert.quant.report import print_summary

    if w4 + w8 + w8a8 != 1:
        raise UserError("choose exactly one of --w4, --w8 and --w8a8")
    if alpha is not None and not w8a8:
        raise UserError("--alpha is the smoothing strength of --w8a8")
    qc = QuantConfig(bits=4 if w4 else 8, group_size=group_size, symmetric=sym, integer_zeros=integer_zeros,
                     activation_bits=8 if w8a8 else 16, alpha=0.5 if alpha is None else alpha,
                     search_scale=not no_search_scale, clip=not no_clip, gptq=gptq, quantize_lm_head=quant_lm_head,
                     calib_data=calib_data, calib_samples=calib_samples, calib_seqlen=calib_seqlen, device=device)
    print_summary(run_quantize(src, dst_path, qc, overwrite=overwrite, arch=arch, model_source=model_source))


@main.command()
@click.argument("engine")
@click.option("--format", "fmt", type=click.Choice(["autoawq", "compressed-tensors"]), required=True,
              help="Checkpoint layout to write (W4 engines only; codes are copied, not requantized).")
@click.option("--dst-path", required=True, help="Checkpoint directory to create.")
@click.option("--overwrite", is_flag=True, help="Replace an existing directory.")
def export(engine: str, fmt: str, dst_path: str, overwrite: bool):
    """Export a W4 ENGINE as an AutoAWQ or compressed-tensors checkpoint that transformers loads."""
    from lmconvert.export import export as run_export

    click.echo(f"checkpoint written to {run_export(engine, fmt, dst_path, overwrite)}")


@main.command("eval")
@click.argument("model")
@click.option("--text", required=True, help="UTF-8 text file to score.")
@click.option("--seq-len", type=click.IntRange(min=2), default=512, show_default=True, help="Tokens per window.")
@click.option("--windows", type=click.IntRange(min=1), default=40, show_default=True,
              help="Score the first N non-overlapping windows.")
@click.option("--json", "as_json", is_flag=True, help='Print {"ppl", "tokens", "seconds"} as one last JSON line.')
@model_options
def eval_command(model: str, text: str, seq_len: int, windows: int, as_json: bool, **opts):
    """Perplexity of MODEL (engine dir, quantized or not, or checkpoint) on a text file (fp32 compute on CPU)."""
    import json

    from lmconvert.quant.eval import engine_defaults, perplexity, read_text

    content = read_text(text)
    engine = build_engine(model, engine_defaults(opts, seq_len))
    result = perplexity(engine, content, seq_len, windows)
    click.echo(f"perplexity {result.ppl:.4f} over {result.tokens} tokens ({result.seconds:.1f} s)")
    if as_json:
        click.echo(json.dumps(result.to_dict()))


if __name__ == "__main__":
    main()
