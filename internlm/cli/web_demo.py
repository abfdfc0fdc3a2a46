"""A chat page in the browser for a checkpoint this framework trained (or a Hugging Face folder).

    pip install -e .[web]
    streamlit run tools/web_demo.py -- --ckpt runs/demo/ckpt/300 [--tokenizer T] [--device cpu|cuda]
        [--dtype float32|bfloat16|float16] [--max_new_tokens 64] [--temperature 0.8] [--top_p 0.9]
        [--repetition_penalty 1.0] [--system "..."]

The options after `--` are the page's; the sampling ones only set the sidebar's starting values. When
INTERNLM_WEB_DEMO_ARGS is set, the page reads its options from it instead of the command line (how
the tests, whose streamlit.testing AppTest cannot pass one, start it). The model is loaded once per
server (st.cache_resource); the chat logic is internlm.chat_session, this module is only the page.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

from internlm.errors import UserError

ARGS_ENV = "INTERNLM_WEB_DEMO_ARGS"
USAGE = "streamlit run tools/web_demo.py -- --ckpt PATH [--tokenizer T] [--device cpu|cuda] [--dtype float32]"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # shown on the page, not an exit
        raise UserError(f"{message}. Usage: {USAGE}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = _Parser(prog="tools/web_demo.py", description=__doc__.split("\n\n")[0], add_help=False)
    p.add_argument("--ckpt", required=True, help="checkpoint folder (or save folder) or Hugging Face folder")
    p.add_argument("--tokenizer", default=None, help="sentencepiece .model (default: the checkpoint's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top_p", type=float, default=0.9)
    p.add_argument("--repetition_penalty", type=float, default=1.0)
    p.add_argument("--system", default="", help="the system prompt")
    args = p.parse_args(argv)
    for name, low, high in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0), ("repetition_penalty", 1.0, 2.0)):
        if not low <= getattr(args, name) <= high:
            raise UserError(f"--{name} must be between {low} and {high}, got {getattr(args, name)}.")
    if args.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}.")
    return args


def page_argv() -> list[str]:
    env = os.environ.get(ARGS_ENV)
    return shlex.split(env) if env is not None else sys.argv[1:]


_LOADER = []


def _load(args):
    """load_session, cached for the server's life (one model per checkpoint/tokenizer/device/dtype)."""
    import streamlit as st

    from internlm.chat_session import load_session

    if not _LOADER:
        _LOADER.append(st.cache_resource(show_spinner="Loading the model...")(load_session))
    return _LOADER[0](args.ckpt, args.tokenizer, args.device, args.dtype)


def main(argv: list[str] | None = None) -> int | None:
    """The page (problems are shown on it); an exit status only when not run by streamlit."""
    try:
        import streamlit as st
        from streamlit import runtime
    except ImportError:
        print("the web page needs streamlit: pip install -e .[web]", file=sys.stderr)
        return 2
    if not runtime.exists():
        print(f"this is a streamlit page; start it with:\n  {USAGE}", file=sys.stderr)
        return 2
    st.set_page_config(page_title="InternLM chat", page_icon=":speech_balloon:")
    st.title("Chat with a checkpoint")
    argv = page_argv() if argv is None else argv
    try:
        args = parse_args(argv)
        session = _load(args)
    except UserError as exc:
        st.error(str(exc))
        return None
    except (OSError, RuntimeError, ValueError) as exc:  # e.g. an unreadable file: one line, no traceback
        st.error(f"cannot load the model ({shlex.join(argv)}): {type(exc).__name__}: {exc}")
        return None
    controls = sidebar(st, session, args)
    chat(st, session, controls)
    return None


def sidebar(st, session, args) -> dict:
    """The sampling controls (returned), the Clear chat button and the checkpoint's facts."""
    bar = st.sidebar
    bar.header("Generation")
    controls = dict(
        max_new_tokens=int(bar.number_input("Max new tokens", 1, session.context, min(args.max_new_tokens,
                                            session.context), key="max_new_tokens")),
        temperature=bar.slider("Temperature (0: greedy)", 0.0, 2.0, args.temperature, 0.05, key="temperature"),
        top_p=bar.slider("Top-p", 0.0, 1.0, args.top_p, 0.01, key="top_p"),
        repetition_penalty=bar.slider("Repetition penalty", 1.0, 2.0, args.repetition_penalty, 0.01,
                                      key="repetition_penalty"),
        system=bar.text_area("System prompt", args.system, key="system") if session.encoder is not None else "",
    )
    if bar.button("Clear chat", key="clear"):
        st.session_state.messages = []
    bar.header("Checkpoint")
    bar.markdown("\n".join(f"- {name}: `{value}`" for name, value in session.facts.items()))
    if session.details:
        bar.expander("tools/ckpt_info.py").text("\n".join(session.details))
    return controls


def chat(st, session, controls) -> None:
    from internlm.chat_session import PromptTooLong, Reply, build_prompt

    messages = st.session_state.setdefault("messages", [])
    if session.encoder is None:
        st.info(f"No chat template: each message is continued as plain text. ({session.plain_reason})")
    for message in messages:
        show(st, message)
    text = st.chat_input("Your message" if session.encoder is not None else "Text to continue")
    if not text:
        return
    messages.append({"role": "user", "content": text})
    show(st, messages[-1])
    try:
        prompt = build_prompt(session, messages, controls["system"], controls["max_new_tokens"])
    except PromptTooLong as exc:
        messages.pop()
        st.error(str(exc))
        return
    reply = Reply(session, prompt, temperature=controls["temperature"], top_p=controls["top_p"],
                  repetition_penalty=controls["repetition_penalty"])
    with st.chat_message("assistant"):
        if prompt.notice:
            st.warning(prompt.notice)
        box, shown = st.empty(), ""
        try:
            for piece in reply:
                shown += piece
                box.text(shown + "\u258c")
        except RuntimeError as exc:  # e.g. out of GPU memory
            st.error(f"generation failed: {exc}")
        box.text(reply.text)
        n = len(reply.ids)
        info = (f"{n} token{'s' if n != 1 else ''} in {reply.seconds:.1f}s"
                + (f" ({n / reply.seconds:.1f}/s)" if reply.seconds > 0 and n else "")
                + (", the model ended its turn" if reply.stopped else ", stopped at max new tokens"))
        st.caption(info)
    messages.append({"role": "assistant", "content": reply.text, "info": info, "notice": prompt.notice})


def show(st, message: dict) -> None:
    with st.chat_message(message["role"]):
        if message.get("notice"):
            st.warning(message["notice"])
        st.text(message["content"])
        if message.get("info"):
            st.caption(message["info"])
