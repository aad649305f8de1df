"""Datasets: RecBole atomic files plus multimodal side files (text, images, captions, embeddings)."""
