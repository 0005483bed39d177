"""ft: fine-tune large language models from validated YAML recipes."""

__version__ = "0.1.0"
