"""recbole-mm: large (multimodal) language models for sequential recommendation, as a RecBole plugin.

Importing the package is cheap: transformers, peft, bitsandbytes and ray are only imported by the
model modules that need them.
"""

__version__ = "0.1.0"
