"""InternLM training framework.

`import internlm` stays light: `load_model` (internlm.inference) is imported on first use.
"""

__all__ = ["load_model"]


def __getattr__(name):
    if name == "load_model":
        from internlm.inference import load_model

        return load_model
    raise AttributeError(f"module 'internlm' has no attribute {name!r}")
