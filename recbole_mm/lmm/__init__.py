"""LMM machinery: backbone loading (quantization, LoRA), the small local model builder, prompts and
the verbalizer. Importing this package is cheap: transformers, peft and bitsandbytes are imported
only inside the sub-modules, when an LMM is actually built."""
