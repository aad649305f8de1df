"""Dataset classes selected by model name (``<Model>Dataset``), looked up before RecBole's."""
