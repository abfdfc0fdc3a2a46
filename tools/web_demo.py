"""A chat page in the browser for a checkpoint (a training checkpoint or a Hugging Face folder):

    streamlit run tools/web_demo.py -- --ckpt runs/demo/ckpt/300

Needs the `web` extra (pip install -e .[web]); the code is in `internlm/cli/web_demo.py`, whose
docstring lists the options."""
import sys

from internlm.cli.web_demo import main

if __name__ == "__main__":
    status = main()  # None on the page; 2 when run without streamlit
    if status:
        sys.exit(status)
