"""Chat templates shipped with lmconvert, and `--chat-template`: a Jinja file that replaces a model's own
template (as in vLLM and LMDeploy), or the name of a shipped one."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from lmconvert.errors import UserError

SHIPPED = ("chatml-tools",)  # ChatML with function calling (Qwen / Hermes style <tools>, <tool_call>)


def read_chat_template(spec: str) -> str:
    """The template text of a shipped name or a file; a template Jinja cannot parse is a UserError here,
    not at the first request."""
    if spec in SHIPPED:
        text = resources.files(__name__).joinpath(f"{spec}.jinja").read_text()
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise UserError(f"--chat-template {spec}: no such file (or a shipped name: {', '.join(SHIPPED)})")
        text = path.read_text()
    import jinja2

    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"--chat-template {spec}: line {e.lineno}: {e.message}") from None
    return text


def store_chat_template(tokenizer_dir: Path, template: str) -> None:
    """Replace the chat template of the tokenizer saved in tokenizer_dir (an engine's)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(tokenizer_dir)
